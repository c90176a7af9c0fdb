"""Remember where each cached DID document or resolution failure came from.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A failed resolution is cached for an hour so that unknown DIDs are not fetched again and again.
Without its URL, a failure cached while ``--plc-url`` pointed at the wrong directory was reused
after the user corrected it. Rows from before this revision have no source, and their cached
failures are not reused.
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("did_documents", sa.Column(
        "source_url", sa.Text(),
        comment="URL of the last resolution attempt (PLC directory or did:web well-known); a cached "
                "failure is reused only while the DID resolves through the same URL."))


def downgrade() -> None:
    op.drop_column("did_documents", "source_url")
