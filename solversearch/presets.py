"""The solvers users know, expressed as SolverSchedules so baselines and searched schedules share one code path.

Each builder takes the N + 1 times of a grid (see `grids.py`) and returns a schedule. Warm-up (order
min(k, i + 1)) and `lower_order_final` follow diffusers' multistep schedulers, so a preset on a
diffusers grid reproduces the corresponding diffusers scheduler step for step; a step to σ = 0 is
always first order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .errors import SolversearchError
from .grids import make_grid
from .noise import NoiseSchedule
from .schedule import SolverSchedule, Step, full_points

Times = Sequence[float] | np.ndarray


def ddim(times: Times, prediction: str = "data") -> SolverSchedule:
    """DDIM (η = 0): first order in either form (both are the same update)."""
    steps = [Step(prediction=prediction, order=1) for _ in range(len(times) - 1)]
    return _schedule("ddim", times, steps)


def dpmpp_2m(times: Times, solver_type: str = "midpoint", lower_order_final: bool = True) -> SolverSchedule:
    """DPM-Solver++(2M): data prediction, backward difference from the previous point.

    "midpoint" is the bh2 scaling of the first-derivative term; "heun" is the exact Taylor term.
    """
    if solver_type not in ("midpoint", "heun"):
        raise SolversearchError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    orders = _dpm_orders(len(times) - 1, 2, lower_order_final, _ends_at_zero(times))
    scaling = "bh2" if solver_type == "midpoint" else "none"
    steps = [Step.multistep(k, "data", scaling=scaling if k == 2 else "none") for k in orders]
    return _schedule("dpmpp_2m" if solver_type == "midpoint" else "dpmpp_2m_heun", times, steps)


def dpmpp_3m(times: Times, lower_order_final: bool = True, published: bool = True) -> SolverSchedule:
    """DPM-Solver++(3M) as diffusers runs it (order-2 warm-up / final steps are the midpoint 2M step).

    `published=True` keeps the published second-derivative coefficient, which is half the Taylor
    term and makes the method second order on exact-score problems (see the convergence tests);
    `published=False` uses the exact term (third order).
    """
    orders = _dpm_orders(len(times) - 1, 3, lower_order_final, _ends_at_zero(times))
    factor = 0.5 if published else 1.0
    steps = [
        Step.multistep(
            k, "data", scaling="bh2" if k == 2 else "none", second_derivative_factor=factor if k == 3 else 1.0
        )
        for k in orders
    ]
    return _schedule("dpmpp_3m" if published else "dpmpp_3m_exact", times, steps)


def unipc(
    times: Times, p: int = 2, variant: str = "bh2", prediction: str = "data", lower_order_final: bool = True
) -> SolverSchedule:
    """UniPC-p: UniP-p predictor with UniC-p corrector on every step but the last.

    Orders as diffusers' UniPCMultistepScheduler: min(p, steps left) with `lower_order_final`, and
    min(·, i + 1) for the warm-up. B(h) enters only order-2 updates (see `Step`).
    """
    if variant not in ("bh1", "bh2"):
        raise SolversearchError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(times) - 1
    steps = []
    for i in range(n):
        k = min(p, n - i) if lower_order_final else p
        k = min(k, i + 1)
        last = i == n - 1
        if last and _ends_at_zero(times):
            k = 1
        steps.append(
            Step.multistep(
                k,
                prediction,
                scaling=variant if k <= 2 and not (last and k == 1) else "none",
                corrector="none" if last else "unic",
            )
        )
    suffix = "" if prediction == "data" else "_noise"
    return _schedule(f"unipc_{p}_{variant}{suffix}", times, steps)


def deis(times: Times, order: int = 3, lower_order_final: bool = True) -> SolverSchedule:
    """DEIS-style multistep (ρAB in λ): noise prediction, polynomial extrapolation of ε through the
    last k points integrated exactly against the exponential weight — the exact Taylor terms."""
    orders = _dpm_orders(len(times) - 1, order, lower_order_final, _ends_at_zero(times))
    steps = [Step.multistep(k, "noise") for k in orders]
    return _schedule(f"deis_{order}", times, steps)


def _dpm_orders(n: int, order: int, lower_order_final: bool, ends_at_zero: bool) -> list[int]:
    """Per-step orders of diffusers' DPMSolverMultistepScheduler (and DEIS)."""
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        short = lower_order_final and n < 15
        if i == n - 1 and (short or ends_at_zero):
            k = 1
        elif i == n - 2 and short:
            k = min(k, 2)
        orders.append(k)
    return orders


def _ends_at_zero(times: Times) -> bool:
    return float(times[-1]) == 0.0


def _schedule(name: str, times: Times, steps: list[Step]) -> SolverSchedule:
    return SolverSchedule(timesteps=tuple(float(t) for t in times), steps=tuple(steps), name=name)


@dataclass(frozen=True)
class Preset:
    name: str
    build: Callable[[Times], SolverSchedule]
    description: str


def _presets() -> dict[str, Preset]:
    table = [
        Preset("ddim", ddim, "DDIM (first order)"),
        Preset("dpmpp_2m", dpmpp_2m, "DPM-Solver++(2M), midpoint"),
        Preset("dpmpp_2m_heun", lambda t: dpmpp_2m(t, "heun"), "DPM-Solver++(2M), heun"),
        Preset("dpmpp_3m", dpmpp_3m, "DPM-Solver++(3M), published coefficients"),
        Preset("deis_3", deis, "DEIS-style 3rd-order multistep, noise prediction"),
    ]
    for p in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for prediction in ("data", "noise"):
                preset = Preset(
                    f"unipc_{p}_{variant}" + ("" if prediction == "data" else "_noise"),
                    lambda t, p=p, v=variant, pr=prediction: unipc(t, p, v, pr),
                    f"UniPC-{p} ({variant}, {prediction} prediction)",
                )
                table.append(preset)
    return {preset.name: preset for preset in table}


PRESETS: dict[str, Preset] = _presets()


def build(name: str, noise: NoiseSchedule, nfe: int, grid: str = "logsnr") -> SolverSchedule:
    """Preset `name` with `nfe` network evaluations on the named grid, e.g. build("dpmpp_2m", noise, 10)."""
    if name not in PRESETS:
        raise SolversearchError(f"unknown solver preset {name!r}; expected one of {sorted(PRESETS)}")
    times = make_grid(grid, noise, nfe)
    schedule = PRESETS[name].build(times)
    if float(noise.alpha(times[0])) == 0.0:
        schedule = from_pure_noise(schedule)
    return schedule.with_metadata(name=f"{name}/{grid}/nfe{nfe}", noise_schedule=noise.to_dict())


def from_pure_noise(schedule: SolverSchedule) -> SolverSchedule:
    """The schedule for a grid that starts at α = 0 (a flow grid at σ = 1), where λ = −∞ and no
    derivative can be fitted through the first point: the first step becomes first order without
    corrector, and step i's order is capped at i, so the warm-up starts one step later."""
    steps = []
    for i, step in enumerate(schedule.steps):
        order = 1 if i == 0 else min(step.order, i)
        if order < step.order or i == 0:
            step = replace(
                step,
                order=order,
                derivative_points=full_points(order),
                scaling=step.scaling if order >= 2 else "none",
                linear_coefficient=step.linear_coefficient if order >= 2 else 0.0,
                first_derivative_factor=step.first_derivative_factor if order >= 2 else 1.0,
                second_derivative_factor=step.second_derivative_factor if order >= 3 else 1.0,
                corrector="none" if i == 0 else step.corrector,
            )
        steps.append(step)
    return replace(schedule, steps=tuple(steps))
