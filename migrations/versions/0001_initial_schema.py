"""Initial schema: record tables, deletions, actors, event histories, cursors, labels.

Revision ID: 0001
Revises:
Create Date: 2026-12-04

Written from indexer.schema (autogenerate drafted it); the view SQL is spelled out here rather than
imported, so that later changes to the schema module do not rewrite this migration's effect.
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


CURRENT_LABELS = """
SELECT id, endpoint, seq, ver, src, uri, subject_did, cid, val, cts_raw, cts, exp_raw, exp, sig, received_at
FROM (
    SELECT DISTINCT ON (src, uri, val) *
    FROM labels
    ORDER BY src, uri, val, cts DESC NULLS LAST, neg DESC, id DESC
) AS latest
WHERE NOT neg
  AND (exp IS NULL OR exp > COALESCE(NULLIF(current_setting('indexer.now', true), '')::timestamptz, now()))
"""


def upgrade() -> None:
    op.create_table('account_events',
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Stream endpoint URL the event came from.'),
    sa.Column('seq', sa.BigInteger(), nullable=False, comment='Sequence number of the event on that endpoint.'),
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the account.'),
    sa.Column('time_raw', sa.Text(), nullable=True, comment='Event time as sent.'),
    sa.Column('time', sa.DateTime(timezone=True), nullable=True, comment='Event time parsed as UTC.'),
    sa.Column('active', sa.Boolean(), nullable=False, comment='Whether the account is active.'),
    sa.Column('status', sa.Text(collation='C'), nullable=True, comment='Hosting status; unknown values are kept as sent.'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.PrimaryKeyConstraint('endpoint', 'seq', name=op.f('pk_account_events')),
    comment='Append-only history of #account events.'
    )
    op.create_index(op.f('ix_account_events_did_seq'), 'account_events', ['did', 'seq'], unique=False)
    op.create_table('actors',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the account.'),
    sa.Column('handle', sa.Text(collation='C'), nullable=True, comment="Latest handle from an #identity event; 'handle.invalid' when it failed verification."),
    sa.Column('active', sa.Boolean(), nullable=True, comment='Whether the account is active, from the latest #account event; NULL if none seen.'),
    sa.Column('status', sa.Text(collation='C'), nullable=True, comment='Hosting status from the latest #account event (takendown, suspended, deleted, deactivated, ...).'),
    sa.Column('rev', sa.Text(collation='C'), nullable=True, comment='Newest repo revision seen in a commit.'),
    sa.Column('last_seq', sa.BigInteger(), nullable=True, comment='Sequence number of the newest event seen for this account.'),
    sa.Column('last_time', sa.DateTime(timezone=True), nullable=True, comment='Event time of that event.'),
    sa.Column('identity_seq', sa.BigInteger(), nullable=True, comment='Sequence number of the event that set handle.'),
    sa.Column('account_seq', sa.BigInteger(), nullable=True, comment='Sequence number of the event that set active and status.'),
    sa.Column('desynchronized_at', sa.DateTime(timezone=True), nullable=True, comment='Set when a #sync event (or a commit that does not follow rev) means the repo must be refetched; cleared by a resync.'),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When the indexer last changed this row.'),
    sa.PrimaryKeyConstraint('did', name=op.f('pk_actors')),
    comment='One row per account seen on any stream, with its current handle, status and repo revision.'
    )
    op.create_table('blocks',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.graph.block/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('subject_did', sa.Text(collation='C'), nullable=True, comment='DID of the blocked account.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_blocks')),
    comment='Blocks between accounts (not CAR blocks). Collection app.bsky.graph.block; one row per existing record, latest version.'
    )
    op.create_table('cursors',
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Stream endpoint URL, e.g. wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos.'),
    sa.Column('job', sa.Text(collation='C'), server_default='live', nullable=False, comment="'live' for indexer run; a backfill job's name for its own replay position."),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Highest sequence number whose event and every earlier one are committed.'),
    sa.Column('target_seq', sa.BigInteger(), nullable=True, comment='For a backfill job, the sequence number at which it stops.'),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When the cursor last moved.'),
    sa.Column('last_event_time', sa.DateTime(timezone=True), nullable=True, comment='Event time of the event at seq, when it had one.'),
    sa.PrimaryKeyConstraint('endpoint', 'job', name=op.f('pk_cursors')),
    comment='Stream positions, written in the same transaction as the rows of the events they cover.'
    )
    op.create_table('dead_letters',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment="Stream endpoint URL, or 'repo' for repo exports."),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Sequence number of the frame, when it could be read.'),
    sa.Column('did', sa.Text(collation='C'), nullable=True, comment='DID of the repository, when it could be read.'),
    sa.Column('t', sa.Text(collation='C'), nullable=True, comment='Message type from the frame header, when it could be read.'),
    sa.Column('path', sa.Text(collation='C'), nullable=True, comment='collection/rkey of the op, for a failure confined to one op of a commit.'),
    sa.Column('reason', sa.Text(collation='C'), nullable=False, comment='Why it was dropped: one of the closed set of drop reasons.'),
    sa.Column('error', sa.Text(), nullable=False, comment="The decoder's or writer's error message."),
    sa.Column('raw', sa.LargeBinary(), nullable=True, comment='The raw frame (or record block for an op failure), for retry and inspection.'),
    sa.Column('digest', sa.LargeBinary(), nullable=False, comment='SHA-256 identifying this failure, so a replayed frame is dead-lettered once.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("reason IN ('invalid_frame', 'invalid_body', 'oversized_frame', 'invalid_car', 'missing_block', 'invalid_record', 'cid_mismatch', 'invalid_path', 'too_big', 'store_failed', 'signature_invalid')", name=op.f('ck_dead_letters_reason')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_dead_letters')),
    comment='Inputs that could not be decoded or stored, kept with their raw bytes; the stream went on past them.'
    )
    op.create_index(op.f('ix_dead_letters_endpoint_digest'), 'dead_letters', ['endpoint', 'digest'], unique=True)
    op.create_index(op.f('ix_dead_letters_reason_created_at'), 'dead_letters', ['reason', 'created_at'], unique=False)
    op.create_table('deletions',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository.'),
    sa.Column('collection', sa.Text(collation='C'), nullable=False, comment='Collection NSID of the deleted record.'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key of the deleted record.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/' || collection || '/' || rkey", persisted=True), nullable=True, comment='AT-URI of the deleted record.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision of the newest delete seen for this record.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that delete; NULL when found by a repo resync.'),
    sa.Column('time', sa.DateTime(timezone=True), nullable=True, comment='Event time of that delete, as stamped by the relay.'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.PrimaryKeyConstraint('did', 'collection', 'rkey', name=op.f('pk_deletions')),
    comment="Deleted records, also used as tombstones: a create or update with a rev not newer than the delete's rev is ignored, even when it arrives after the delete. A record re-created with a newer rev exists again and keeps its deletion row."
    )
    op.create_table('follows',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.graph.follow/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('subject_did', sa.Text(collation='C'), nullable=True, comment='DID of the followed account.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_follows')),
    comment='Follows. Collection app.bsky.graph.follow; one row per existing record, latest version.'
    )
    op.create_table('gaps',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Stream endpoint URL.'),
    sa.Column('from_seq', sa.BigInteger(), nullable=True, comment='Last sequence number we had (the cursor we asked with); NULL when none.'),
    sa.Column('to_seq', sa.BigInteger(), nullable=True, comment='First sequence number the server sent after the gap; NULL until one arrives.'),
    sa.Column('reason', sa.Text(collation='C'), nullable=False, comment='Why: OutdatedCursor (the server no longer had our position).'),
    sa.Column('message', sa.Text(), nullable=True, comment="The server's message, if any."),
    sa.Column('detected_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gaps')),
    comment='Ranges of a stream that were lost because the server no longer retained them.'
    )
    op.create_table('identity_events',
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Stream endpoint URL the event came from.'),
    sa.Column('seq', sa.BigInteger(), nullable=False, comment='Sequence number of the event on that endpoint.'),
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the account.'),
    sa.Column('time_raw', sa.Text(), nullable=True, comment='Event time as sent.'),
    sa.Column('time', sa.DateTime(timezone=True), nullable=True, comment='Event time parsed as UTC.'),
    sa.Column('handle', sa.Text(collation='C'), nullable=True, comment='Handle in the event; NULL when the event carried none.'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.PrimaryKeyConstraint('endpoint', 'seq', name=op.f('pk_identity_events')),
    comment='Append-only history of #identity events.'
    )
    op.create_index(op.f('ix_identity_events_did_seq'), 'identity_events', ['did', 'seq'], unique=False)
    op.create_table('labels',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Labeler stream endpoint URL the label came from.'),
    sa.Column('seq', sa.BigInteger(), nullable=False, comment='Sequence number of the #labels frame on that endpoint.'),
    sa.Column('ver', sa.Integer(), nullable=True, comment='Label format version (1); NULL when absent.'),
    sa.Column('src', sa.Text(collation='C'), nullable=False, comment='DID of the labeler that issued the label.'),
    sa.Column('uri', sa.Text(collation='C'), nullable=False, comment='Subject: an AT-URI of a record, or a DID for an account.'),
    sa.Column('subject_did', sa.Text(collation='C'), nullable=True, comment='DID of the subject account (the uri itself, or the repo in an AT-URI).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=True, comment='CID of the specific record version labeled; NULL for all versions or an account.'),
    sa.Column('val', sa.Text(), nullable=False, comment='Label value, e.g. !takedown, porn, spam.'),
    sa.Column('neg', sa.Boolean(), server_default='false', nullable=False, comment='True when this label negates (removes) an earlier one; absent upstream means false.'),
    sa.Column('cts_raw', sa.Text(), nullable=False, comment='Creation timestamp as sent.'),
    sa.Column('cts', sa.DateTime(timezone=True), nullable=True, comment='Creation timestamp parsed as UTC; NULL when invalid.'),
    sa.Column('exp_raw', sa.Text(), nullable=True, comment='Expiry timestamp as sent; NULL when the label does not expire.'),
    sa.Column('exp', sa.DateTime(timezone=True), nullable=True, comment='Expiry parsed as UTC.'),
    sa.Column('sig', sa.LargeBinary(), nullable=True, comment='Signature bytes, exactly as received.'),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When the indexer received the label.'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_labels')),
    comment='Append-only history of every label received from every labeler, negations included. A label re-sent on replay (same src, uri, cid, val, neg and cts) is stored once.'
    )
    op.create_index(op.f('ix_labels_src_uri_cid_val_neg_cts_raw'), 'labels', ['src', 'uri', 'cid', 'val', 'neg', 'cts_raw'], unique=True, postgresql_nulls_not_distinct=True)
    op.create_index(op.f('ix_labels_src_uri_val_cts'), 'labels', ['src', 'uri', 'val', 'cts'], unique=False)
    op.create_index(op.f('ix_labels_subject_did'), 'labels', ['subject_did'], unique=False)
    op.create_index(op.f('ix_labels_uri'), 'labels', ['uri'], unique=False)
    op.create_table('likes',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.feed.like/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('subject_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the liked record.'),
    sa.Column('subject_cid', sa.Text(collation='C'), nullable=True, comment='CID of the liked record.'),
    sa.Column('via_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the repost through which it was liked, if any.'),
    sa.Column('via_cid', sa.Text(collation='C'), nullable=True, comment='CID of that repost.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_likes')),
    comment='Likes. Collection app.bsky.feed.like; one row per existing record, latest version.'
    )
    op.create_table('posts',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.feed.post/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('text', sa.Text(), nullable=True, comment='Post text, with NUL characters removed.'),
    sa.Column('langs', postgresql.ARRAY(sa.Text()), nullable=True, comment='Declared languages (BCP-47 tags).'),
    sa.Column('reply_root_uri', sa.Text(collation='C'), nullable=True, comment="AT-URI of the thread's root post, for replies."),
    sa.Column('reply_root_cid', sa.Text(collation='C'), nullable=True, comment="CID of the thread's root post, for replies."),
    sa.Column('reply_parent_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the post replied to.'),
    sa.Column('reply_parent_cid', sa.Text(collation='C'), nullable=True, comment='CID of the post replied to.'),
    sa.Column('quote_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the quoted record (embed record or recordWithMedia).'),
    sa.Column('quote_cid', sa.Text(collation='C'), nullable=True, comment='CID of the quoted record.'),
    sa.Column('embed_kind', sa.Text(collation='C'), nullable=True, comment='Embed type: images, video, external, record, recordWithMedia, or another $type.'),
    sa.Column('facets', postgresql.JSONB(astext_type=sa.Text()), nullable=True, comment='Rich-text facets (mentions, links, tags) as atproto JSON.'),
    sa.Column('embed', postgresql.JSONB(astext_type=sa.Text()), nullable=True, comment='The embed as atproto JSON.'),
    sa.Column('self_labels', postgresql.ARRAY(sa.Text()), nullable=True, comment='Self-applied label values (com.atproto.label.defs#selfLabels).'),
    sa.Column('tags', postgresql.ARRAY(sa.Text()), nullable=True, comment='Additional hashtags given outside the text.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_posts')),
    comment='Posts. Collection app.bsky.feed.post; one row per existing record, latest version.'
    )
    op.create_table('profiles',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.actor.profile/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('display_name', sa.Text(), nullable=True, comment='Display name, with NUL characters removed.'),
    sa.Column('description', sa.Text(), nullable=True, comment='Profile description, with NUL characters removed.'),
    sa.Column('avatar_cid', sa.Text(collation='C'), nullable=True, comment='CID of the avatar blob.'),
    sa.Column('banner_cid', sa.Text(collation='C'), nullable=True, comment='CID of the banner blob.'),
    sa.Column('pinned_post_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the pinned post.'),
    sa.Column('pinned_post_cid', sa.Text(collation='C'), nullable=True, comment='CID of the pinned post.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_profiles')),
    comment="Profiles (record key 'self'). Collection app.bsky.actor.profile; one row per existing record, latest version."
    )
    op.create_table('records',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository.'),
    sa.Column('collection', sa.Text(collation='C'), nullable=False, comment='Collection NSID, for every collection without a typed table.'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/' || collection || '/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record.'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt as sent, when the record has one.'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing or invalid.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON.'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.PrimaryKeyConstraint('did', 'collection', 'rkey', name=op.f('pk_records')),
    comment='Records of every collection without a typed table (lists, feeds, threadgates, other apps).'
    )
    op.create_table('reposts',
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the repository (the author).'),
    sa.Column('rkey', sa.Text(collation='C'), nullable=False, comment='Record key within the collection.'),
    sa.Column('uri', sa.Text(collation='C'), sa.Computed("'at://' || did || '/app.bsky.feed.repost/' || rkey", persisted=True), nullable=True, comment='AT-URI of the record (at://did/collection/rkey).'),
    sa.Column('cid', sa.Text(collation='C'), nullable=False, comment='CID of the record version stored here.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Repo revision (TID) of the commit that wrote this version.'),
    sa.Column('seq', sa.BigInteger(), nullable=True, comment='Relay sequence number of that commit; NULL when it came from a repo export.'),
    sa.Column('created_at_raw', sa.Text(), nullable=True, comment='createdAt exactly as the client sent it (may be missing or invalid).'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=True, comment='createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.'),
    sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The whole record as atproto JSON ($link for CIDs, $bytes for bytes).'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.Column('subject_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the reposted record.'),
    sa.Column('subject_cid', sa.Text(collation='C'), nullable=True, comment='CID of the reposted record.'),
    sa.Column('via_uri', sa.Text(collation='C'), nullable=True, comment='AT-URI of the repost through which it was reposted, if any.'),
    sa.Column('via_cid', sa.Text(collation='C'), nullable=True, comment='CID of that repost.'),
    sa.PrimaryKeyConstraint('did', 'rkey', name=op.f('pk_reposts')),
    comment='Reposts. Collection app.bsky.feed.repost; one row per existing record, latest version.'
    )
    op.create_table('sync_events',
    sa.Column('endpoint', sa.Text(collation='C'), nullable=False, comment='Stream endpoint URL the event came from.'),
    sa.Column('seq', sa.BigInteger(), nullable=False, comment='Sequence number of the event on that endpoint.'),
    sa.Column('did', sa.Text(collation='C'), nullable=False, comment='DID of the account.'),
    sa.Column('time_raw', sa.Text(), nullable=True, comment='Event time as sent.'),
    sa.Column('time', sa.DateTime(timezone=True), nullable=True, comment='Event time parsed as UTC.'),
    sa.Column('rev', sa.Text(collation='C'), nullable=False, comment='Revision the repo was reset to.'),
    sa.Column('commit_cid', sa.Text(collation='C'), nullable=True, comment='CID of the commit block in the event, when readable.'),
    sa.Column('indexed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When this row was last written by the indexer.'),
    sa.PrimaryKeyConstraint('endpoint', 'seq', name=op.f('pk_sync_events')),
    comment="Append-only history of #sync events (a repo's state was reset; it must be refetched)."
    )
    op.create_index(op.f('ix_sync_events_did_seq'), 'sync_events', ['did', 'seq'], unique=False)
    op.execute(f"CREATE VIEW current_labels AS {CURRENT_LABELS}")
    op.execute(
        "COMMENT ON VIEW current_labels IS 'Labels in force: for each (src, uri, val) the label with the latest cts, "
        "unless it is a negation or its exp has passed. Set indexer.now to view another moment.'"
    )


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_labels")
    op.drop_table('sync_events')
    op.drop_table('reposts')
    op.drop_table('records')
    op.drop_table('profiles')
    op.drop_table('posts')
    op.drop_table('likes')
    op.drop_table('labels')
    op.drop_table('identity_events')
    op.drop_table('gaps')
    op.drop_table('follows')
    op.drop_table('deletions')
    op.drop_table('dead_letters')
    op.drop_table('cursors')
    op.drop_table('blocks')
    op.drop_table('actors')
    op.drop_table('account_events')
