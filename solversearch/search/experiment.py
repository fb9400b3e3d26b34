"""Experiments: model + metric + search space + algorithm + budget + resources + storage, read from YAML.

Relative paths (the space, an Inception file, a reference) are resolved against the experiment file's folder.
Command-line overrides (`--nfe`, `--budget`, …) are applied with `Experiment.override`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import SolversearchError
from ..evaluator import EvaluationSettings
from ..grids import GRIDS
from ..presets import PRESETS
from ..refine import HELDOUT_SEED, TRAIN_SEED
from .files import read_yaml
from .registry import ALGORITHMS, REFINING
from .space import SearchSpace, load_space

# Objectives a search may minimise: FID / KID to the reference distribution, the perceptual distance to
# the teacher (the converged solution from the same x_T) and the pixel RMS distance to it.
METRICS = ("fid", "kid", "teacher_distance", "error_to_reference")
SELECTION_SEED_OFFSET = 1000  # the selection seed is the search seed + this
MAX_SEARCH_NFE = 50  # searches are for few-step sampling; the predictor and operators grow with the steps


class ExperimentError(SolversearchError):
    """An experiment file is invalid."""


@dataclass(frozen=True)
class MetricConfig:
    name: str = "fid"
    n: int = 500
    seed: int = 0
    batch_size: int = 500
    features: str | None = None
    inception_path: str | None = None
    error_to_reference: bool = True  # the teacher distances, reported for every evaluation
    mixed_precision: bool = False
    # "data", "model", or a path: an image folder, an .npz of images, or pytorch-fid / clean-fid statistics
    reference: str | None = None
    reference_n: int | None = None  # samples of the model's own converged distribution (default: n)


@dataclass(frozen=True)
class BudgetConfig:
    evaluations: int = 100
    wall_time_s: float | None = None


@dataclass(frozen=True)
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0
    concurrent: int = 2
    batch: int = 1  # schedules per Ray Tune trial, scored on one resident model (search/batching.py)
    custom: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    model: str
    space: SearchSpace
    space_path: str
    nfe: int | tuple[int, ...]
    metric: MetricConfig = field(default_factory=MetricConfig)
    algorithm: str = "s3"
    algorithm_seed: int = 0
    algorithm_settings: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = ()  # multi-objective (nsga2): e.g. ("fid", "nfe")
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage_url: str | None = None
    study: str | None = None
    ray_address: str | None = None
    validation_seed: int = 1  # the first of `validation_count` consecutive validation seeds
    validation_count: int = 5
    validation_factor: int = 2
    validation_top: int = 8  # candidates re-scored on a fresh selection seed before the winner is chosen
    compare: tuple[str, ...] = ()  # other studies in the same storage whose best schedules the report re-scores
    # The baseline pool (search/baseline_pool.py): presets and grids ("all" or names), and how many of
    # the best get every end time and first step the space allows.
    baselines: Mapping[str, Any] = field(default_factory=lambda: {"presets": "all", "grids": "all", "variants_of": 8})

    @property
    def selection_seed(self) -> int:
        return self.metric.seed + SELECTION_SEED_OFFSET

    @property
    def validation_seeds(self) -> tuple[int, ...]:
        return tuple(range(self.validation_seed, self.validation_seed + self.validation_count))

    @property
    def study_name(self) -> str:
        if self.study:
            return self.study
        nfe = self.nfe if isinstance(self.nfe, int) else "-".join(map(str, self.nfe))
        suffix = "-mo" if self.objectives else ""
        return f"{self.name}-nfe{nfe}{suffix}"

    def override(self, **changes: Any) -> Experiment:
        """Apply command-line overrides; None values leave the experiment unchanged."""
        changes = {k: v for k, v in changes.items() if v is not None}
        budget = self.budget
        if "budget" in changes:
            budget = replace(budget, evaluations=_positive_int(changes.pop("budget"), "budget"))
        if "nfe" in changes:
            changes["nfe"] = _nfe(changes["nfe"])
        if changes.get("algorithm", self.algorithm) != self.algorithm:
            changes["algorithm_settings"] = {}  # the file's settings belong to its own algorithm
        return replace(self, budget=budget, **changes)


def evaluation_settings(experiment: Experiment, device: str = "cpu") -> EvaluationSettings:
    """How the search scores a schedule (a worker may move it to its GPU)."""
    m = experiment.metric
    return EvaluationSettings(
        n=m.n,
        seed=m.seed,
        batch_size=m.batch_size,
        device=device,
        mixed_precision=m.mixed_precision,
        features=m.features,
        inception_path=m.inception_path,
        error_to_reference=m.error_to_reference,
        reference=m.reference,
        reference_n=m.reference_n,
    )


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    doc = read_yaml(path, ExperimentError, "experiment")
    try:
        return experiment_from_dict(doc, base=path.parent, default_name=path.stem)
    except ExperimentError as exc:
        raise ExperimentError(f"{path}: {exc}") from None


def experiment_from_dict(doc: Any, base: Path = Path("."), default_name: str = "experiment") -> Experiment:
    if not isinstance(doc, Mapping):
        raise ExperimentError("an experiment must be a mapping")
    known = {
        "name",
        "model",
        "metric",
        "space",
        "nfe",
        "algorithm",
        "budget",
        "resources",
        "storage",
        "ray",
        "validation",
        "objectives",
        "compare",
        "baselines",
    }
    _no_unknown(doc, known, "")
    for key in ("model", "space", "nfe"):
        if key not in doc:
            raise ExperimentError(f"{key}: required")
    space_path = (base / str(doc["space"])).resolve()
    space = load_space(space_path)

    metric_doc = _mapping(doc.get("metric", {}), "metric")
    _no_unknown(metric_doc, {f.name for f in fields(MetricConfig)}, "metric.")
    if metric_doc.get("batch_size") == "auto":  # the largest batch that fits the worker's device
        metric_doc = {**metric_doc, "batch_size": 0}
    metric = MetricConfig(**metric_doc)
    _seed(metric.seed, "metric.seed")
    for key in ("error_to_reference", "mixed_precision"):
        if not isinstance(getattr(metric, key), bool):
            raise ExperimentError(f"metric.{key}: must be true or false, got {getattr(metric, key)!r}")
    for key in ("features", "inception_path"):
        if getattr(metric, key) is not None and not isinstance(getattr(metric, key), str):
            raise ExperimentError(f"metric.{key}: must be a name or a path, got {getattr(metric, key)!r}")
    if not isinstance(metric.name, str) or metric.name not in METRICS:
        raise ExperimentError(f"metric.name: unknown metric {metric.name!r}; expected one of {list(METRICS)}")
    _positive_int(metric.n, "metric.n")
    if metric.batch_size != 0:
        _positive_int(metric.batch_size, "metric.batch_size")
    if metric.name in ("teacher_distance", "error_to_reference") and not metric.error_to_reference:
        metric = replace(metric, error_to_reference=True)
    if metric.inception_path:
        metric = replace(metric, inception_path=str((base / metric.inception_path).resolve()))
    if metric.reference is not None and (not isinstance(metric.reference, str) or not metric.reference.strip()):
        raise ExperimentError(
            f"metric.reference: must be 'data', 'model' or the path of an image folder or .npz, got {metric.reference!r}"
        )
    if metric.reference is not None and metric.reference not in ("data", "model"):  # "./data" is a folder named data
        metric = replace(metric, reference=str((base / Path(metric.reference).expanduser()).resolve()))
    if metric.reference_n is not None and _positive_int(metric.reference_n, "metric.reference_n") < 2:
        raise ExperimentError("metric.reference_n: a reference needs at least 2 samples")

    algorithm_doc = doc.get("algorithm", {"name": "s3"})
    if isinstance(algorithm_doc, str):
        algorithm_doc = {"name": algorithm_doc}
    algorithm_doc = _mapping(algorithm_doc, "algorithm")
    _no_unknown(algorithm_doc, {"name", "seed", "settings"}, "algorithm.")

    budget_doc = _mapping(doc.get("budget", {}), "budget")
    _no_unknown(budget_doc, {"evaluations", "wall_time_s"}, "budget.")
    wall_time = budget_doc.get("wall_time_s")
    budget = BudgetConfig(
        evaluations=_positive_int(budget_doc.get("evaluations", BudgetConfig.evaluations), "budget.evaluations"),
        wall_time_s=None if wall_time is None else _number(wall_time, "budget.wall_time_s", positive=True),
    )
    resources_doc = _mapping(doc.get("resources", {}), "resources")
    _no_unknown(resources_doc, {f.name for f in fields(ResourcesConfig)}, "resources.")
    custom = _mapping(resources_doc.get("custom", {}) or {}, "resources.custom")
    resources = ResourcesConfig(
        cpu=_number(resources_doc.get("cpu", ResourcesConfig.cpu), "resources.cpu", positive=True),
        gpu=_number(resources_doc.get("gpu", ResourcesConfig.gpu), "resources.gpu"),
        concurrent=_positive_int(resources_doc.get("concurrent", ResourcesConfig.concurrent), "resources.concurrent"),
        batch=_positive_int(resources_doc.get("batch", ResourcesConfig.batch), "resources.batch"),
        custom={str(k): _number(v, f"resources.custom.{k}") for k, v in custom.items()},
    )
    storage_doc = _mapping(doc.get("storage", {}), "storage")
    _no_unknown(storage_doc, {"url", "study"}, "storage.")
    ray_doc = _mapping(doc.get("ray", {}) or {}, "ray")
    _no_unknown(ray_doc, {"address"}, "ray.")
    validation_doc = _mapping(doc.get("validation", {}), "validation")
    _no_unknown(validation_doc, {"seed", "seeds", "n_factor", "select_top"}, "validation.")

    algorithm = algorithm_doc.get("name", "s3")
    if algorithm not in ALGORITHMS:
        raise ExperimentError(f"algorithm.name: unknown algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")
    objectives = tuple(doc.get("objectives", ()))
    if objectives and (
        objectives[0] not in METRICS or any(o not in METRICS + ("nfe", "seconds", "macs") for o in objectives)
    ):
        raise ExperimentError(f"objectives: expected a metric followed by nfe / seconds / macs, got {list(objectives)}")
    return _check_seeds(
        Experiment(
            name=str(doc.get("name", default_name)),
            model=str(doc["model"]),
            space=space,
            space_path=str(space_path),
            nfe=_nfe(doc["nfe"]),
            metric=metric,
            algorithm=algorithm,
            algorithm_seed=_seed(algorithm_doc.get("seed", 0), "algorithm.seed"),
            algorithm_settings=_algorithm_settings(algorithm_doc.get("settings") or {}, base),
            objectives=objectives,
            budget=budget,
            resources=resources,
            storage_url=storage_doc.get("url"),
            study=storage_doc.get("study"),
            ray_address=ray_doc.get("address"),
            validation_seed=_seed(validation_doc.get("seed", 1), "validation.seed"),
            validation_count=_positive_int(validation_doc.get("seeds", 5), "validation.seeds"),
            validation_factor=_positive_int(validation_doc.get("n_factor", 2), "validation.n_factor"),
            validation_top=_positive_int(validation_doc.get("select_top", 8), "validation.select_top"),
            compare=_names(doc.get("compare", ()), "compare"),
            baselines=_baselines(doc.get("baselines", {})),
        )
    )


def _check_seeds(experiment: Experiment) -> Experiment:
    """Search, selection and validation noise never overlap: a winner is reported on noise it never saw."""
    search, selection = experiment.metric.seed, experiment.selection_seed
    clash = sorted({search, selection} & set(experiment.validation_seeds))
    if clash:
        raise ExperimentError(
            f"validation.seed: the validation seeds {list(experiment.validation_seeds)} include seed {clash[0]}, which "
            f"the search (metric.seed {search}) or the selection (seed {selection}) uses; pick another validation.seed"
        )
    refine = experiment.algorithm_settings.get("refine") if experiment.algorithm in REFINING else None
    if isinstance(refine, Mapping):
        used = {search, selection, *experiment.validation_seeds}
        for name, default in (("seed", TRAIN_SEED), ("heldout_seed", HELDOUT_SEED)):
            if refine.get(name, default) in used:
                raise ExperimentError(
                    f"algorithm.settings.refine.{name}: {refine.get(name)} is a search, selection or validation "
                    "seed; refinement must learn on noise no evaluation uses"
                )
    return experiment


def _algorithm_settings(value: Any, base: Path) -> dict[str, Any]:
    """The algorithm's own settings (its searcher checks them); a warm-start schedule path is resolved
    against the experiment's folder, like every other path in it."""
    settings = dict(_mapping(value, "algorithm.settings"))
    warm_start = settings.get("warm_start")
    if isinstance(warm_start, str):
        settings["warm_start"] = str((base / Path(warm_start).expanduser()).resolve())
    elif isinstance(warm_start, (list, tuple)) and all(isinstance(p, str) for p in warm_start):
        settings["warm_start"] = [str((base / Path(p).expanduser()).resolve()) for p in warm_start]
    return settings


