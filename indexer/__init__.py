"""indexer: an archival indexer for the AT Protocol (Bluesky) network.

The data path, one module per stage:

- ``stream``: websocket client for ``subscribeRepos`` and ``subscribeLabels`` (reconnect, backoff).
- ``frames``: pure decoding of frame bytes into the typed events of ``events``.
- ``car``: reading CAR v1 files block by block.
- ``records``: mapping decoded records onto table rows.
- ``store``: writing batches of events and the cursor in one transaction.
- ``schema``: the SQLAlchemy Core description of every table.
- ``cli``: the ``indexer`` command.
"""

from indexer.errors import IndexerError

__version__ = "0.1.0"
__all__ = ["IndexerError", "__version__"]
