"""The unified sampler: runs any SolverSchedule on a denoiser `denoiser(x, t) -> ε`.

A pure function of (denoiser, noise schedule, schedule, x_T). The coefficients come from
`plan.compile_plan` before the loop; inside it there are only model calls and tensor
combinations with Python floats, so nothing waits for the device. Works batched, on any device and
dtype (the model values are combined in the dtype of x_T). `SamplerState.advance` is the one step
both this loop and the diffusers scheduler (`inference.SearchedScheduler`) run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class SamplerState:
    """The sampler's memory between steps: the current x, where the last step started, and the model
    values (ε and x̂₀) at the points later updates still read."""

    x: torch.Tensor
    x_start: torch.Tensor
    eps_at: dict[int, torch.Tensor] = field(default_factory=dict)
    x0_at: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, x_T: torch.Tensor) -> SamplerState:
        return cls(x=x_T, x_start=x_T)

    def advance(self, plan: SamplingPlan, i: int, eps: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Step i given ε̂ (and x̂₀, if the model gave it) at (x, t_i): store the point, apply the pending UniC
        correction of step i − 1, then predict x(t_{i+1}). Returns the corrected x(t_i) (the trajectory point)."""
        step = plan.steps[i]
        self.eps_at[i] = eps
        # At the uncorrected x, as UniPC does.
        self.x0_at[i] = (self.x - step.sigma * eps) / step.alpha if x0 is None else x0
        if step.correct_previous is not None:
            self.x = _combine(step.correct_previous, self.x_start, self.eps_at, self.x0_at)
        corrected = self.x
        self.x_start = self.x
        self.x = _combine(step.predict, self.x, self.eps_at, self.x0_at)
        for point in step.release:
            del self.eps_at[point], self.x0_at[point]
        return corrected


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
    # Each step's t is a fill kernel from a Python float: a host→device copy of a time table would
    # synchronise on CUDA (pageable memory), a fill does not.
    state = SamplerState.start(x_T)
    trajectory = [x_T] if return_trajectory else None
    for i, step in enumerate(plan.steps):
        x0 = None
        if not step.evaluate:
            eps = state.x / step.prior_std  # the analytic first step: ε̂(x_T, T) = x_T/σ_T (x_T on VP)
        else:
            t = _times(step.t, batch, time_dtype, x_T.device)
            options = {"skip": step.skip} if step.skip else {}
            if step.target == "x0":  # α = 0: only the model knows x̂₀, and ε = x/σ follows from it
                x0 = denoiser(state.x, t, target="x0", **options)
                eps = state.x / step.sigma
            else:
                eps = denoiser(state.x, t, **options)
        corrected = state.advance(plan, i, eps, x0)
        if trajectory is not None and i > 0:
            trajectory.append(corrected)
    if trajectory is not None:
        trajectory.append(state.x)
    return Solution(sample=state.x, trajectory=None if trajectory is None else tuple(trajectory))


def _times(t: float | torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(t, torch.Tensor):  # a differentiable plan: keep the graph to the time
        return t.to(device=device, dtype=dtype).expand(batch)
    return torch.full((batch,), t, dtype=dtype, device=device)


def _combine(
    update: LinearUpdate, x: torch.Tensor, eps_at: dict[int, torch.Tensor], x0_at: dict[int, torch.Tensor]
) -> torch.Tensor:
    values = x0_at if update.uses == "x0" else eps_at
    if isinstance(update.x_coef, torch.Tensor):  # a differentiable plan (differentiable.py)
        out = update.x_coef.to(x) * x
        for point, weight in update.weights:
            out = out + weight.to(x) * values[point]
        return out
    largest = torch.finfo(x.dtype).max
    out = x * _representable(update.x_coef, largest) if update.x_coef != 0.0 else torch.zeros_like(x)
    for point, weight in update.weights:
        out = out.add(values[point], alpha=_representable(weight, largest))
    return out


def _representable(value: float, largest: float) -> float:
    """A coefficient beyond the dtype's range becomes ±inf (a diverging schedule yields inf/NaN samples)
    instead of torch's overflow error."""
    return value if abs(value) <= largest else math.copysign(math.inf, value)
