"""The job ledger's schema revision: Alembic migrations, run and checked.

The migrations live in ``connectors/ledger_migrations``. An embedded SQLite ledger (one user)
is upgraded when it is opened; a PostgreSQL ledger, shared by workers, only on request
(``medvlm db upgrade``, e.g. once per release before the workers start): opening one that is
behind raises ``LedgerSchemaBehindError`` instead. A ledger made before migrations existed
(tables, no ``alembic_version``) is upgraded from the start: the first revision adopts its
tables and rows.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from medvlm.errors import LedgerSchemaBehindError, LedgerUnavailableError

_MIGRATIONS = Path(__file__).with_name("ledger_migrations")


def alembic_config(engine: Engine) -> Config:
    """Alembic's configuration for this ledger (no alembic.ini: everything is here)."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["engine"] = engine  # not its URL: the password stays out of the config
    return config


def head_revision() -> str:
    """The revision this release's code needs."""
    head = ScriptDirectory(str(_MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def _require_known(engine: Engine, current: str | None) -> None:
    """A ledger migrated by a newer release is not this release's to open or migrate."""
    known = {script.revision for script in ScriptDirectory(str(_MIGRATIONS)).walk_revisions()}
    if current is not None and current not in known:
        raise LedgerSchemaBehindError(
            f"job ledger ({engine.url.get_backend_name()}) is at revision {current}, which "
            f"this release does not know (it needs {head_revision()}): a newer release "
            "migrated it"
        )


def current_revision(engine: Engine) -> str | None:
    """The ledger's revision, None for an empty database or one made before migrations."""
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise LedgerUnavailableError(
            f"job ledger ({engine.url.get_backend_name()}): {type(exc).__name__}"
        ) from exc


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the ledger to the head revision; returns (revision before, revision now).

    Safe to run from several processes at once (env.py takes a lock first).
    """
    before = current_revision(engine)
    _require_known(engine, before)
    try:
        command.upgrade(alembic_config(engine), "head")
    except SQLAlchemyError as exc:
        raise LedgerUnavailableError(
            f"job ledger ({engine.url.get_backend_name()}): migration failed: {type(exc).__name__}"
        ) from exc
    return before, head_revision()


def require_head(engine: Engine) -> None:
    """Raise ``LedgerSchemaBehindError`` unless the ledger is at the head revision."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    _require_known(engine, current)
    backend = engine.url.get_backend_name()
    found = f"revision {current}" if current else "no revision (new, or made before migrations)"
    raise LedgerSchemaBehindError(
        f"job ledger ({backend}) is at {found}, this release needs "
        f"{head}: run `medvlm db upgrade` (once, before the workers start)"
    )
