"""Store Python None in nullable JSON columns as SQL NULL, not the JSON literal null.

The models now declare JSON(none_as_null=True); this converts rows written before, so that
`IS NULL` filters (e.g. tasks without a gold answer) see them. audit_event is left as written:
it is append-only by design, and its rows are history.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NULLABLE_JSON = {
    "annotator": ("config",),
    "round": ("config", "metrics"),
    "completion": ("generation",),
    "task": ("gold",),
    "label": ("ranks", "ratings", "shown_order", "details"),
}


def upgrade() -> None:
    for table, columns in NULLABLE_JSON.items():
        for column in columns:
            op.execute(
                f'UPDATE "{table}" SET {column} = NULL '
                f"WHERE {column} IS NOT NULL AND CAST({column} AS TEXT) = 'null'"
            )


def downgrade() -> None:
    # Both spellings of "no value" read back as None; nothing to undo.
    pass
