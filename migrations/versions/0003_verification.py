"""Verification outcome columns on signed data, and cursors.events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Written by hand from indexer.schema. The comments are spelled out here, so that later changes to the
schema module do not rewrite this migration's effect. Existing rows get NULL: not checked.
"""

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

ID = sa.Text(collation='C')

COMMIT_CHECKS = "the signed commit that wrote it (signature, did, rev, MST proof, record hash)"
REASON = "Why verified is false or NULL: a reason such as signature_mismatch, proof_mismatch, no_key."

# Table name -> what its verified column covers.
VERIFIED_TABLES = {
    'posts': COMMIT_CHECKS,
    'likes': COMMIT_CHECKS,
    'reposts': COMMIT_CHECKS,
    'follows': COMMIT_CHECKS,
    'blocks': COMMIT_CHECKS,
    'profiles': COMMIT_CHECKS,
    'records': COMMIT_CHECKS,
    'deletions': "the signed commit of that delete (signature, did, rev, MST proof)",
    'sync_events': "the commit block's signature, did and rev",
    'labels': "sig, checked against the #atproto_label key of the labeler (src)",
}


def upgrade() -> None:
    for table, what in VERIFIED_TABLES.items():
        op.add_column(table, sa.Column(
            'verified', sa.Boolean(), nullable=True,
            comment=f"True when {what} verified, false when it failed, NULL when not checked (--verify off, or no key)."))
        op.add_column(table, sa.Column('verify_reason', ID, nullable=True, comment=REASON))
    op.add_column('cursors', sa.Column(
        'events', sa.BigInteger(), server_default='0', nullable=False,
        comment='Events committed under this cursor so far (written or dead-lettered), over all runs.'))


def downgrade() -> None:
    op.drop_column('cursors', 'events')
    for table in reversed(VERIFIED_TABLES):
        op.drop_column(table, 'verify_reason')
        op.drop_column(table, 'verified')
