"""The database schema: one SQLAlchemy Core ``MetaData`` describing every table, and the views.

This module is the single description of the schema. Alembic migrations in ``migrations/`` are
written by hand to produce exactly this, and a test compares a migrated database with it.
Column and table comments become PostgreSQL comments, which psql (``\\d+``) and BI tools show, and
from which ``docs/schema.md`` is generated.

Conventions:
- Identifier columns (did, rkey, cid, rev, uri, collection, handle) use ``COLLATE "C"``: they are
  compared byte-wise, which is correct for them and faster than a linguistic collation.
- Every ``seq`` is BIGINT: relay sequence numbers are above 2^31 today.
- A record's identity is (did, collection, rkey). ``rev`` (a TID, ordered as text) gates every
  write: a create or update whose rev is not newer than the stored one changes nothing.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from indexer.events import DropReason

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = Text(collation="C")


def _now():
    return Column("indexed_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
                  comment="When this row was last written by the indexer.")


def _verification_columns(what: str) -> list[Column]:
    """The outcome of signature verification, shared by every table of signed data."""
    return [
        Column("verified", Boolean,
               comment=f"True when {what} verified, false when it failed, NULL when not checked (--verify off, or no key)."),
        Column("verify_reason", ID,
               comment="Why verified is false or NULL: a reason such as signature_mismatch, proof_mismatch, no_key."),
    ]


# What the verification columns of repo data cover: the commit signature by the account's #atproto
# key, the commit's did and rev, the Sync 1.1 proof, and the record block hashes.
COMMIT_CHECKS = "the signed commit that wrote it (signature, did, rev, MST proof, record hash)"


def _record_columns(collection: str) -> list[Column]:
    """Columns every typed record table shares, in this order."""
    return [
        Column("did", ID, nullable=False, comment="DID of the repository (the author)."),
        Column("rkey", ID, nullable=False, comment="Record key within the collection."),
        Column(
            "uri",
            ID,
            Computed(f"'at://' || did || '/{collection}/' || rkey", persisted=True),
            comment="AT-URI of the record (at://did/collection/rkey).",
        ),
        Column("cid", ID, nullable=False, comment="CID of the record version stored here."),
        Column("rev", ID, nullable=False, comment="Repo revision (TID) of the commit that wrote this version."),
        Column("seq", BigInteger, comment="Relay sequence number of that commit; NULL when it came from a repo export."),
        Column("created_at_raw", Text, comment="createdAt exactly as the client sent it (may be missing or invalid)."),
        Column(
            "created_at",
            DateTime(timezone=True),
            comment="createdAt parsed as UTC; NULL when missing, unparsable, without a timezone, or implausible.",
        ),
        Column("record", JSONB, nullable=False, comment="The whole record as atproto JSON ($link for CIDs, $bytes for bytes)."),
        _now(),
    ]


def _record_table(name: str, collection: str, comment: str, *extra: Column) -> Table:
    return Table(
        name,
        metadata,
        *_record_columns(collection),
        *extra,
        *_verification_columns(COMMIT_CHECKS),
        PrimaryKeyConstraint("did", "rkey"),
        comment=f"{comment} Collection {collection}; one row per existing record, latest version.",
    )


posts = _record_table(
    "posts",
    "app.bsky.feed.post",
    "Posts.",
    Column("text", Text, comment="Post text, with NUL characters removed."),
    Column("langs", ARRAY(Text), comment="Declared languages (BCP-47 tags)."),
    Column("reply_root_uri", ID, comment="AT-URI of the thread's root post, for replies."),
    Column("reply_root_cid", ID, comment="CID of the thread's root post, for replies."),
    Column("reply_parent_uri", ID, comment="AT-URI of the post replied to."),
    Column("reply_parent_cid", ID, comment="CID of the post replied to."),
    Column("quote_uri", ID, comment="AT-URI of the quoted record (embed record or recordWithMedia)."),
    Column("quote_cid", ID, comment="CID of the quoted record."),
    Column("embed_kind", ID, comment="Embed type: images, video, external, record, recordWithMedia, or another $type."),
    Column("facets", JSONB, comment="Rich-text facets (mentions, links, tags) as atproto JSON."),
    Column("embed", JSONB, comment="The embed as atproto JSON."),
    Column("self_labels", ARRAY(Text), comment="Self-applied label values (com.atproto.label.defs#selfLabels)."),
    Column("tags", ARRAY(Text), comment="Additional hashtags given outside the text."),
)

likes = _record_table(
    "likes",
    "app.bsky.feed.like",
    "Likes.",
    Column("subject_uri", ID, comment="AT-URI of the liked record."),
    Column("subject_cid", ID, comment="CID of the liked record."),
    Column("via_uri", ID, comment="AT-URI of the repost through which it was liked, if any."),
    Column("via_cid", ID, comment="CID of that repost."),
)

reposts = _record_table(
    "reposts",
    "app.bsky.feed.repost",
    "Reposts.",
    Column("subject_uri", ID, comment="AT-URI of the reposted record."),
    Column("subject_cid", ID, comment="CID of the reposted record."),
    Column("via_uri", ID, comment="AT-URI of the repost through which it was reposted, if any."),
    Column("via_cid", ID, comment="CID of that repost."),
)

follows = _record_table(
    "follows",
    "app.bsky.graph.follow",
    "Follows.",
    Column("subject_did", ID, comment="DID of the followed account."),
)

blocks = _record_table(
    "blocks",
    "app.bsky.graph.block",
    "Blocks between accounts (not CAR blocks).",
    Column("subject_did", ID, comment="DID of the blocked account."),
)

profiles = _record_table(
    "profiles",
    "app.bsky.actor.profile",
    "Profiles (record key 'self').",
    Column("display_name", Text, comment="Display name, with NUL characters removed."),
    Column("description", Text, comment="Profile description, with NUL characters removed."),
    Column("avatar_cid", ID, comment="CID of the avatar blob."),
    Column("banner_cid", ID, comment="CID of the banner blob."),
    Column("pinned_post_uri", ID, comment="AT-URI of the pinned post."),
    Column("pinned_post_cid", ID, comment="CID of the pinned post."),
)

records = Table(
    "records",
    metadata,
    Column("did", ID, nullable=False, comment="DID of the repository."),
    Column("collection", ID, nullable=False, comment="Collection NSID, for every collection without a typed table."),
    Column("rkey", ID, nullable=False, comment="Record key within the collection."),
    Column("uri", ID, Computed("'at://' || did || '/' || collection || '/' || rkey", persisted=True),
           comment="AT-URI of the record."),
    Column("cid", ID, nullable=False, comment="CID of the record version stored here."),
    Column("rev", ID, nullable=False, comment="Repo revision (TID) of the commit that wrote this version."),
    Column("seq", BigInteger, comment="Relay sequence number of that commit; NULL when it came from a repo export."),
    Column("created_at_raw", Text, comment="createdAt as sent, when the record has one."),
    Column("created_at", DateTime(timezone=True), comment="createdAt parsed as UTC; NULL when missing or invalid."),
    Column("record", JSONB, nullable=False, comment="The whole record as atproto JSON."),
    _now(),
    *_verification_columns(COMMIT_CHECKS),
    PrimaryKeyConstraint("did", "collection", "rkey"),
    comment="Records of every collection without a typed table (lists, feeds, threadgates, other apps).",
)

# Typed tables by collection NSID; every other collection goes to ``records``.
RECORD_TABLES: dict[str, Table] = {
    "app.bsky.feed.post": posts,
    "app.bsky.feed.like": likes,
    "app.bsky.feed.repost": reposts,
    "app.bsky.graph.follow": follows,
    "app.bsky.graph.block": blocks,
    "app.bsky.actor.profile": profiles,
}

deletions = Table(
    "deletions",
    metadata,
    Column("did", ID, nullable=False, comment="DID of the repository."),
    Column("collection", ID, nullable=False, comment="Collection NSID of the deleted record."),
    Column("rkey", ID, nullable=False, comment="Record key of the deleted record."),
    Column("uri", ID, Computed("'at://' || did || '/' || collection || '/' || rkey", persisted=True),
           comment="AT-URI of the deleted record."),
    Column("rev", ID, nullable=False, comment="Repo revision of the newest delete seen for this record."),
    Column("seq", BigInteger, comment="Relay sequence number of that delete; NULL when found by a repo resync."),
    Column("time", DateTime(timezone=True), comment="Event time of that delete, as stamped by the relay."),
    _now(),
    *_verification_columns("the signed commit of that delete (signature, did, rev, MST proof)"),
    PrimaryKeyConstraint("did", "collection", "rkey"),
    comment=(
        "Deleted records, also used as tombstones: a create or update with a rev not newer than "
        "the delete's rev is ignored, even when it arrives after the delete. A record re-created "
        "with a newer rev exists again and keeps its deletion row."
    ),
)

actors = Table(
    "actors",
    metadata,
    Column("did", ID, primary_key=True, comment="DID of the account."),
    Column("handle", ID, comment="Latest handle from an #identity event; 'handle.invalid' when it failed verification."),
    Column("active", Boolean, comment="Whether the account is active, from the latest #account event; NULL if none seen."),
    Column("status", ID, comment="Hosting status from the latest #account event (takendown, suspended, deleted, deactivated, ...)."),
    Column("rev", ID, comment="Newest repo revision seen in a commit."),
    Column("last_seq", BigInteger, comment="Sequence number of the newest event seen for this account."),
    Column("last_time", DateTime(timezone=True), comment="Event time of that event."),
    Column("identity_seq", BigInteger, comment="Sequence number of the event that set handle."),
    Column("account_seq", BigInteger, comment="Sequence number of the event that set active and status."),
    Column("desynchronized_at", DateTime(timezone=True),
           comment="Event time of the #sync event, or of the first commit that does not follow rev or data_cid, that "
                   "showed the repo must be refetched (the clock time when the event has no time); cleared by a resync."),
    Column("data_cid", ID, comment="MST root CID at rev (the commit's data); NULL when unknown. "
                                   "A newer commit whose prevData differs marks the repo desynchronized."),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the indexer last changed this row."),
    comment="One row per account seen on any stream, with its current handle, status and repo revision.",
)


def _history_table(name: str, comment: str, *columns: Column) -> Table:
    return Table(
        name,
        metadata,
        Column("endpoint", ID, nullable=False, comment="Stream endpoint URL the event came from."),
        Column("seq", BigInteger, nullable=False, comment="Sequence number of the event on that endpoint."),
        Column("did", ID, nullable=False, comment="DID of the account."),
        Column("time_raw", Text, comment="Event time as sent."),
        Column("time", DateTime(timezone=True), comment="Event time parsed as UTC."),
        *columns,
        _now(),
        PrimaryKeyConstraint("endpoint", "seq"),
        Index(None, "did", "seq"),
        comment=comment,
    )


identity_events = _history_table(
    "identity_events",
    "Append-only history of #identity events.",
    Column("handle", ID, comment="Handle in the event; NULL when the event carried none."),
)

account_events = _history_table(
    "account_events",
    "Append-only history of #account events.",
    Column("active", Boolean, nullable=False, comment="Whether the account is active."),
    Column("status", ID, comment="Hosting status; unknown values are kept as sent."),
)

sync_events = _history_table(
    "sync_events",
    "Append-only history of #sync events (a repo's state was reset; it must be refetched).",
    Column("rev", ID, nullable=False, comment="Revision the repo was reset to."),
    Column("commit_cid", ID, comment="CID of the commit block in the event, when readable."),
    *_verification_columns("the commit block's signature, did and rev"),
)

cursors = Table(
    "cursors",
    metadata,
    Column("endpoint", ID, nullable=False, comment="Stream endpoint URL, e.g. wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos."),
    Column("job", ID, nullable=False, server_default="live",
           comment="'live' for indexer run; a backfill job's name for its own replay position."),
    Column("seq", BigInteger, comment="Highest sequence number whose event and every earlier one are committed."),
    Column("target_seq", BigInteger, comment="For a backfill job, the sequence number at which it stops."),
    Column("start_seq", BigInteger, comment="For a backfill job, the sequence number it started from (its --cursor)."),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the cursor last moved."),
    Column("last_event_time", DateTime(timezone=True), comment="Event time of the event at seq, when it had one."),
    Column("events", BigInteger, nullable=False, server_default="0",
           comment="Events committed under this cursor so far (written or dead-lettered), over all runs."),
    PrimaryKeyConstraint("endpoint", "job"),
    comment="Stream positions, written in the same transaction as the rows of the events they cover.",
)

gaps = Table(
    "gaps",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("endpoint", ID, nullable=False, comment="Stream endpoint URL."),
    Column("from_seq", BigInteger, comment="Last sequence number we had (the cursor we asked with); NULL when none."),
    Column("to_seq", BigInteger, comment="First sequence number the server sent after the gap; NULL until one arrives."),
    Column("reason", ID, nullable=False, comment="Why: OutdatedCursor (the server no longer had our position)."),
    Column("message", Text, comment="The server's message, if any."),
    Column("detected_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    comment="Ranges of a stream that were lost because the server no longer retained them.",
)

# States of a repo in a backfill job. The last four are final errors returned by the PDS, so the same
# job does not fetch the repo again.
REPO_STATES = ("pending", "in_progress", "done", "failed", "deactivated", "takendown", "suspended", "not_found")

backfill_repos = Table(
    "backfill_repos",
    metadata,
    Column("job", ID, nullable=False,
           comment="Backfill job name: 'repos' (--repo, --repos-file), 'all' (--all), 'resync' (--desynchronized), or --job."),
    Column("did", ID, nullable=False, comment="DID of the repository."),
    Column("state", ID, nullable=False, server_default="pending",
           comment="pending, in_progress, done, failed (retried by the next run), or a final state: deactivated, takendown, suspended, not_found."),
    Column("rev", ID, comment="Revision of the repo export that was indexed, once done."),
    Column("records", BigInteger, comment="Number of records in that export."),
    Column("deleted", BigInteger, comment="Records indexed earlier but absent from that export, recorded as deletions."),
    Column("error", Text, comment="Why the last attempt failed, or the PDS's error name and message for a final state."),
    Column("attempts", Integer, nullable=False, server_default="0", comment="Fetch attempts so far, over all runs."),
    Column("pds_endpoint", ID, comment="PDS the repo was fetched from, as resolved from the DID document."),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the repo was added to the job."),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the state last changed."),
    PrimaryKeyConstraint("job", "did"),
    CheckConstraint(f"state IN ({', '.join(repr(state) for state in REPO_STATES)})", name="state"),
    Index(None, "job", "state"),
    comment="Per-repo progress of repo backfill jobs (getRepo), so a job resumes where it stopped.",
)

backfill_listings = Table(
    "backfill_listings",
    metadata,
    Column("endpoint", ID, nullable=False, comment="listRepos URL of the relay being enumerated."),
    Column("job", ID, nullable=False, comment="Backfill job the listed repos were added to."),
    Column("cursor", Text, comment="listRepos cursor to continue from; NULL before the first page."),
    Column("repos", BigInteger, nullable=False, server_default="0", comment="Repos listed so far."),
    Column("completed_at", DateTime(timezone=True), comment="When the last page was read; NULL while unfinished."),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the cursor last moved."),
    PrimaryKeyConstraint("endpoint", "job"),
    comment="Position of a paged listRepos enumeration (backfill --all), so an interrupted one resumes.",
)

did_documents = Table(
    "did_documents",
    metadata,
    Column("did", ID, primary_key=True, comment="DID (did:plc or did:web)."),
    Column("document", JSONB, comment="The last DID document resolved successfully; NULL if none ever was."),
    Column("pds_endpoint", ID, comment="serviceEndpoint of the #atproto_pds service in that document."),
    Column("handle", ID, comment="First at:// handle in alsoKnownAs (not verified against the handle's DNS or well-known)."),
    Column("signing_key", Text, comment="publicKeyMultibase of the #atproto verification method."),
    Column("resolved_at", DateTime(timezone=True), comment="When document was fetched."),
    Column("checked_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When resolution was last attempted; with the cache TTL it decides when to resolve again."),
    Column("error", Text, comment="Why the last attempt failed; NULL when it succeeded."),
    Column("source_url", Text, comment="URL of the last resolution attempt (PLC directory or did:web well-known); a cached "
                                       "failure is reused only while the DID resolves through the same URL."),
    comment="Cache of resolved DID documents (PLC directory or did:web), with their PDS endpoint and handle.",
)

DROP_REASONS = tuple(reason.value for reason in DropReason)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("endpoint", ID, nullable=False, comment="Stream endpoint URL, or 'repo' for repo exports."),
    Column("seq", BigInteger, comment="Sequence number of the frame, when it could be read."),
    Column("did", ID, comment="DID of the repository, when it could be read."),
    Column("t", ID, comment="Message type from the frame header, when it could be read."),
    Column("path", ID, comment="collection/rkey of the op, for a failure confined to one op of a commit."),
    Column("reason", ID, nullable=False, comment="Why it was dropped: one of the closed set of drop reasons."),
    Column("error", Text, nullable=False, comment="The decoder's or writer's error message."),
    Column("raw", LargeBinary, comment="The raw frame (or record block for an op failure), for retry and inspection."),
    Column("digest", LargeBinary, nullable=False,
           comment="SHA-256 identifying this failure, so a replayed frame is dead-lettered once."),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(f"reason IN ({', '.join(repr(r) for r in DROP_REASONS)})", name="reason"),
    Index(None, "endpoint", "digest", unique=True),
    Index(None, "reason", "created_at"),
    comment="Inputs that could not be decoded or stored, kept with their raw bytes; the stream went on past them.",
)

labels = Table(
    "labels",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("endpoint", ID, nullable=False, comment="Labeler stream endpoint URL the label came from."),
    Column("seq", BigInteger, nullable=False, comment="Sequence number of the #labels frame on that endpoint."),
    Column("ver", Integer, comment="Label format version (1); NULL when absent."),
    Column("src", ID, nullable=False, comment="DID of the labeler that issued the label."),
    Column("uri", ID, nullable=False, comment="Subject: an AT-URI of a record, or a DID for an account."),
    Column("subject_did", ID, comment="DID of the subject account (the uri itself, or the repo in an AT-URI)."),
    Column("cid", ID, comment="CID of the specific record version labeled; NULL for all versions or an account."),
    Column("val", Text, nullable=False, comment="Label value, e.g. !takedown, porn, spam."),
    Column("neg", Boolean, nullable=False, server_default="false",
           comment="True when this label negates (removes) an earlier one; absent upstream means false."),
    Column("cts_raw", Text, nullable=False, comment="Creation timestamp as sent."),
    Column("cts", DateTime(timezone=True), comment="Creation timestamp parsed as UTC; NULL when invalid."),
    Column("exp_raw", Text, comment="Expiry timestamp as sent; NULL when the label does not expire."),
    Column("exp", DateTime(timezone=True), comment="Expiry parsed as UTC."),
    Column("sig", LargeBinary, comment="Signature bytes, exactly as received."),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the indexer received the label."),
    *_verification_columns("sig, checked against the #atproto_label key of the labeler (src)"),
    Index(None, "src", "uri", "cid", "val", "neg", "cts_raw", unique=True, postgresql_nulls_not_distinct=True),
    Index(None, "src", "uri", "val", "cts"),
    Index(None, "uri"),
    Index(None, "subject_did"),
    comment=(
        "Append-only history of every label received from every labeler, negations included. "
        "A label re-sent on replay (same src, uri, cid, val, neg and cts) is stored once."
    ),
)

BACKLOG_KINDS = ("commit", "sync", "labels")

verification_backlog = Table(
    "verification_backlog",
    metadata,
    Column("endpoint", ID, nullable=False, comment="Stream endpoint URL the event came from."),
    Column("seq", BigInteger, nullable=False, comment="Sequence number of the event on that endpoint."),
    Column("kind", ID, nullable=False, comment="What was signed: commit, sync or labels."),
    Column("did", ID, nullable=False,
           comment="DID whose key signs the event: the account, or for labels the labeler of the first one."),
    Column("work", LargeBinary, nullable=False,
           comment="What the checks need (the commit's blocks and ops, or the labels), as DAG-CBOR."),
    Column("attempts", Integer, nullable=False, server_default="0",
           comment="Re-checks that still found no key."),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now(),
           comment="When the event was stored unchecked."),
    Column("checked_at", DateTime(timezone=True), comment="Time of the last re-check; NULL before the first."),
    PrimaryKeyConstraint("endpoint", "seq"),
    CheckConstraint(f"kind IN ({', '.join(repr(kind) for kind in BACKLOG_KINDS)})", name="kind"),
    comment=(
        "Events stored with verified NULL (no_key) because the signer's key was unknown when they were "
        "indexed. indexer run checks them again with a growing wait; once a key is found it sets verified "
        "on their rows and deletes them here, and after 12 checks without one it deletes them too."
    ),
)

# The clock of the current_labels view: now(), unless the session sets indexer.now (tests do).
VIEW_CLOCK = "COALESCE(NULLIF(current_setting('indexer.now', true), '')::timestamptz, now())"

# Views are not SQLAlchemy tables; migrations create them from this SQL.
VIEWS: dict[str, str] = {
    "current_labels": f"""
SELECT id, endpoint, seq, ver, src, uri, subject_did, cid, val, cts_raw, cts, exp_raw, exp, sig, received_at,
       verified, verify_reason
FROM (
    -- Explicit columns: with * the view would depend on every column of labels.
    SELECT DISTINCT ON (src, uri, val) id, endpoint, seq, ver, src, uri, subject_did, cid, val, cts_raw, cts,
           exp_raw, exp, sig, received_at, verified, verify_reason, neg
    FROM labels
    ORDER BY src, uri, val, cts DESC NULLS LAST, neg DESC, id DESC
) AS latest
WHERE NOT neg AND (exp IS NULL OR exp > {VIEW_CLOCK})
""",
}
