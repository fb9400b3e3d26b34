"""Persistent search state: every evaluated schedule is one COMPLETE trial of an Optuna RDB study.

A trial's params are the flattened decisions (`ScheduleEncoding`), its user attributes the schedule JSON,
metrics, cost, sample count, seed, stage and algorithm, so a search resumes and exports from the database
alone and Optuna's own tools (load_study, trials_dataframe, the `optuna` CLI) read the study as-is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from ..errors import ScheduleError, SolversearchError
from ..noise import DiscreteVP, KarrasVE, NoiseSchedule, RectifiedFlow
from ..schedule import SolverSchedule

DEFAULT_STORAGE = "sqlite:///solversearch.db"
STORAGE_ENV = "SOLVERSEARCH_STORAGE"
CHECKED_DESCRIPTION_KEYS = ("model_fingerprint", "metric", "nfe", "space")
SCHEMA_RACE_ATTEMPTS = 8
EXPORT_KINDS = ("timesteps", "sigmas")
EXPORT_FORMATS = ("solversearch", "diffusers", "comfyui")
LIST_NOTE = (
    "only the times transfer: the per-step solver decisions (order, prediction, scaling, corrector, "
    "skips) need solversearch's SearchedScheduler"
)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredEvaluation:
    """One evaluated schedule as read back from the study."""

    number: int  # Optuna trial number
    schedule: SolverSchedule
    key: str  # canonical key given at record time
    values: tuple[float, ...]  # objective values as stored (inf for a diverged schedule)
    metrics: dict[str, float]  # fid, kid, kid_std, error_to_reference... (inf for diverged)
    diverged: bool
    stage: int
    algorithm: str
    cost: dict[str, float]  # nfe, seconds, sampling_seconds, metric_seconds (and macs if known)
    n: int
    seed: int
    worker: dict[str, Any] = field(default_factory=dict)  # where it ran: node id, pid
    refinement: dict[str, Any] = field(default_factory=dict)  # a refined schedule: its parent, losses, cost


class StudyStore:
    """One Optuna study (one experiment and NFE budget, or one multi-objective search) in an RDB storage.

    Opening creates the study if needed. An existing study must have the same directions and, for the
    description keys model_fingerprint / metric / nfe / space, the same values: a resumed search must be
    the same search. A study without a stored description (e.g. created by Optuna directly) adopts ours.
    """

    def __init__(
        self,
        url: str,
        study_name: str,
        directions: Sequence[str] = ("minimize",),
        description: Mapping[str, Any] | None = None,
    ):
        self._url = url
        self._name = study_name
        self.skipped = 0  # trials the last history() call skipped (no or unreadable "schedule" attribute)
        wanted = _directions(directions)
        ours = None if description is None else _json_plain(description, "the study description")
        self._storage = storage = open_storage(url)
        with _storage_errors(url, f"open study {study_name!r}"), _quiet_optuna():
            try:
                study_id = storage.get_study_id_from_name(study_name)
                created = False
            except KeyError:
                try:
                    study_id = storage.create_new_study(wanted, study_name)
                    created = True
                except optuna.exceptions.DuplicatedStudyError:
                    # Another worker created it between our lookup and create: open theirs.
                    study_id = storage.get_study_id_from_name(study_name)
                    created = False
            existing = storage.get_study_directions(study_id)
            if not created and list(existing) != wanted:
                raise SolversearchError(
                    f"study {study_name!r} in {redact_url(url)} has directions {_names(existing)}, not "
                    f"{_names(wanted)}; use the same objectives to resume it, or another study name"
                )
            stored = storage.get_study_user_attrs(study_id).get("description")
            if ours is not None:
                if stored is None:
                    storage.set_study_user_attr(study_id, "description", ours)
                    stored = ours
                else:
                    _check_same_search(study_name, url, stored, ours)
            self._study = optuna.load_study(study_name=study_name, storage=storage)
        self._study_id = study_id
        self._description = dict(stored or {})

    @property
    def study(self) -> optuna.Study:
        return self._study

    @property
    def description(self) -> dict:
        return json.loads(json.dumps(self._description))  # a deep copy: the stored one stays as stored

    def record(
        self,
        schedule: SolverSchedule,
        key: str,
        values: Sequence[float],
        metrics: Mapping[str, float],
        *,
        params: Mapping[str, Any],
        distributions: Mapping[str, BaseDistribution],
        diverged: bool,
        stage: int,
        algorithm: str,
        cost: Mapping[str, float],
        n: int,
        seed: int,
        worker: Mapping[str, Any] | None = None,
        refinement: Mapping[str, Any] | None = None,
    ) -> int:
        """Store one evaluated schedule as a COMPLETE trial; returns its trial number. `worker` (node,
        pid) says where it was evaluated.

        The trial is written from a template in one transaction (what `Study.add_trial` does; called on
        the storage here because add_trial does not return the trial), so no reader ever sees it RUNNING
        or without its attributes. Objective values may be ±inf (a diverged schedule), never NaN (Optuna
        refuses NaN values). Non-finite metrics and costs are stored as the strings "inf" / "-inf" / "nan"
        so the attributes stay strict JSON.
        """
        values = [float(v) for v in values]
        if any(math.isnan(v) for v in values):
            raise ValueError(f"objective values must not be NaN (record a diverged schedule as inf), got {values}")
        if len(values) != len(self._study.directions):
            raise ValueError(f"study {self._name!r} has {len(self._study.directions)} objectives, got values {values}")
        user_attrs = {
            "schedule": schedule.to_json(indent=None),
            "key": str(key),
            "metrics": {str(k): _encode_float(v) for k, v in metrics.items()},
            "diverged": bool(diverged),
            "stage": int(stage),
            "algorithm": str(algorithm),
            "cost": {str(k): _encode_float(v) for k, v in cost.items()},
            "n": int(n),
            "seed": int(seed),
        }
        if worker:
            user_attrs["worker"] = _json_plain(dict(worker), "the worker description")
        if refinement:
            user_attrs["refinement"] = _json_plain(dict(refinement), "the refinement summary")
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=values,
            params=dict(params),
            distributions=dict(distributions),
            user_attrs=user_attrs,
        )
        with _storage_errors(self._url, f"record a trial in study {self._name!r}"), _quiet_optuna():
            trial_id = self._storage.create_new_trial(self._study_id, template_trial=trial)
            return self._storage.get_trial_number_from_id(trial_id)

    def history(self) -> list[StoredEvaluation]:
        """Every COMPLETE trial in trial-number order; trials without a readable "schedule" attribute
        (e.g. added by other Optuna tools) are skipped and counted in `self.skipped`."""
        out, skipped = [], []
        for trial in self._complete_trials():
            evaluation = _evaluation(trial)
            if evaluation is None:
                skipped.append(trial.number)
            else:
                out.append(evaluation)
        self.skipped = len(skipped)
        if skipped:
            _logger.warning(
                "study %r: skipped %d trials without a readable schedule attribute (numbers %s)",
                self._name,
                len(skipped),
                skipped[:10],
            )
        return out

    def keys(self) -> set[str]:
        """Keys of every stored evaluation (read from the attributes; no schedule is parsed)."""
        trials = self._complete_trials()
        return {str(t.user_attrs["key"]) for t in trials if "schedule" in t.user_attrs and "key" in t.user_attrs}

    def best(self, k: int = 1, objective: int = 0) -> list[StoredEvaluation]:
        """The k best non-diverged evaluations with a finite value of `objective` (lowest first for a
        minimised objective, highest first for a maximised one); ties by trial number."""
        directions = self._study.directions
        if not 0 <= objective < len(directions):
            raise SolversearchError(
                f"objective must be in 0..{len(directions) - 1}: "
                f"study {self._name!r} has {len(directions)} objective(s)"
            )
        sign = -1.0 if directions[objective] == StudyDirection.MAXIMIZE else 1.0
        candidates = [
            t
            for t in self._complete_trials()
            if not t.user_attrs.get("diverged", False) and math.isfinite(t.values[objective])
        ]
        candidates.sort(key=lambda t: (sign * t.values[objective], t.number))
        out = []
        for trial in candidates:  # parse schedules (≈2 ms each) only until k are found
            if len(out) >= k:
                break
            evaluation = _evaluation(trial)
            if evaluation is not None:
                out.append(evaluation)
        return out

    def _complete_trials(self) -> list[FrozenTrial]:
        with _storage_errors(self._url, f"read study {self._name!r}"):
            trials = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return sorted(trials, key=lambda t: t.number)

    def set_attr(self, name: str, value: Any) -> None:
        """Set a study user attribute (JSON-able; non-finite floats are stored as None)."""
        if name == "description":
            raise SolversearchError(
                "the study description is fixed when the study is created; use another attribute name"
            )
        plain = _json_plain(_finite_or_none(value), f"study attribute {name!r}")
        with _storage_errors(self._url, f"write study {self._name!r}"):
            self._study.set_user_attr(name, plain)

    def get_attr(self, name: str, default: Any = None) -> Any:
        with _storage_errors(self._url, f"read study {self._name!r}"):
            return self._study.user_attrs.get(name, default)


# --- storage URLs and connections -------------------------------------------------------------------


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
    with _storage_errors(url, "open the storage"), _quiet_optuna():
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


def open_existing(url: str, study_name: str) -> StudyStore:
    """An existing study (for show / export): a missing database file or study is a user error, and
    nothing is created."""
    require_existing_database(url)
    storage = open_storage(url)
    with _storage_errors(url, f"open study {study_name!r}"):
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            raise SolversearchError(
                f"no study {study_name!r} in {redact_url(url)}; `solversearch studies --storage URL` lists the studies there"
            ) from None
        directions = _names(storage.get_study_directions(study_id))
    return StudyStore(url, study_name, directions=directions)


def require_existing_database(url: str) -> None:
    """Reading commands must not create an empty SQLite file where the user mistyped a path."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return  # open_storage reports it
    in_a_file = parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:"
    if in_a_file and not Path(parsed.database).exists():
        raise SolversearchError(f"no database at {redact_url(url)} (the file {parsed.database!r} does not exist)")


