"""The unified sampler: runs any SolverSchedule on a denoiser `denoiser(x, t) -> ε`.

A pure function of (denoiser, noise schedule, schedule, x_T). The coefficients come from
`plan.compile_plan` before the loop; inside it there are only model calls and tensor
combinations with Python floats, so nothing waits for the device. Works batched, on any device and
dtype (the model values are combined in the dtype of x_T).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import SolversearchError
from .noise import NoiseSchedule
from .plan import LinearUpdate, SamplingPlan, compile_plan
from .schedule import SolverSchedule

DenoiserFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Solution:
    """The final sample, and the states x(t_i) at every time of the schedule if asked for."""

    sample: torch.Tensor
    trajectory: tuple[torch.Tensor, ...] | None = None


def solve(
    denoiser: DenoiserFn,
    schedule: SolverSchedule,
    x_T: torch.Tensor,
    noise: NoiseSchedule | None = None,
    *,
    return_trajectory: bool = False,
) -> Solution:
    """Integrate the probability-flow ODE from x_T with `schedule`.

    `noise` defaults to `denoiser.noise_schedule`. `denoiser(x, t)` receives t as a tensor of shape
    (batch,) with the continuous times; for steps with skipped blocks it is called with `skip=`.
    """
    if noise is None:
        noise = getattr(denoiser, "noise_schedule", None)
        if noise is None:
            raise SolversearchError("solve() needs a noise schedule: pass noise= or use a denoiser that has one")
    return execute(compile_plan(schedule, noise), denoiser, x_T, return_trajectory=return_trajectory)


def execute(
    plan: SamplingPlan, denoiser: DenoiserFn, x_T: torch.Tensor, *, return_trajectory: bool = False
) -> Solution:
    """Run a compiled plan. Reuse one plan for many batches: compiling is the only host-side work."""
    batch = x_T.shape[0]
    time_dtype = torch.float64 if x_T.dtype == torch.float64 else torch.float32
    times = torch.tensor([s.t for s in plan.steps], dtype=time_dtype, device=x_T.device)
    eps_at: dict[int, torch.Tensor] = {}
    x0_at: dict[int, torch.Tensor] = {}
    x, x_start = x_T, x_T
    trajectory = [x_T] if return_trajectory else None
    for i, step in enumerate(plan.steps):
        if step.evaluate:
            t = times[i].expand(batch)
            eps = denoiser(x, t, skip=step.skip) if step.skip else denoiser(x, t)
        else:
            eps = x  # the analytic first step: ε̂(x_T, T) = x_T
        eps_at[i] = eps
        x0_at[i] = (x - step.sigma * eps) / step.alpha
        if step.correct_previous is not None:
            x = _combine(step.correct_previous, x_start, eps_at, x0_at)
        if trajectory is not None and i > 0:
            trajectory.append(x)
        x_start = x
        x = _combine(step.predict, x, eps_at, x0_at)
        for point in step.release:
            del eps_at[point], x0_at[point]
    if trajectory is not None:
        trajectory.append(x)
    return Solution(sample=x, trajectory=None if trajectory is None else tuple(trajectory))


def _combine(
    update: LinearUpdate, x: torch.Tensor, eps_at: dict[int, torch.Tensor], x0_at: dict[int, torch.Tensor]
) -> torch.Tensor:
    values = x0_at if update.uses == "x0" else eps_at
    out = x * update.x_coef if update.x_coef != 0.0 else torch.zeros_like(x)
    for point, weight in update.weights:
        out = out.add(values[point], alpha=weight)
    return out
