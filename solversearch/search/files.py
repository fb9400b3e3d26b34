"""Reading the project's YAML files with one clear error for every way that can fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import SolversearchError


def read_yaml(path: Path, error: type[SolversearchError], what: str) -> Any:
    """The parsed document; an unreadable file or invalid YAML raises `error` naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise error(f"{path}: the {what} is nested too deeply to read") from None
