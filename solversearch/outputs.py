"""Output files: checked before any work starts, and written atomically.

A command checks every path it will write (`output_file`, `output_folder`) before it loads a model or
starts a search, so a typo costs nothing; and it writes through `atomic_output`, so a failure (a full
disk, a read-only folder, an interrupted process, an exception in the writer) leaves neither a
half-written file nor a temporary one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import SolversearchError


def output_file(path: str | Path, option: str = "--out", suffixes: Sequence[str] = ()) -> Path:
    """`path` if a file can be written there: not a folder, in an existing writable folder, with one of
    `suffixes` (case-insensitive) when given."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SolversearchError(f"{option}: {str(path)!r} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise SolversearchError(f"{option}: {str(path)!r} must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise SolversearchError(f"{option}: the folder {str(path.parent)!r} does not exist")
    _writable(path.parent, option)
    return path


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` if files can be written in it: an existing writable folder, or one that can be made (its
    nearest existing ancestor is a writable folder). Nothing is created here."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SolversearchError(f"{option}: {str(path)!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SolversearchError(f"{option}: cannot make the folder {str(path)!r}: {str(existing)!r} is a file")
    _writable(existing, option)
    return path


def _writable(folder: Path, option: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SolversearchError(f"{option}: the folder {str(folder)!r} is not writable")


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, so writers that infer the format from it see
    the real one); when the block ends without an error it replaces `path` in one rename, otherwise
    it is removed and `path` is left as it was. A failing write is a SolversearchError naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SolversearchError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
