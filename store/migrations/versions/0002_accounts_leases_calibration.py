"""API tokens, task leases (assignment) and judge calibrations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 23:00:10.052042
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('api_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('last_used_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotator.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash', name='uq_api_token_hash')
    )
    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_token_annotator_id'), ['annotator_id'], unique=False)

    op.create_table('judge_calibration',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('n_tasks', sa.Integer(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotator.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('judge_calibration', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judge_calibration_annotator_id'), ['annotator_id'], unique=False)

    op.create_table('task_lease',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('shown_order', sa.JSON(), nullable=False),
    sa.Column('state', sa.Enum('active', 'submitted', 'skipped', 'expired', name='leasestate', native_enum=False, length=16), nullable=False),
    sa.Column('leased_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['annotator_id'], ['annotator.id'], ),
    sa.ForeignKeyConstraint(['task_id'], ['task.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task_id', 'annotator_id', name='uq_task_lease_task_annotator')
    )
    with op.batch_alter_table('task_lease', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_task_lease_annotator_id'), ['annotator_id'], unique=False)
        batch_op.create_index('ix_task_lease_state_expires', ['state', 'expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_task_lease_task_id'), ['task_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('task_lease', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_task_lease_task_id'))
        batch_op.drop_index('ix_task_lease_state_expires')
        batch_op.drop_index(batch_op.f('ix_task_lease_annotator_id'))

    op.drop_table('task_lease')
    with op.batch_alter_table('judge_calibration', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judge_calibration_annotator_id'))

    op.drop_table('judge_calibration')
    with op.batch_alter_table('api_token', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_token_annotator_id'))

    op.drop_table('api_token')

