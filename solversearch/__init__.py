"""solversearch: search, export and load solver schedules for few-step diffusion sampling."""

from .errors import ScheduleError, SolversearchError
from .noise import (
    DiscreteVP,
    KarrasVE,
    LinearVP,
    NoiseSchedule,
    RectifiedFlow,
    VariancePreserving,
    noise_schedule_from_dict,
    noise_schedule_from_diffusers_config,
)
from .sampler import Solution, solve
from .schedule import FORMAT, SolverSchedule, Step, load_schedule

__version__ = "0.1.0"


def sample(*args, **kwargs):
    """Images from a schedule in one call; see `solversearch.inference.sample`."""
    from .inference import sample as _sample

    return _sample(*args, **kwargs)


def __getattr__(name: str):
    # The diffusers scheduler imports diffusers; load it only when asked for.
    if name == "SearchedScheduler":
        from .inference import SearchedScheduler

        return SearchedScheduler
    raise AttributeError(f"module 'solversearch' has no attribute {name!r}")


__all__ = [
    "FORMAT",
    "DiscreteVP",
    "KarrasVE",
    "LinearVP",
    "NoiseSchedule",
    "RectifiedFlow",
    "ScheduleError",
    "SearchedScheduler",
    "Solution",
    "SolverSchedule",
    "SolversearchError",
    "Step",
    "VariancePreserving",
    "load_schedule",
    "noise_schedule_from_dict",
    "noise_schedule_from_diffusers_config",
    "sample",
    "solve",
]
