"""Run every preset × grid at given NFEs on one model and rank them by error to a reference solution.

The reference is the same ODE solved from the same x_T with many steps of a third-order solver (see
`reference_solution`), so the error measures the solver alone, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from . import presets
from .errors import SolversearchError
from .grids import GRIDS
from .noise import NoiseSchedule
from .sampler import solve

REFERENCE_STEPS = 500


@dataclass(frozen=True)
class BaselineRow:
    solver: str
    grid: str
    nfe: int
    error_to_reference: float


def reference_solution(
    denoiser: Callable, noise: NoiseSchedule, x_T: torch.Tensor, t_start: float, t_end: float
) -> torch.Tensor:
    """A high-accuracy solution from (t_start, x_T) to t_end: UniPC-3 (4th order) on a fine λ grid.

    A final step to t = 0 is the data prediction at the last positive time, so the reference for
    t_end = 0 is the fine solution to t = 1/(number of training steps) followed by that step.
    """
    from .grids import logsnr_uniform

    last_positive = t_end if t_end > 0 else noise.default_t_end(REFERENCE_STEPS)
    times = list(logsnr_uniform(noise, REFERENCE_STEPS, t_start, last_positive))
    if t_end == 0:
        times.append(0.0)
    schedule = presets.unipc(times, p=3, variant="bh2", lower_order_final=False)
    return solve(denoiser, schedule, x_T, noise).sample


def run_baselines(
    denoiser: Callable,
    nfes: Iterable[int],
    n: int = 256,
    seed: int = 0,
    solvers: Sequence[str] | None = None,
    grids: Sequence[str] | None = None,
    sample_shape: tuple[int, ...] | None = None,
    on_row: Callable[[BaselineRow], None] | None = None,
) -> list[BaselineRow]:
    """Evaluate each solver preset × grid at each NFE on the same x_T; rows in evaluation order."""
    noise: NoiseSchedule = denoiser.noise_schedule
    shape = sample_shape or getattr(denoiser, "sample_shape", None)
    if shape is None:
        raise SolversearchError("the model does not say its sample shape; pass sample_shape=")
    solvers = list(solvers or presets.PRESETS)
    grids = [g for g in (grids or GRIDS) if _grid_applies(g, noise)]
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    references: dict[tuple[float, float], torch.Tensor] = {}
    rows = []
    for nfe in nfes:
        for grid in grids:
            for solver in solvers:
                schedule = presets.build(solver, noise, nfe, grid)
                key = (schedule.timesteps[0], schedule.timesteps[-1])
                if key not in references:
                    references[key] = reference_solution(denoiser, noise, x_T, *key)
                row = BaselineRow(solver, grid, nfe, _rmse(solve(denoiser, schedule, x_T).sample, references[key]))
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def _grid_applies(grid: str, noise: NoiseSchedule) -> bool:
    from .noise import DiscreteVP

    return isinstance(noise, DiscreteVP) or grid not in ("linspace", "leading", "trailing")


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a - b) ** 2)))

