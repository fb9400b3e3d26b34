"""solversearch: search, export and load solver schedules for few-step diffusion sampling."""

from .errors import ScheduleError, SolversearchError
from .noise import DiscreteVP, LinearVP, NoiseSchedule, noise_schedule_from_dict
from .sampler import Solution, solve
from .schedule import FORMAT, SolverSchedule, Step, load_schedule

__version__ = "0.1.0"

__all__ = [
    "FORMAT",
    "DiscreteVP",
    "LinearVP",
    "NoiseSchedule",
    "ScheduleError",
    "Solution",
    "SolverSchedule",
    "SolversearchError",
    "Step",
    "load_schedule",
    "noise_schedule_from_dict",
    "solve",
]
