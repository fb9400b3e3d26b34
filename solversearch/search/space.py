"""Search spaces: which decisions of a solver schedule a search may change, read from YAML.

A space never fixes the NFE budget (the experiment or the command line does). `solver:` set to a
preset name makes a timesteps-only space: the per-step decisions are that preset's on whatever times
the search proposes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import SolversearchError
from ..grids import GRIDS
from ..presets import PRESETS
from ..schedule import CORRECTORS, FIRST_STEPS, MAX_ORDER, PREDICTIONS, SCALINGS
from .files import read_yaml

DERIVATIVES = ("full", "low")  # low: the first derivative from the most recent point only (USF's low-order estimate)


class SpaceError(SolversearchError):
    """A search-space file is invalid."""


@dataclass(frozen=True)
class TimestepSpace:
    """Times are searched in log-SNR λ between λ(t_start) and λ(t_min); t_end is one of `t_end` (0 = σ = 0)."""

    t_start: tuple[float, ...] = (1.0,)
    t_end: tuple[float, ...] = (1e-3,)
    t_min: float = 1e-3
    local_shift: float = 0.3  # std of a local move, as a fraction of the smaller neighbouring λ step
    init_grids: tuple[str, ...] = ("logsnr", "time_quadratic", "time_uniform", "karras")


@dataclass(frozen=True)
class SkipSpace:
    """Per-step network blocks a search may skip (filled by the pruning searcher)."""

    max_ratio: float = 0.1  # largest fraction of prunable units skipped at one step
    units: tuple[str, ...] = ()  # empty: every prunable unit of the model


@dataclass(frozen=True)
class SearchSpace:
    name: str
    timesteps: TimestepSpace = field(default_factory=TimestepSpace)
    solver: str | None = None  # a preset name: timesteps-only space
    predictions: tuple[str, ...] = PREDICTIONS
    orders: tuple[int, ...] = (1, 2, 3)
    derivatives: tuple[str, ...] = DERIVATIVES
    scalings: tuple[str, ...] = SCALINGS
    linear_range: tuple[float, float] = (-1.0, 1.0)
    correctors: tuple[str, ...] = CORRECTORS
    first_steps: tuple[str, ...] = ("model",)
    skip: SkipSpace | None = None

    @property
    def fixed_solver(self) -> bool:
        return self.solver is not None

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (stored with a study so a resumed search can check it is the same)."""

        def plain(value: Any) -> Any:
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return plain(self)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    doc = read_yaml(path, SpaceError, "search space")
    try:
        return space_from_dict(doc, default_name=path.stem)
    except SpaceError as exc:
        raise SpaceError(f"{path}: {exc}") from None


def space_from_dict(doc: Any, default_name: str = "space") -> SearchSpace:
    if not isinstance(doc, Mapping):
        raise SpaceError("a search space must be a mapping")
    known = {f.name for f in fields(SearchSpace)}
    _no_unknown(doc, known, "")
    timesteps = _timesteps(doc.get("timesteps", {}))
    skip = _skip(doc["skip"]) if doc.get("skip") is not None else None
    solver = doc.get("solver")
    if solver is not None and solver not in PRESETS:
        raise SpaceError(f"solver: unknown preset {solver!r}; expected one of {sorted(PRESETS)}")
    space = SearchSpace(
        name=str(doc.get("name", default_name)),
        timesteps=timesteps,
        solver=solver,
        predictions=_choices(doc, "predictions", PREDICTIONS),
        orders=_choices(doc, "orders", tuple(range(1, MAX_ORDER + 1)), default=(1, 2, 3)),
        derivatives=_choices(doc, "derivatives", DERIVATIVES),
        scalings=_choices(doc, "scalings", SCALINGS),
        linear_range=_range(doc.get("linear_range", (-1.0, 1.0)), "linear_range"),
        correctors=_choices(doc, "correctors", CORRECTORS),
        first_steps=_choices(doc, "first_steps", FIRST_STEPS, default=("model",)),
        skip=skip,
    )
    if 1 not in space.orders:
        raise SpaceError("orders: must include 1 (the first step has no history)")
    return space


def _timesteps(doc: Any) -> TimestepSpace:
    if not isinstance(doc, Mapping):
        raise SpaceError("timesteps: must be a mapping")
    _no_unknown(doc, {f.name for f in fields(TimestepSpace)}, "timesteps.")
    default = TimestepSpace()
    t_start = _floats(doc.get("t_start", default.t_start), "timesteps.t_start")
    t_end = _floats(doc.get("t_end", default.t_end), "timesteps.t_end")
    t_min = float(doc.get("t_min", min([t for t in t_end if t > 0], default=default.t_min)))
    if any(not 0 < t <= 1 for t in t_start):
        raise SpaceError(f"timesteps.t_start: values must be in (0, 1], got {list(t_start)}")
    if any(not 0 <= t < min(t_start) for t in t_end):
        raise SpaceError(f"timesteps.t_end: values must be in [0, min(t_start)), got {list(t_end)}")
    if not 0 < t_min <= min([t for t in t_end if t > 0], default=t_min):
        raise SpaceError(f"timesteps.t_min: must be positive and ≤ every positive t_end, got {t_min}")
    grids = tuple(doc.get("init_grids", default.init_grids))
    unknown = [g for g in grids if g not in GRIDS]
    if unknown:
        raise SpaceError(f"timesteps.init_grids: unknown grids {unknown}; expected some of {sorted(GRIDS)}")
    shift = float(doc.get("local_shift", default.local_shift))
    if not 0 < shift <= 1:
        raise SpaceError(f"timesteps.local_shift: must be in (0, 1], got {shift}")
    return TimestepSpace(t_start=t_start, t_end=t_end, t_min=t_min, local_shift=shift, init_grids=grids)


def _skip(doc: Any) -> SkipSpace:
    if not isinstance(doc, Mapping):
        raise SpaceError("skip: must be a mapping")
    _no_unknown(doc, {f.name for f in fields(SkipSpace)}, "skip.")
    ratio = float(doc.get("max_ratio", SkipSpace.max_ratio))
    if not 0 < ratio <= 1:
        raise SpaceError(f"skip.max_ratio: must be in (0, 1], got {ratio}")
    units = doc.get("units", ())
    if not isinstance(units, (list, tuple)) or not all(isinstance(u, str) for u in units):
        raise SpaceError("skip.units: must be a list of unit names")
    return SkipSpace(max_ratio=ratio, units=tuple(units))


def _choices(doc: Mapping[str, Any], key: str, allowed: tuple, default: tuple | None = None) -> tuple:
    value = doc.get(key, default if default is not None else allowed)
    if not isinstance(value, (list, tuple)) or not value:
        raise SpaceError(f"{key}: must be a non-empty list, got {value!r}")
    bad = [v for v in value if v not in allowed]
    if bad:
        raise SpaceError(f"{key}: unknown values {bad}; expected some of {list(allowed)}")
    return tuple(dict.fromkeys(value))


def _floats(value: Any, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise SpaceError(f"{key}: must be a number or a list of numbers, got {value!r}") from None
    if not out:
        raise SpaceError(f"{key}: must not be empty")
    return out


def _range(value: Any, key: str) -> tuple[float, float]:
    low, high = _floats(value, key) if isinstance(value, (list, tuple)) and len(value) == 2 else (None, None)
    if low is None or not low <= high:
        raise SpaceError(f"{key}: must be [low, high] with low ≤ high, got {value!r}")
    return (low, high)


def _no_unknown(doc: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise SpaceError(f"{prefix}{unknown[0]}: unknown key; expected one of {sorted(known)}")
