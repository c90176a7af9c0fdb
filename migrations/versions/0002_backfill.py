"""Backfill: per-repo job state, listRepos positions, the DID document cache, cursors.start_seq.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

Written by hand from indexer.schema. The state list in the check constraint is spelled out here, so
that later changes to the schema module do not rewrite this migration's effect.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ID = sa.Text(collation='C')


def upgrade() -> None:
    op.add_column('cursors', sa.Column(
        'start_seq', sa.BigInteger(), nullable=True,
        comment='For a backfill job, the sequence number it started from (its --cursor).'))
    op.create_table('backfill_repos',
    sa.Column('job', ID, nullable=False,
              comment="Backfill job name: 'repos' (--repo, --repos-file), 'all' (--all), 'resync' (--desynchronized), or --job."),
    sa.Column('did', ID, nullable=False, comment='DID of the repository.'),
    sa.Column('state', ID, server_default='pending', nullable=False,
              comment='pending, in_progress, done, failed (retried by the next run), or a final state: deactivated, takendown, suspended, not_found.'),
    sa.Column('rev', ID, nullable=True, comment='Revision of the repo export that was indexed, once done.'),
    sa.Column('records', sa.BigInteger(), nullable=True, comment='Number of records in that export.'),
    sa.Column('deleted', sa.BigInteger(), nullable=True,
              comment='Records indexed earlier but absent from that export, recorded as deletions.'),
    sa.Column('error', sa.Text(), nullable=True,
              comment="Why the last attempt failed, or the PDS's error name and message for a final state."),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False, comment='Fetch attempts so far, over all runs.'),
    sa.Column('pds_endpoint', ID, nullable=True, comment='PDS the repo was fetched from, as resolved from the DID document.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False,
              comment='When the repo was added to the job.'),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False,
              comment='When the state last changed.'),
    sa.CheckConstraint(
        "state IN ('pending', 'in_progress', 'done', 'failed', 'deactivated', 'takendown', 'suspended', 'not_found')",
        name=op.f('ck_backfill_repos_state')),
    sa.PrimaryKeyConstraint('job', 'did', name=op.f('pk_backfill_repos')),
    comment='Per-repo progress of repo backfill jobs (getRepo), so a job resumes where it stopped.'
    )
    op.create_index(op.f('ix_backfill_repos_job_state'), 'backfill_repos', ['job', 'state'], unique=False)
    op.create_table('backfill_listings',
    sa.Column('endpoint', ID, nullable=False, comment='listRepos URL of the relay being enumerated.'),
    sa.Column('job', ID, nullable=False, comment='Backfill job the listed repos were added to.'),
    sa.Column('cursor', sa.Text(), nullable=True, comment='listRepos cursor to continue from; NULL before the first page.'),
    sa.Column('repos', sa.BigInteger(), server_default='0', nullable=False, comment='Repos listed so far.'),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True,
              comment='When the last page was read; NULL while unfinished.'),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False,
              comment='When the cursor last moved.'),
    sa.PrimaryKeyConstraint('endpoint', 'job', name=op.f('pk_backfill_listings')),
    comment='Position of a paged listRepos enumeration (backfill --all), so an interrupted one resumes.'
    )
    op.create_table('did_documents',
    sa.Column('did', ID, nullable=False, comment='DID (did:plc or did:web).'),
    sa.Column('document', postgresql.JSONB(astext_type=sa.Text()), nullable=True,
              comment='The last DID document resolved successfully; NULL if none ever was.'),
    sa.Column('pds_endpoint', ID, nullable=True, comment='serviceEndpoint of the #atproto_pds service in that document.'),
    sa.Column('handle', ID, nullable=True,
              comment="First at:// handle in alsoKnownAs (not verified against the handle's DNS or well-known)."),
    sa.Column('signing_key', sa.Text(), nullable=True, comment='publicKeyMultibase of the #atproto verification method.'),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True, comment='When document was fetched.'),
    sa.Column('checked_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False,
              comment='When resolution was last attempted; with the cache TTL it decides when to resolve again.'),
    sa.Column('error', sa.Text(), nullable=True, comment='Why the last attempt failed; NULL when it succeeded.'),
    sa.PrimaryKeyConstraint('did', name=op.f('pk_did_documents')),
    comment='Cache of resolved DID documents (PLC directory or did:web), with their PDS endpoint and handle.'
    )


def downgrade() -> None:
    op.drop_table('did_documents')
    op.drop_table('backfill_listings')
    op.drop_index(op.f('ix_backfill_repos_job_state'), table_name='backfill_repos')
    op.drop_table('backfill_repos')
    op.drop_column('cursors', 'start_seq')