def list_studies(url: str) -> list[dict]:
    """Every study in the storage: name, n_trials (COMPLETE), best value(s), directions, description.

    `best_values` holds, per objective, the best finite value of a non-diverged trial (None if there is
    none); `best_value` is the first objective's.
    """
    require_existing_database(url)
    storage = open_storage(url)
    try:
        with _storage_errors(url, "list studies"):
            out = []
            for frozen in sorted(storage.get_all_studies(), key=lambda s: s.study_name):
                study_id = storage.get_study_id_from_name(frozen.study_name)
                trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,))
                best: list[float | None] = []
                for i, direction in enumerate(frozen.directions):
                    values = [
                        t.values[i]
                        for t in trials
                        if math.isfinite(t.values[i]) and not t.user_attrs.get("diverged", False)
                    ]
                    pick = max if direction == StudyDirection.MAXIMIZE else min
                    best.append(pick(values) if values else None)
                out.append(
                    {
                        "name": frozen.study_name,
                        "n_trials": len(trials),
                        "best_value": best[0],
                        "best_values": best,
                        "directions": _names(frozen.directions),
                        "description": frozen.user_attrs.get("description"),
                    }
                )
            return out
    finally:
        storage.engine.dispose()  # a CLI listing should not leave pooled server connections behind


