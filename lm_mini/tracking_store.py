"""Opening an MLflow tracking store: the one way every command (train, eval, compare, sweep) gets its client.

A fresh ``sqlite:`` store is made by MLflow running ~50 alembic migrations on the new file, and SQLite does not
run them as one transaction: a process stopped among them (a preemption, ``scancel`` or Ctrl-C of a just-started
job, torchrun ending rank 0 because another rank failed) left a file that MLflow can never open again ("table
assessments already exists"). So a store that does not exist yet is built beside its place under a lock
(``.<name>.tmp-<pid>``: MLflow's own table creation and migrations) and linked into place complete
(:func:`prepare_store`); MLflow opens a file whose tables are all there at its schema's head revision as it is,
with no migration. A store left half-created by an older version (or another tool) that holds no runs is
refused in one line saying what to delete. Stores that are not SQLite files (a tracking server, another
database) are opened as MLflow opens them.

Light on purpose: MLflow and SQLAlchemy are imported when a store is opened.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

STALE_TMP_S = 600.0  # a store under construction older than this was left by a killed process: removed


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking store cannot be used (a server that does not answer, a broken store file)."""


def sqlite_file(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:`` URI (relative to the working directory, as SQLAlchemy takes it); None for
    any other store and for an in-memory database."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" and not database.startswith("file:") else None


def mlflow_client(uri: str, create: bool = False) -> "MlflowClient":
    """``MlflowClient(uri)`` after :func:`prepare_store`: with ``create``, a missing SQLite store is made (atomically);
    without it, a missing one is a :class:`TrackingUnavailable` (MLflow would silently make an empty store there)."""
    prepare_store(uri, create)
    from mlflow import MlflowClient

    return MlflowClient(uri)


def prepare_store(uri: str, create: bool = True) -> None:
    """Make sure a ``sqlite:`` store at ``uri`` can be opened: create it complete when it does not exist (or is an
    empty file), refuse a half-created one (:class:`TrackingUnavailable`, naming the file to delete). Other stores:
    nothing to do."""
    path = sqlite_file(uri)
    if path is None:
        return
    if path.is_file() and path.stat().st_size > 0:
        _check_complete(path)
        return
    if not create:
        raise TrackingUnavailable(f"no MLflow store at {path}: the file does not exist (the tracking URI is {uri})")
    from mlflow.utils.file_utils import ExclusiveFileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    key = hashlib.md5(str(path.resolve()).encode(), usedforsecurity=False).hexdigest()
    # the lock saves other processes of this machine the work; the no-clobber link below is what keeps a store whole
    with ExclusiveFileLock(os.path.join(tempfile.gettempdir(), f"lm_mini-store-{key}.lock")):
        _remove_stale_tmp(path)
        if path.is_file() and path.stat().st_size > 0:  # made meanwhile by another process
            _check_complete(path)
            return
        _create(uri, path)


def _tmp_files(path: Path) -> list:
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def _remove_stale_tmp(path: Path) -> None:
    """Stores under construction that a killed process left beside ``path`` (and their journals)."""
    now = time.time()
    for tmp in _tmp_files(path):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _create(uri: str, path: Path) -> None:
    """MLflow's tables and migrations in ``.<name>.tmp-<pid>`` beside ``path``, then the file linked to ``path``."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables
    from sqlalchemy.engine import make_url

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    log.info("creating the MLflow store %s", path)
    engine = sqlalchemy.create_engine(make_url(uri).set(database=str(tmp)))
    try:
        _initialize_tables(engine)  # what SqlAlchemyStore runs on an empty database
        engine.dispose()
        try:
            if path.exists():  # an empty file (never initialised): replaced, it holds nothing
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # fails if another machine's process put a store there meanwhile: that one is kept
        except FileExistsError:
            _check_complete(path)
        except OSError as e:  # a file system without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.replace(tmp, path)
    finally:
        engine.dispose()
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            leftover.unlink(missing_ok=True)


def _check_complete(path: Path) -> None:
    """Refuse a store that is not at MLflow's schema head, has missing tables, and holds no runs: the state an
    interrupted first creation leaves (MLflow would crash on it at every start). A store holding runs is
    MLflow's to open (or to ask for ``mlflow db upgrade``)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            stamp = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
            runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            db.close()
    except sqlite3.DatabaseError as e:  # not a database at all, or locked for longer than sqlite waits
        raise TrackingUnavailable(f"{path}: cannot read this MLflow store ({e})") from None
    revision = stamp[0] if stamp else None
    import mlflow.store.db.utils as db_utils  # importing it registers every table with Base.metadata
    from mlflow.store.db.base_sql_model import Base

    expected = set(Base.metadata.tables)
    head = db_utils._get_latest_schema_revision()
    if runs or (expected <= tables and revision == head) or not _known_revision(revision):
        return
    missing = len(expected - tables)
    raise TrackingUnavailable(
        f"{path} was left half-created by an interrupted first run (MLflow schema revision {revision or 'none'} of "
        f"{head}, {missing} of {len(expected)} tables missing) and holds no runs: delete it (rm {path}) and run again")


def _known_revision(revision: Optional[str]) -> bool:
    """No revision yet (the first migration did not finish), or one of this MLflow's (not a newer MLflow's store)."""
    if revision is None:
        return True
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        return ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision) is not None
    except Exception:  # alembic's "no such revision"
        return False
