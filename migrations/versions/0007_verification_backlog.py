"""Keep events stored unchecked (no key), so that they can be checked once the key is known.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Written by hand from indexer.schema. An event whose signer's DID document could not be resolved
in time is stored with verified NULL. Its rows do not keep the signed commit, so the material the
checks need is kept here until a re-check finds the key.
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

ID = sa.Text(collation='C')


def upgrade() -> None:
    op.create_table(
        "verification_backlog",
        sa.Column("endpoint", ID, nullable=False, comment="Stream endpoint URL the event came from."),
        sa.Column("seq", sa.BigInteger(), nullable=False, comment="Sequence number of the event on that endpoint."),
        sa.Column("kind", ID, nullable=False, comment="What was signed: commit, sync or labels."),
        sa.Column("did", ID, nullable=False,
                  comment="DID whose key signs the event: the account, or for labels the labeler of the first one."),
        sa.Column("work", sa.LargeBinary(), nullable=False,
                  comment="What the checks need (the commit's blocks and ops, or the labels), as DAG-CBOR."),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0",
                  comment="Re-checks that still found no key."),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(),
                  comment="When the event was stored unchecked."),
        sa.Column("checked_at", sa.DateTime(timezone=True), comment="Time of the last re-check; NULL before the first."),
        sa.PrimaryKeyConstraint("endpoint", "seq"),
        sa.CheckConstraint("kind IN ('commit', 'sync', 'labels')", name="kind"),
        comment=(
            "Events stored with verified NULL (no_key) because the signer's key was unknown when they were "
            "indexed. indexer run checks them again with a growing wait; once a key is found it sets verified "
            "on their rows and deletes them here, and after 12 checks without one it deletes them too."
        ),
    )


def downgrade() -> None:
    op.drop_table("verification_backlog")