# --- export ----------------------------------------------------------------------------------------


def export_diffusers(schedule: SolverSchedule, noise: NoiseSchedule, kind: str | None = None) -> dict:
    """The schedule's times in a form a diffusers pipeline takes (`timesteps=` or `sigmas=`), in the units of
    the path's diffusers scheduler.

    The exported times are where the schedule evaluates the model: its positive step-start times (all
    positive times when it ends at t = 0). diffusers supplies the final point itself (its
    final_sigmas_type), so a schedule ending at t_end > 0 keeps its NFE but ends at diffusers' final σ.
    `kind` defaults to integer timesteps on a discrete VP model and to sigmas elsewhere:
    - VP: σ/α = e^{−λ} (DDPM-family schedulers' sigma);
    - flow: the *unshifted* σ, because FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…) shifts custom
      sigmas too (by `shift`, or by the `mu` it is given): its shift lands them on the schedule's σ;
    - EDM: σ, and beside it `edm_euler_ramp`, what EDMEulerScheduler.set_timesteps(sigmas=…) takes (it maps
      a ramp in [0, 1] through its Karras formula rather than taking σ).
    The returned `dropped` lists what this schedule decides that a list of times cannot carry.
    """
    kind = kind or ("timesteps" if isinstance(noise, DiscreteVP) else "sigmas")
    if kind not in EXPORT_KINDS:
        raise SolversearchError(f"unknown export kind {kind!r}; expected one of {EXPORT_KINDS}")
    times = np.array([t for t in schedule.timesteps[:-1] if t > 0], dtype=np.float64)
    common = {"note": LIST_NOTE, "dropped": dropped_decisions(schedule, noise, final_point=False)}
    if kind == "sigmas":
        if isinstance(noise, RectifiedFlow):
            shift = f"mu={noise.mu!r}: pass it the same mu" if noise.use_dynamic_shifting else f"shift={noise.shift!r}"
            units = (
                "unshifted flow sigmas for FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…), whose shift "
                f"({shift}) turns them into the schedule's σ ∈ (0, 1]; the scheduler appends the final 0"
            )
            return {"sigmas": _floats(noise.unshifted(times)), "units": units, **common}
        if isinstance(noise, KarrasVE):
            units = (
                "EDM σ (k-diffusion units); EDMEulerScheduler.set_timesteps(sigmas=torch.tensor(edm_euler_ramp)) "
                "lands on them, as its Karras formula maps the ramp to σ; the scheduler appends the final 0"
            )
            return {
                "sigmas": _floats(noise.sigma(times)),
                "edm_euler_ramp": _floats(edm_ramp(noise, times)),
                "units": units,
                **common,
            }
        units = "σ/α = sqrt((1 − ᾱ)/ᾱ), diffusers' sigma of DDPM-family schedulers (without the final 0)"
        return {"sigmas": _floats(np.exp(-noise.lambda_(times))), "units": units, **common}
    if not isinstance(noise, DiscreteVP):
        raise SolversearchError(
            f"integer diffusers timesteps need a discrete (diffusers) noise schedule, not {noise!r}; "
            "export kind 'sigmas' instead"
        )
    big_n = noise.num_train_timesteps
    steps = [min(max(math.floor(big_n * t - 1.0 + 0.5), 0), big_n - 1) for t in times]
    if len(set(steps)) != len(steps):
        raise SolversearchError(
            f"schedule {schedule.name or schedule.decisions_key()!r}: times {list(times)} round to repeated "
            f"training timesteps {steps}; export kind 'sigmas' instead"
        )
    return {"timesteps": steps, "units": "integer training timesteps of the DDPM-family scheduler", **common}


