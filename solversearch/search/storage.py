"""Persistent search state: every evaluated schedule is one COMPLETE trial of an Optuna RDB study.

A trial's params are the flattened decisions (`ScheduleEncoding`), its user attributes the trial
record — schedule JSON, metrics, cost, sample count, seed, stage, algorithm, worker, refinement — so a
search resumes and exports from the database alone and Optuna's own tools (load_study,
trials_dataframe, the `optuna` CLI) read the study as-is. This module only persists: URLs,
connections and database errors are database.py's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from ..errors import ScheduleError, SolversearchError
from ..schedule import SolverSchedule
from .database import database_errors, open_storage, quiet_optuna, redact_url, require_existing_database
from .record import TrialRecord

CHECKED_DESCRIPTION_KEYS = ("model_fingerprint", "metric", "nfe", "space")

_logger = logging.getLogger(__name__)


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
        with database_errors(url, f"open study {study_name!r}"), quiet_optuna():
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
        record: TrialRecord,
        values: Sequence[float],
        *,
        params: Mapping[str, Any] | None = None,
        distributions: Mapping[str, BaseDistribution] | None = None,
    ) -> int:
        """Store one evaluated schedule as a COMPLETE trial with objective `values`; returns its trial
        number. `params` and `distributions` are its flat encoding (`ScheduleEncoding.from_schedule`).

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
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=values,
            params=dict(params or {}),
            distributions=dict(distributions or {}),
            user_attrs=_user_attrs(record),
        )
        with database_errors(self._url, f"record a trial in study {self._name!r}"), quiet_optuna():
            trial_id = self._storage.create_new_trial(self._study_id, template_trial=trial)
            return self._storage.get_trial_number_from_id(trial_id)

    def history(self) -> list[TrialRecord]:
        """Every COMPLETE trial in trial-number order; trials without a readable "schedule" attribute
        (e.g. added by other Optuna tools) are skipped and counted in `self.skipped`."""
        out, skipped = [], []
        for trial in self._complete_trials():
            evaluation = _record_of(trial)
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

    def best(self, k: int = 1, objective: int = 0) -> list[TrialRecord]:
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
            evaluation = _record_of(trial)
            if evaluation is not None:
                out.append(evaluation)
        return out

    def _complete_trials(self) -> list[FrozenTrial]:
        with database_errors(self._url, f"read study {self._name!r}"):
            trials = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return sorted(trials, key=lambda t: t.number)

    def set_attr(self, name: str, value: Any) -> None:
        """Set a study user attribute (JSON-able; non-finite floats are stored as None)."""
        if name == "description":
            raise SolversearchError(
                "the study description is fixed when the study is created; use another attribute name"
            )
        plain = _json_plain(_finite_or_none(value), f"study attribute {name!r}")
        with database_errors(self._url, f"write study {self._name!r}"):
            self._study.set_user_attr(name, plain)

    def get_attr(self, name: str, default: Any = None) -> Any:
        with database_errors(self._url, f"read study {self._name!r}"):
            return self._study.user_attrs.get(name, default)


# --- opening and listing studies -------------------------------------------------------------------


def open_existing(url: str, study_name: str) -> StudyStore:
    """An existing study (for show / export): a missing database file or study is a user error, and
    nothing is created."""
    require_existing_database(url)
    storage = open_storage(url)
    with database_errors(url, f"open study {study_name!r}"):
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            raise SolversearchError(
                f"no study {study_name!r} in {redact_url(url)}; `solversearch studies --storage URL` lists the studies there"
            ) from None
        directions = _names(storage.get_study_directions(study_id))
    return StudyStore(url, study_name, directions=directions)


def list_studies(url: str) -> list[dict]:
    """Every study in the storage: name, n_trials (COMPLETE), best value(s), directions, description.

    `best_values` holds, per objective, the best finite value of a non-diverged trial (None if there is
    none); `best_value` is the first objective's.
    """
    require_existing_database(url)
    storage = open_storage(url)
    try:
        with database_errors(url, "list studies"):
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


# --- internals -------------------------------------------------------------------------------------


def _user_attrs(record: TrialRecord) -> dict[str, Any]:
    """A trial record as a stored trial's user attributes (the names every stored study uses)."""
    attrs = {
        "schedule": record.schedule.to_json(indent=None),
        "key": str(record.key),
        "metrics": {str(k): _encode_float(v) for k, v in record.metrics.items()},
        "diverged": bool(record.diverged),
        "stage": int(record.stage),
        "algorithm": str(record.algorithm),
        "cost": {str(k): _encode_float(v) for k, v in record.cost.items()},
        "n": int(record.n),
        "seed": int(record.seed),
    }
    if record.worker:
        attrs["worker"] = _json_plain(dict(record.worker), "the worker description")
    if record.refinement:
        attrs["refinement"] = _json_plain(dict(record.refinement), "the refinement summary")
    return attrs


def _record_of(trial: FrozenTrial) -> TrialRecord | None:
    """The trial record a stored trial holds; None without a readable "schedule" attribute. A trial
    without a "key" (written by another tool) is known by its schedule's decisions key."""
    attrs = trial.user_attrs
    if "schedule" not in attrs:
        return None
    try:
        schedule = SolverSchedule.from_json(attrs["schedule"])
    except (ScheduleError, TypeError):
        return None
    return TrialRecord(
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
