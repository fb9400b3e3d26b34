"""The algorithm registry: one mapping from an experiment's algorithm name to the factory of its searcher.

The CLI's choices, the experiment validator and the runner all read this one mapping, and every
searcher is built by `make_searcher`, so a name is accepted in one place exactly when it can be built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from .autodiffusion import AutoDiffusionSearcher
from .base import Observation, ScheduleSearcher
from .evolution import EvolutionSearcher, HybridS3Searcher, S3Searcher
from .optuna_samplers import SAMPLERS, OptunaScheduleSearcher
from .random_search import RandomSearcher
from .refine import RefineSearcher
from .space import SearchSpace


@dataclass(frozen=True)
class SearcherRequest:
    """Everything a factory may use to build a searcher; `settings` are the algorithm's own."""

    space: SearchSpace
    nfe: int | tuple[int, ...]
    noise: NoiseSchedule
    settings: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    metric: str | tuple[str, ...] = "fid"
    history: tuple[Observation, ...] = ()
    units: tuple[str, ...] = ()  # the model's prunable blocks (spaces that skip blocks)
    costs: Any = None  # their MACs (models.pruning.UnitCosts)


SearcherFactory = Callable[[str, SearcherRequest], ScheduleSearcher]


def _one_metric_one_budget(cls: type[ScheduleSearcher]) -> SearcherFactory:
    """A searcher of one objective at one NFE, over continuous schedules."""

    def build(name: str, request: SearcherRequest) -> ScheduleSearcher:
        if not isinstance(request.metric, str):
            raise SolversearchError(f"algorithm {name!r} optimises one metric; use nsga2 for several")
        searcher = _constructed(name, cls, request)
        if request.units:
            searcher.use_units(request.units)
        return searcher

    return build


def _autodiffusion(name: str, request: SearcherRequest) -> ScheduleSearcher:
    return _constructed(name, AutoDiffusionSearcher, request, costs=request.costs)


def _constructed(name: str, cls: type[ScheduleSearcher], request: SearcherRequest, **extra: Any) -> ScheduleSearcher:
    """`cls` built from the request and the algorithm's own settings; a setting it does not take is a
    user error naming the algorithm."""
    try:
        return cls(
            request.space,
            request.nfe,
            request.noise,
            seed=request.seed,
            metric=request.metric,
            history=request.history,
            **extra,
            **request.settings,
        )
    except TypeError as exc:
        raise SolversearchError(f"algorithm {name!r}: bad settings ({exc})") from None


def _optuna_sampler(name: str, request: SearcherRequest) -> ScheduleSearcher:
    if request.settings:
        raise SolversearchError(f"algorithm {name!r} takes no settings, got {sorted(request.settings)}")
    if request.space.skip is not None:
        raise SolversearchError(f"{name} does not search skip sets; use s3, evolution, random or autodiffusion")
    return OptunaScheduleSearcher(
        request.space,
        request.nfe,
        request.noise,
        sampler=name,
        metric=request.metric,
        seed=request.seed,
        history=request.history,
    )


REGISTRY: Mapping[str, SearcherFactory] = {
    "s3": _one_metric_one_budget(S3Searcher),
    "s3_refine": _one_metric_one_budget(HybridS3Searcher),
    "evolution": _one_metric_one_budget(EvolutionSearcher),
    "random": _one_metric_one_budget(RandomSearcher),
    "refine": _one_metric_one_budget(RefineSearcher),
    "autodiffusion": _autodiffusion,
    **dict.fromkeys(SAMPLERS, _optuna_sampler),
}
ALGORITHMS = tuple(REGISTRY)
REFINING = ("s3_refine", "refine")  # algorithms whose trials refine schedules (they need the teacher)
SEVERAL_BUDGETS = ("nsga2",)  # algorithms that may choose among several NFE budgets


def check_algorithm(name: str) -> str:
    """`name` if the registry knows it; else a user error listing the names it knows."""
    if name not in REGISTRY:
        raise SolversearchError(f"unknown algorithm {name!r}; expected one of {list(ALGORITHMS)}")
    return name


def make_searcher(
    algorithm: str,
    space: SearchSpace,
    nfe: int | Sequence[int],
    noise: NoiseSchedule,
    *,
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    metric: str | Sequence[str] = "fid",
    history: Iterable[Observation] = (),
    units: Sequence[str] = (),
    costs: Any = None,
) -> ScheduleSearcher:
    """The searcher an experiment names, with its settings (unknown names and settings are user errors).

    `history` is what the study already holds (a searcher rebuilt from it resumes the search); `units`
    (the model's prunable blocks) and `costs` (their MACs) are needed by spaces that skip blocks."""
    check_algorithm(algorithm)
    if not isinstance(nfe, int) and algorithm not in SEVERAL_BUDGETS:
        raise SolversearchError(
            f"nfe: a list of budgets ({list(nfe)}) needs algorithm nsga2 with objectives [metric, nfe]"
        )
    if space.skip is not None and not units and costs is None:
        raise SolversearchError(f"the space {space.name!r} skips network blocks, but the model has no prunable units")
    request = SearcherRequest(
        space=space,
        nfe=nfe if isinstance(nfe, int) else tuple(nfe),
        noise=noise,
        settings=dict(settings or {}),
        seed=seed,
        metric=metric if isinstance(metric, str) else tuple(metric),
        history=tuple(history),
        units=tuple(units),
        costs=costs,
    )
    return REGISTRY[algorithm](algorithm, request)