def export_comfyui(schedule: SolverSchedule, noise: NoiseSchedule) -> dict:
    """The schedule's times as a ComfyUI custom-sigmas list: every time including the last (0 when the
    schedule ends at t = 0), in ComfyUI's units — σ ∈ [0, 1] for flow models (used as given, already
    shifted), σ/α = e^{−λ} for VP and EDM models (σ itself on EDM, where α = 1)."""
    times = np.asarray(schedule.timesteps, dtype=np.float64)
    if isinstance(noise, RectifiedFlow):
        sigmas, units = noise.sigma(times), "flow σ ∈ [0, 1] (ComfyUI's flow models; no shift to apply)"
    elif isinstance(noise, KarrasVE):
        sigmas, units = noise.sigma(times), "EDM σ"
    else:
        sigmas, units = np.exp(-noise.lambda_(times)), "σ/α = sqrt((1 − ᾱ)/ᾱ) (ComfyUI's VP models)"
    return {
        "sigmas": _floats(sigmas),
        "units": units + ", including the final time",
        "note": LIST_NOTE,
        "dropped": dropped_decisions(schedule, noise, final_point=True),
    }


def dropped_decisions(schedule: SolverSchedule, noise: NoiseSchedule, final_point: bool) -> list[str]:
    """What `schedule` decides that a list of its times cannot carry, concretely; empty when the consumer's
    first-order solver (Euler / DDIM) at these times is the schedule. `final_point`: the list carries the
    last time itself (ComfyUI), else the consumer supplies its own final σ (diffusers)."""
    steps = schedule.steps
    dropped = []
    orders = [s.order for s in steps]
    if max(orders) > 1:
        dropped.append(
            f"per-step orders {orders} and their derivative estimates (the consumer's own solver runs instead)"
        )
    # A first-order step without corrector is the same update in either prediction form.
    noise_steps = [i for i, s in enumerate(steps) if s.prediction == "noise" and (s.order > 1 or s.corrector != "none")]
    if noise_steps:
        dropped.append(f"noise (ε) prediction at steps {noise_steps}")
    corrected = [i for i, s in enumerate(steps) if s.corrector != "none"]
    if corrected:
        dropped.append(f"the UniC corrector after steps {corrected}")
    skipping = [i for i, s in enumerate(steps) if s.skip]
    if skipping:
        dropped.append(f"skipped network blocks at steps {skipping}")
    if schedule.first_step == "analytic":
        dropped.append(
            f"the analytic first step: the consumer evaluates the model at t = {schedule.timesteps[0]:g} too "
            f"({schedule.nfe + 1} evaluations instead of {schedule.nfe})"
        )
    end = schedule.timesteps[-1]
    if end > 0 and not final_point:
        dropped.append(
            f"the end time t = {end:g} (σ = {float(noise.sigma(end)):.4g} > 0): diffusers ends at its own final σ "
            "(0 with final_sigmas_type='zero'), one more step of its solver"
        )
    return dropped


