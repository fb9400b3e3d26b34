"""Where a study lives: the storage URL, connections to it, and database failures a user can act on.

A URL may hold a password: every message and stored record shows it redacted (`redact_url`). Driver
and server failures become one SolversearchError naming the redacted URL and what to check
(`database_errors`), so the CLI prints one line instead of a SQLAlchemy traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from ..errors import SolversearchError

DEFAULT_STORAGE = "sqlite:///solversearch.db"
STORAGE_ENV = "SOLVERSEARCH_STORAGE"
SCHEMA_RACE_ATTEMPTS = 8


def storage_url(url: str | None) -> str:
    """The storage URL to use: `url`, else $SOLVERSEARCH_STORAGE, else a local SQLite file.

    Keep passwords out of URLs written to files, experiment YAML or shell history: for PostgreSQL
    give `postgresql+psycopg2://user@host/db` and the password in PGPASSWORD (or ~/.pgpass), which
    libpq reads itself.
    """
    if url is not None and url.strip():
        return url.strip()
    return os.environ.get(STORAGE_ENV, "").strip() or DEFAULT_STORAGE


def redact_url(url: str) -> str:
    """`url` with its password (and any password query parameter) replaced by ***; safe to print or store."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any unparseable URL: redact conservatively by hand
        return _redact_unparseable(url)
    if "@" in (parsed.host or ""):  # an unescaped "@" in the password: the parser split it wrongly
        return _redact_unparseable(url)
    hidden = [k for k in parsed.query if "password" in k.lower()]
    if hidden:
        parsed = parsed.update_query_dict({k: "***" for k in hidden})
    # render_as_string percent-escapes the query's "***"; show it as the password's "***" is shown.
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDBStorage for `url` (tables created if needed); failures raise SolversearchError."""
    try:
        backend = make_url(url).get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise SolversearchError(
            f"{redact_url(url)} is not a valid database URL ({type(exc).__name__}); expected e.g. "
            "sqlite:///solversearch.db or postgresql+psycopg2://user@host:5432/db"
        ) from None
    with database_errors(url, "open the storage"), quiet_optuna():
        engine_kwargs: dict[str, Any] = {}
        if backend == "sqlite":
            engine_kwargs["connect_args"] = {"timeout": 30}  # parallel trial writers wait instead of failing
        elif backend == "postgresql":
            engine_kwargs["pool_pre_ping"] = True  # long searches outlive idle server-side connections
        return _create_tables_once(url, engine_kwargs)


def _create_tables_once(url: str, engine_kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """RDBStorage creates Optuna's tables on first use; when several processes open a fresh database
    at once (a search and a `show` beside it, or the workers of a cluster), all but one lose the race
    with "table ... already exists" or a duplicate alembic version. The winner's tables are then
    complete after a moment, so the losers open the database again instead of failing."""
    for attempt in range(1, SCHEMA_RACE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as exc:
            if not _lost_schema_race(exc):
                raise
            time.sleep(0.05 * attempt)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def _lost_schema_race(exc: sqlalchemy.exc.DBAPIError) -> bool:
    message = str(exc.orig).lower()
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in message


def require_existing_database(url: str) -> None:
    """Reading commands must not create an empty SQLite file where the user mistyped a path."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return  # open_storage reports it
    in_a_file = parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:"
    if in_a_file and not Path(parsed.database).exists():
        raise SolversearchError(f"no database at {redact_url(url)} (the file {parsed.database!r} does not exist)")


def backend_of(url: str) -> str:
    """The database kind of `url` ("sqlite", "postgresql", …); "" when it cannot be parsed."""
    try:
        return make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001 - an unparseable URL names no database kind
        return ""


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs every study creation at INFO; a search records thousands of trials, so raise its
    verbosity to WARNING while we write, then restore whatever the caller had set."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(previous, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


@contextlib.contextmanager
def database_errors(url: str, action: str) -> Iterator[None]:
    """Turn database and driver failures into a SolversearchError naming the redacted URL and a fix."""
    try:
        yield
    except ImportError as exc:  # Optuna wraps a missing DB driver (ModuleNotFoundError) in ImportError
        missing = getattr(exc.__cause__ or exc, "name", None) or str(exc.__cause__ or exc)
        raise SolversearchError(
            f"cannot {action} at {redact_url(url)}: its database driver is not installed ({missing}); install "
            "it, or for PostgreSQL use postgresql+psycopg2://… with solversearch[postgres] installed"
        ) from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise SolversearchError(
            f"cannot {action} at {redact_url(url)}: unknown database kind; use a URL such as "
            "sqlite:///solversearch.db or postgresql+psycopg2://user@host:5432/db (install solversearch[postgres])"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise SolversearchError(f"cannot {action} at {redact_url(url)}: {_reason(exc, url)}. {_hint(url)}") from None


def _reason(exc: BaseException, url: str) -> str:
    original = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = (str(original).strip().splitlines() or [type(original).__name__])[0]
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - an unparseable URL has no password to hide beyond redact_url's
        password = None
    return text.replace(str(password), "***") if password else text


def _hint(url: str) -> str:
    backend = backend_of(url)
    if backend == "sqlite":
        return "Check that the file's directory exists and is writable."
    if backend == "postgresql":
        return (
            "Is the server running and reachable, does the database exist, and is the password in PGPASSWORD? "
            "(the driver comes with solversearch[postgres])"
        )
    return "Is the server running and reachable?"


def _redact_unparseable(url: str) -> str:
    # No parser to trust: hide everything between the scheme and the last "@", keeping only a user
    # name that is clearly separated from a password.
    match = re.match(r"^(?P<scheme>[^:/@]*:/*)(?P<userinfo>.*)@(?P<rest>[^@]*)$", url, flags=re.DOTALL)
    if match is None:
        return url
    user, sep, _ = match["userinfo"].partition(":")
    userinfo = f"{user}:***" if sep and "/" not in user else "***"
    return f"{match['scheme']}{userinfo}@{match['rest']}"
