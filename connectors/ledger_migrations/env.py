"""Alembic's environment for the job ledger: one transaction, under a lock.

The engine comes from ``config.attributes["engine"]`` (``connectors.ledger_schema`` passes the
ledger's own, with its SQLite pragmas) or else from the ``sqlalchemy.url`` option. The lock is
taken first, in the transaction that then runs every pending revision, so that workers
upgrading at the same time take turns and the later ones find nothing left to do:
PostgreSQL ``pg_advisory_xact_lock`` (released at commit or rollback, also when the process
dies), SQLite ``BEGIN IMMEDIATE`` (the database's write lock).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool, text
from sqlmodel import SQLModel

import pipeline.ledger  # noqa: F401  (registers the ledger's tables in SQLModel.metadata)

# A fixed key of the advisory lock: any 64-bit number no other application on the same
# PostgreSQL database uses (here the ASCII of "medvlmdb").
MIGRATION_LOCK_KEY = 0x6D6564766C6D6462

config = context.config
target_metadata = SQLModel.metadata


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: the SQL for a DBA to review, nothing executed."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        url = config.get_main_option("sqlalchemy.url") or ""
        engine = create_engine(url, poolclass=pool.NullPool)
    # SQLAlchemy's transaction (``connection.begin``) is a no-op on the wire for pysqlite; the
    # lock statement opens the database's. Alembic joins this transaction.
    with engine.connect() as connection, connection.begin():
        _lock(connection)
        context.configure(connection=connection, target_metadata=target_metadata)
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