def edm_ramp(noise: KarrasVE, times: np.ndarray) -> np.ndarray:
    """The inverse of EDM's Karras formula σ = (σ_max^{1/ρ} + r (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ: the ramp r
    at which EDMEulerScheduler's `sigmas=` lands on σ(times)."""
    top, bottom = noise.sigma_max ** (1 / noise.rho), noise.sigma_min ** (1 / noise.rho)
    return (noise.sigma(times) ** (1 / noise.rho) - top) / (bottom - top)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]


# --- internals -------------------------------------------------------------------------------------


def _evaluation(trial: FrozenTrial) -> StoredEvaluation | None:
    attrs = trial.user_attrs
    if "schedule" not in attrs:
        return None
    try:
        schedule = SolverSchedule.from_json(attrs["schedule"])
    except (ScheduleError, TypeError):
        return None
    return StoredEvaluation(
        number=trial.number,
        schedule=schedule,
        key=str(attrs.get("key", schedule.decisions_key())),
        values=tuple(float(v) for v in trial.values),
        metrics={k: _decode_float(v) for k, v in attrs.get("metrics", {}).items()},
        diverged=bool(attrs.get("diverged", False)),
        stage=int(attrs.get("stage", 0)),
        algorithm=str(attrs.get("algorithm", "")),
        cost={k: _decode_float(v) for k, v in attrs.get("cost", {}).items()},
        n=int(attrs.get("n", 0)),
        seed=int(attrs.get("seed", 0)),
        worker=dict(attrs.get("worker", {})),
        refinement=dict(attrs.get("refinement", {})),
    )


def _encode_float(value: Any) -> float | str | None:
    # Optuna writes user attrs with json.dumps' default allow_nan=True, i.e. as the non-standard
    # tokens Infinity / NaN that strict JSON readers (optuna-dashboard, jq) reject: store strings.
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _decode_float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # float() reads "inf", "-inf" and "nan"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _json_plain(value: Any, what: str) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so stored and given values compare."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SolversearchError(f"{what} must be JSON-able with finite numbers: {exc}") from None


def _check_same_search(study_name: str, url: str, stored: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
    for key in CHECKED_DESCRIPTION_KEYS:
        if stored.get(key) != ours.get(key):
            raise SolversearchError(
                f"study {study_name!r} in {redact_url(url)} was created with a different {key}: "
                f"{_differs(stored.get(key), ours.get(key))}. A resumed search must be the same search: "
                "use the original settings, or give a new study name"
            )


def _differs(stored: Any, ours: Any) -> str:
    if isinstance(stored, Mapping) and isinstance(ours, Mapping):
        keys = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
        return f"it differs in {keys}"
    return f"stored {_short(stored)}, now {_short(ours)}"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _directions(directions: Sequence[str]) -> list[StudyDirection]:
    if isinstance(directions, str) or not directions:
        raise SolversearchError(f"directions must be a non-empty list of 'minimize' / 'maximize', got {directions!r}")
    out = []
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise SolversearchError(f"each direction must be 'minimize' or 'maximize', got {d!r}")
        out.append(StudyDirection.MINIMIZE if d == "minimize" else StudyDirection.MAXIMIZE)
    return out


def _names(directions: Sequence[StudyDirection]) -> list[str]:
    return [d.name.lower() for d in directions]


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every study creation at INFO; a search records thousands of trials, so raise its
    verbosity to WARNING while we write, then restore whatever the caller had set."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(previous, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


@contextlib.contextmanager
def _storage_errors(url: str, action: str) -> Iterator[None]:
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
    try:
        backend = make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001
        backend = ""
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
