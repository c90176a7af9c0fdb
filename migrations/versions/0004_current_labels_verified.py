"""Show the verification outcome in the current_labels view.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

The view gains labels.verified and labels.verify_reason as its last columns, so that a moderator
can keep only labels whose signature checked out. The SQL is spelled out here rather than imported,
so that later changes to indexer.schema do not rewrite this migration's effect.
"""

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

CLOCK = "COALESCE(NULLIF(current_setting('indexer.now', true), '')::timestamptz, now())"

COLUMNS_0001 = "id, endpoint, seq, ver, src, uri, subject_did, cid, val, cts_raw, cts, exp_raw, exp, sig, received_at"


def body(columns: str) -> str:
    """The view's FROM and WHERE, reading only ``columns`` (and neg) of labels.

    The inner column list is explicit: with ``SELECT *`` the view would depend on every column of
    labels, and no migration could drop one of them.
    """
    return f"""
FROM (
    SELECT DISTINCT ON (src, uri, val) {columns}, neg
    FROM labels
    ORDER BY src, uri, val, cts DESC NULLS LAST, neg DESC, id DESC
) AS latest
WHERE NOT neg AND (exp IS NULL OR exp > {CLOCK})
"""

COMMENT = (
    "COMMENT ON VIEW current_labels IS 'Labels in force: for each (src, uri, val) the label with the latest cts, "
    "unless it is a negation or its exp has passed. Set indexer.now to view another moment.'"
)


def upgrade() -> None:
    # CREATE OR REPLACE may add columns at the end of a view, which keeps dependent objects valid.
    columns = f"{COLUMNS_0001}, verified, verify_reason"
    op.execute(f"CREATE OR REPLACE VIEW current_labels AS SELECT {columns} {body(columns)}")
    op.execute(COMMENT)


def downgrade() -> None:
    # A view cannot lose columns through CREATE OR REPLACE, so it is dropped and created again.
    op.execute("DROP VIEW current_labels")
    op.execute(f"CREATE VIEW current_labels AS SELECT {COLUMNS_0001} {body(COLUMNS_0001)}")
    op.execute(COMMENT)
