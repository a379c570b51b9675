"""Where a study lives: a journal file (the default, also on a shared filesystem) or a PostgreSQL or SQLite URL.

Both kinds come with a lock that every worker of the study takes while it
picks its next trial, so a study never gets more than --n_trials trials and
no grid point is handed out twice: Optuna's own `optimize` counts trials per
worker and lets concurrent workers pick the same grid point.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import ContextManager

from cnn.errors import ConfigError

JOURNAL = "journal.log"  # the default storage, in --workdir
_SCHEMES = ("postgresql", "sqlite")
_PG_LOCK_KEY = 0x636E6E  # one advisory lock per database: it also covers creating Optuna's tables


def resolve(spec: str | None, workdir: str) -> str:
    """--storage as trial processes and other machines need it: a URL as given, a journal file's absolute path."""
    if spec is None:
        return os.path.join(os.path.abspath(workdir), JOURNAL)
    if "://" not in spec:
        return os.path.abspath(spec)
    scheme = spec.split("://", 1)[0].split("+", 1)[0]
    if scheme not in _SCHEMES:
        raise ConfigError(f"--storage={spec!r}: use a postgresql:// or sqlite:/// URL, or the path of a journal file")
    if scheme == "sqlite" and _sqlite_path(spec) in ("", ":memory:"):
        raise ConfigError(f"--storage={spec!r} is in memory, which trial processes cannot share; "
                          "name a file: sqlite:///PATH")
    return spec


def shown(spec: str) -> str:
    """The storage as printed and written to trial.json: without a password."""
    if "://" not in spec:
        return spec
    import sqlalchemy

    return sqlalchemy.engine.make_url(spec).render_as_string(hide_password=True)


def _sqlite_path(url: str) -> str:
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).database or ""


def open_storage(spec: str):
    """The Optuna storage `spec` (from `resolve`) names; a storage that cannot be opened is a ConfigError."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    try:
        if "://" in spec:
            return optuna.storages.RDBStorage(spec)
        return optuna.storages.JournalStorage(JournalFileBackend(spec))
    except Exception as e:  # noqa: BLE001 - sqlalchemy's, the driver's and the filesystem's errors alike
        raise _unusable(spec, e) from None


def _unusable(spec: str, e: Exception) -> ConfigError:
    if isinstance(e, ModuleNotFoundError):  # SQLAlchemy's driver for the URL
        wheel = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary"}.get(e.name, e.name)
        return ConfigError(f"--storage={shown(spec)!r} needs the Python package {e.name!r}, SQLAlchemy's driver for "
                           f"it: pip install {wheel}")
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    spec = shown(spec)
    return ConfigError(f"--storage={spec!r} could not be opened ({detail}); check the address, or that the "
                       "journal file's folder exists")


def claim_lock(spec: str) -> Callable[[], ContextManager[None]]:
    """A lock shared by every worker of the study in `spec`; a dead holder's lock is released with it.

    A file lock beside a journal or SQLite file (flock, which NFS supports),
    a session advisory lock in PostgreSQL.
    """
    if spec.startswith("postgresql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(spec, poolclass=sqlalchemy.pool.NullPool)
        except Exception as e:  # noqa: BLE001 - a missing driver, a malformed URL
            raise _unusable(spec, e) from None

        @contextlib.contextmanager
        def pg_lock() -> Iterator[None]:
            try:
                connection = engine.connect()
            except Exception as e:  # noqa: BLE001 - no server, a wrong password
                raise _unusable(spec, e) from None
            with connection:  # closing the session releases the lock
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
                yield

        return pg_lock
    path = (_sqlite_path(spec) if "://" in spec else spec) + ".claim"

    @contextlib.contextmanager
    def file_lock() -> Iterator[None]:
        try:
            f = open(path, "a")
        except OSError as e:
            raise _unusable(spec, e) from None
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    return file_lock
