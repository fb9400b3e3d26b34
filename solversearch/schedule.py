"""SolverSchedule: what a sampler does at every step, as validated, immutable data with a JSON format.

A schedule with N steps has N + 1 times t_0 > t_1 > … > t_N (continuous t, see `noise.py`) and one
`Step` per interval. The model is evaluated once at the start of every step (step 0 may use the
analytic first step instead), never after the last one; so NFE = N, or N − 1 with an analytic first
step. The JSON document (`"format": "solversearch.schedule/v1"`) is described by the committed JSON
Schema `schemas/schedule-v1.schema.json`; every invalid input raises `ScheduleError` naming the field
and, for per-step fields, the step index.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ScheduleError

FORMAT = "solversearch.schedule/v1"
PREDICTIONS = ("noise", "data")
SCALINGS = ("none", "bh1", "bh2", "linear")
CORRECTORS = ("none", "unic")
FIRST_STEPS = ("model", "analytic")
MAX_ORDER = 4


class FrozenMap(Mapping[str, Any]):
    """A read-only mapping that, unlike MappingProxyType, pickles (schedules travel to Ray workers)."""

    def __init__(self, data: Mapping[str, Any] | None = None):
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True)
class Step:
    """The decisions of one step from t_i to t_{i+1}.

    - `prediction`: expand the noise prediction ε̂ ("noise") or the data prediction x̂₀ ("data").
    - `order`: number of Taylor terms k (1 = DDIM).
    - `derivative_points`: for each derivative n = 1..k−1, the history points its estimate uses, as
      back-indices (1 = the evaluation one step back, 2 = two steps back, …); derivative n needs at
      least n points. Fewer points than available is USF's low-order derivative estimate.
    - `scaling`: multiplies the first-derivative term: bh1 / bh2 (UniPC's B(h)), linear (1 + c·h, with
      h → −h in the data form) or none. `first_derivative_factor` multiplies that term once more (a
      learned step scale: `refine.py` tunes it; 1 = none; only for order ≥ 2). `second_derivative_factor`
      multiplies the second-derivative term (0.5 reproduces the published DPM-Solver++(3M) coefficient).
    - `corrector`: "unic" re-does the step with one more order, fitting its derivatives through the
      predictor's points plus the model evaluation at the new point (which the next step needs anyway,
      so it costs no NFE). As in UniPC, it applies `scaling` only when it is an order-2 update.
    - `skip`: names of network blocks the model may skip when evaluated at the start of this step.
    """

    prediction: str = "data"
    order: int = 1
    derivative_points: tuple[tuple[int, ...], ...] = ()
    scaling: str = "none"
    linear_coefficient: float = 0.0
    first_derivative_factor: float = 1.0
    second_derivative_factor: float = 1.0
    corrector: str = "none"
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the object stays immutable and hashable.
        object.__setattr__(self, "derivative_points", tuple(tuple(p) for p in self.derivative_points))
        object.__setattr__(self, "skip", tuple(self.skip))

    @classmethod
    def multistep(cls, order: int, prediction: str = "data", **decisions: Any) -> Step:
        """An order-k step whose every derivative uses the k − 1 most recent points (full order)."""
        return cls(prediction=prediction, order=order, derivative_points=full_points(order), **decisions)

    @property
    def history_used(self) -> tuple[int, ...]:
        """All back-indices any derivative of the predictor uses, ascending."""
        return tuple(sorted({p for points in self.derivative_points for p in points}))

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "prediction": self.prediction,
            "order": self.order,
            "derivative_points": [list(p) for p in self.derivative_points],
            "scaling": self.scaling,
        }
        if self.scaling == "linear":
            doc["linear_coefficient"] = self.linear_coefficient
        if self.first_derivative_factor != 1.0:
            doc["first_derivative_factor"] = self.first_derivative_factor
        if self.second_derivative_factor != 1.0:
            doc["second_derivative_factor"] = self.second_derivative_factor
        doc["corrector"] = self.corrector
        doc["skip"] = list(self.skip)
        return doc


def full_points(order: int) -> tuple[tuple[int, ...], ...]:
    """Derivative points of a full-order multistep step: every derivative uses points 1..k−1."""
    return tuple(tuple(range(1, order)) for _ in range(order - 1))


@dataclass(frozen=True)
class SolverSchedule:
    """A complete, validated solver schedule. See the module docstring for the conventions."""

    timesteps: tuple[float, ...]
    steps: tuple[Step, ...]
    first_step: str = "model"
    name: str = ""
    noise_schedule: Mapping[str, Any] | None = None
    model_fingerprint: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", tuple(float(t) for t in self.timesteps))
        object.__setattr__(self, "steps", tuple(self.steps))
        for name in ("metrics", "provenance"):
            object.__setattr__(self, name, FrozenMap(getattr(self, name)))
        if self.noise_schedule is not None:
            object.__setattr__(self, "noise_schedule", FrozenMap(self.noise_schedule))
        _validate(self)

    def __hash__(self) -> int:
        return hash((self.timesteps, self.steps, self.first_step))

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        """Network evaluations: one per step start, minus one for an analytic first step."""
        return self.n_steps - (self.first_step == "analytic")

    @property
    def ends_at_zero(self) -> bool:
        """Whether the last step goes to σ = 0 (t = 0), the denoising step diffusers ends with."""
        return self.timesteps[-1] == 0.0

    def with_metadata(self, **changes: Any) -> SolverSchedule:
        """A copy with other name / noise_schedule / model_fingerprint / metrics / provenance."""
        allowed = {"name", "noise_schedule", "model_fingerprint", "metrics", "provenance"}
        unknown = set(changes) - allowed
        if unknown:
            raise ScheduleError(f"with_metadata only changes {sorted(allowed)}, not {sorted(unknown)}")
        return replace(self, **changes)

    def decisions_key(self) -> str:
        """A short hash of what the sampler does (times, steps, first step), ignoring metadata."""
        doc = {
            "timesteps": list(self.timesteps),
            "first_step": self.first_step,
            "steps": [s.to_dict() for s in self.steps],
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "nfe": self.nfe,
            "first_step": self.first_step,
            "timesteps": list(self.timesteps),
            "steps": [s.to_dict() for s in self.steps],
            "noise_schedule": None if self.noise_schedule is None else _plain(self.noise_schedule),
            "model_fingerprint": self.model_fingerprint,
            "metrics": dict(self.metrics),
            "provenance": _plain(self.provenance),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: str | Path) -> Path:
        """Write the JSON document atomically (a crash never leaves a half-written file)."""
        from .outputs import write_text

        return write_text(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, doc: Any) -> SolverSchedule:
        if not isinstance(doc, Mapping):
            raise ScheduleError(f"a schedule document must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ScheduleError(f"format: expected {FORMAT!r}, got {doc.get('format')!r}")
        _check_against_json_schema(doc)
        schedule = cls(
            timesteps=tuple(doc["timesteps"]),
            steps=tuple(_step_from_dict(s) for s in doc["steps"]),
            first_step=doc["first_step"],
            name=doc.get("name", ""),
            noise_schedule=doc.get("noise_schedule"),
            model_fingerprint=doc.get("model_fingerprint"),
            metrics=doc.get("metrics", {}),
            provenance=doc.get("provenance", {}),
        )
        if doc["nfe"] != schedule.nfe:
            raise ScheduleError(
                f"nfe: the document says {doc['nfe']} but its {schedule.n_steps} steps with first_step "
                f"{schedule.first_step!r} make {schedule.nfe} network evaluations"
            )
        return schedule

    @classmethod
    def from_json(cls, text: str) -> SolverSchedule:
        try:
            doc = json.loads(text)  # NaN/Infinity parse, then fail validation naming their field
        except json.JSONDecodeError as exc:
            raise ScheduleError(f"not valid JSON: {exc}") from None
        except RecursionError:
            raise ScheduleError("not a schedule: nested too deeply") from None
        return cls.from_dict(doc)


def load_schedule(path: str | Path) -> SolverSchedule:
    """Read and validate a schedule JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScheduleError(f"cannot read schedule file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScheduleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return SolverSchedule.from_json(text)
    except ScheduleError as exc:
        raise ScheduleError(f"{path}: {exc}") from None


# --- validation ---------------------------------------------------------------------------------


def _validate(s: SolverSchedule) -> None:
    ts = s.timesteps
    if len(ts) < 2:
        raise ScheduleError(f"timesteps: need at least 2 times (one step), got {len(ts)}")
    for i, t in enumerate(ts):
        if not math.isfinite(t):
            raise ScheduleError(f"timesteps[{i}]: must be a finite number, got {t}")
    if ts[0] > 1.0:
        raise ScheduleError(f"timesteps[0]: t_start must be ≤ 1, got {ts[0]}")
    for i in range(len(ts) - 1):
        if not ts[i + 1] < ts[i]:
            raise ScheduleError(f"timesteps[{i + 1}]: times must decrease strictly, got {ts[i]} then {ts[i + 1]}")
    if ts[-1] < 0.0:
        raise ScheduleError(f"timesteps[{len(ts) - 1}]: t_end must be ≥ 0 (0 = denoise to σ = 0), got {ts[-1]}")
    if len(s.steps) != len(ts) - 1:
        raise ScheduleError(f"steps: {len(ts)} timesteps need {len(ts) - 1} steps, got {len(s.steps)}")
    if s.first_step not in FIRST_STEPS:
        raise ScheduleError(f"first_step: must be one of {FIRST_STEPS}, got {s.first_step!r}")
    for name, value in s.metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ScheduleError(f"metrics.{name}: must be a number, got {value!r}")
    for i, step in enumerate(s.steps):
        _validate_step(i, step, is_last=i == len(s.steps) - 1, to_zero=ts[i + 1] == 0.0)


def _validate_step(i: int, step: Step, is_last: bool, to_zero: bool) -> None:
    where = f"steps[{i}]"
    if not isinstance(step, Step):
        raise ScheduleError(f"{where}: must be a Step, got {type(step).__name__}")
    if step.prediction not in PREDICTIONS:
        raise ScheduleError(f"{where}.prediction: must be one of {PREDICTIONS}, got {step.prediction!r}")
    if isinstance(step.order, bool) or not isinstance(step.order, int) or not 1 <= step.order <= MAX_ORDER:
        raise ScheduleError(f"{where}.order: must be an integer in 1..{MAX_ORDER}, got {step.order!r}")
    if step.order > i + 1:
        raise ScheduleError(
            f"{where}.order: order {step.order} needs {step.order - 1} earlier model evaluations, "
            f"but step {i} has only {i}"
        )
    if len(step.derivative_points) != step.order - 1:
        raise ScheduleError(
            f"{where}.derivative_points: an order-{step.order} step needs {step.order - 1} lists "
            f"(one per derivative), got {len(step.derivative_points)}"
        )
    for n, points in enumerate(step.derivative_points, start=1):
        if any(isinstance(p, bool) or not isinstance(p, int) for p in points):
            raise ScheduleError(f"{where}.derivative_points[{n - 1}]: back-indices must be integers, got {points}")
        if len(points) < n or len(set(points)) != len(points) or list(points) != sorted(points):
            raise ScheduleError(
                f"{where}.derivative_points[{n - 1}]: derivative {n} needs at least {n} distinct "
                f"back-indices in ascending order, got {list(points)}"
            )
        if points[0] < 1 or points[-1] > i:
            raise ScheduleError(
                f"{where}.derivative_points[{n - 1}]: back-indices must be in 1..{i} (the history "
                f"available at step {i}), got {list(points)}"
            )
    if step.scaling not in SCALINGS:
        raise ScheduleError(f"{where}.scaling: must be one of {SCALINGS}, got {step.scaling!r}")
    for name in ("linear_coefficient", "first_derivative_factor", "second_derivative_factor"):
        value = getattr(step, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ScheduleError(f"{where}.{name}: must be a finite number, got {value!r}")
    if step.scaling != "linear" and step.linear_coefficient != 0.0:
        raise ScheduleError(f"{where}.linear_coefficient: only allowed with scaling 'linear'")
    if step.order == 1 and step.first_derivative_factor != 1.0:
        raise ScheduleError(f"{where}.first_derivative_factor: an order-1 step has no derivative term to scale")
    if step.order < 3 and step.second_derivative_factor != 1.0:
        raise ScheduleError(
            f"{where}.second_derivative_factor: an order-{step.order} step has no second-derivative term"
        )
    if step.corrector not in CORRECTORS:
        raise ScheduleError(f"{where}.corrector: must be one of {CORRECTORS}, got {step.corrector!r}")
    if step.corrector != "none" and is_last:
        raise ScheduleError(f"{where}.corrector: the last step cannot be corrected (no model evaluation follows)")
    if to_zero and step.order != 1:
        raise ScheduleError(
            f"{where}.order: a step to t = 0 (σ = 0) is the denoising step x = x̂₀; it must have order 1"
        )
    if any(not isinstance(u, str) or not u for u in step.skip) or len(set(step.skip)) != len(step.skip):
        raise ScheduleError(f"{where}.skip: must be distinct non-empty block names, got {list(step.skip)}")


@cache
def json_schema() -> dict[str, Any]:
    """The committed JSON Schema of the v1 format."""
    text = resources.files("solversearch").joinpath("schemas/schedule-v1.schema.json").read_text()
    return json.loads(text)


def _check_against_json_schema(doc: Mapping[str, Any]) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(json_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        raise ScheduleError(f"{_json_path(error.absolute_path)}: {error.message}")


def _json_path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def _step_from_dict(doc: Mapping[str, Any]) -> Step:
    return Step(
        prediction=doc["prediction"],
        order=doc["order"],
        derivative_points=tuple(tuple(p) for p in doc["derivative_points"]),
        scaling=doc["scaling"],
        linear_coefficient=float(doc.get("linear_coefficient", 0.0)),
        first_derivative_factor=float(doc.get("first_derivative_factor", 1.0)),
        second_derivative_factor=float(doc.get("second_derivative_factor", 1.0)),
        corrector=doc["corrector"],
        skip=tuple(doc.get("skip", ())),
    )


def _plain(value: Any) -> Any:
    """FrozenMap/tuple trees → plain dict/list trees for json."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe(schedule: SolverSchedule) -> Sequence[str]:
    """One human-readable line per step (for logs and the CLI)."""
    lines = []
    for i, (step, t0, t1) in enumerate(zip(schedule.steps, schedule.timesteps, schedule.timesteps[1:])):
        extra = []
        if step.order > 1:
            extra.append(f"points={[list(p) for p in step.derivative_points]}")
        if step.scaling != "none":
            extra.append(step.scaling + (f"({step.linear_coefficient:g})" if step.scaling == "linear" else ""))
        if step.first_derivative_factor != 1.0:
            extra.append(f"×{step.first_derivative_factor:.3g}")
        if step.corrector != "none":
            extra.append(step.corrector)
        if step.skip:
            extra.append(f"skip {len(step.skip)}")
        first = " analytic" if i == 0 and schedule.first_step == "analytic" else ""
        lines.append(f"{i:2d}: t {t0:.5f} → {t1:.5f}  {step.prediction} order {step.order}{first} {' '.join(extra)}")
    return lines
