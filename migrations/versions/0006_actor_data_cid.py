"""Keep each account's MST root, so a commit whose prevData does not follow it marks the repo.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

Sync 1.1 commits carry prevData, the MST root before the commit. It must equal the data CID of
the account's previous commit; when it does not, commits were missed and the repo is marked
desynchronized for a refetch, as a since that does not match the stored rev already does. Existing
accounts start with NULL (unknown), which is never taken as a mismatch.
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("actors", sa.Column(
        "data_cid", sa.Text(collation="C"),
        comment="MST root CID at rev (the commit's data); NULL when unknown. A newer commit whose "
                "prevData differs marks the repo desynchronized."))
    op.alter_column(
        "actors", "desynchronized_at",
        comment="Event time of the #sync event, or of the first commit that does not follow rev or data_cid, "
                "that showed the repo must be refetched (the clock time when the event has no time); cleared "
                "by a resync.",
        existing_type=sa.DateTime(timezone=True))


def downgrade() -> None:
    op.alter_column(
        "actors", "desynchronized_at",
        comment="Set when a #sync event (or a commit that does not follow rev) means the repo must be "
                "refetched; cleared by a resync.",
        existing_type=sa.DateTime(timezone=True))
    op.drop_column("actors", "data_cid")