def _baselines(value: Any) -> dict[str, Any]:
    doc = _mapping(value or {}, "baselines")
    _no_unknown(doc, {"presets", "grids", "variants_of"}, "baselines.")
    chosen = {}
    for key, known in (("presets", PRESETS), ("grids", GRIDS)):
        names = doc.get(key, "all")
        if names != "all":
            names = _names(names, f"baselines.{key}")
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ExperimentError(
                    f"baselines.{key}: unknown names {unknown}; expected 'all' or some of {sorted(known)}"
                )
        chosen[key] = names
    variants = doc.get("variants_of", 8)
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 0:
        raise ExperimentError(f"baselines.variants_of: must be a non-negative integer, got {variants!r}")
    return {**chosen, "variants_of": variants}


def _seed(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ExperimentError(f"{key}: must be a non-negative integer, got {value!r}")
    return value


def _number(value: Any, key: str, positive: bool = False) -> float:
    """A finite number ≥ 0 (> 0 if `positive`)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ExperimentError(f"{key}: must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ExperimentError(f"{key}: must be a list of study names")
    return tuple(value)


def _nfe(value: Any) -> int | tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise ExperimentError("nfe: must not be empty")
    for v in values:
        if _positive_int(v, "nfe") > MAX_SEARCH_NFE:
            raise ExperimentError(
                f"nfe: {v} network evaluations is not a few-step schedule; a search takes NFE 1–{MAX_SEARCH_NFE} "
                "(at more, the hand-designed solvers have converged)"
            )
    return values if len(values) > 1 else values[0]


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExperimentError(f"{key}: must be a positive integer, got {value!r}")
    return value


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ExperimentError(f"{key}: must be a mapping, got {type(value).__name__}")
    return value


def _no_unknown(doc: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ExperimentError(f"{prefix}{unknown[0]}: unknown key; expected one of {sorted(known)}")
