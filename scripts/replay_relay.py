"""Run the local replay relay: ``python scripts/replay_relay.py FRAMES_FILE --port 8765``.

Same as ``python -m indexer.replay``; this wrapper also works from a checkout that is not installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from indexer.replay import main  # noqa: E402  (needs the path set above)

if __name__ == "__main__":
    raise SystemExit(main())
