"""The assignment queue: one row per task, marked full once its slots are taken.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 23:22:41.221146
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('task_queue',
    sa.Column('task_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('kind', sa.Enum('pairwise', 'listwise', 'binary', name='taskkind', native_enum=False, length=16), nullable=False),
    sa.Column('gold', sa.Boolean(), nullable=False),
    sa.Column('minus_priority', sa.Integer(), nullable=False),
    sa.Column('full', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['task.id'], ),
    sa.PrimaryKeyConstraint('task_id')
    )
    with op.batch_alter_table('task_queue', schema=None) as batch_op:
        batch_op.create_index('ix_task_queue_pick', ['kind', 'gold', 'full', 'minus_priority', 'task_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('task_queue', schema=None) as batch_op:
        batch_op.drop_index('ix_task_queue_pick')

    op.drop_table('task_queue')
