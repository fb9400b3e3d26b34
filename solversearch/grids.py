"""Timestep grids: the N + 1 times (from t_start down to t_end) at which a sampler with N steps stops.

Continuous grids (time-uniform, time-quadratic, logSNR-uniform, Karras ρ) run from the path's
`t_start` to a small t_end (on flow and EDM paths σ is proportional to t, so time-uniform is σ-uniform). The schedulers'
own grids end at σ = 0 (t = 0), as diffusers' schedulers do with `final_sigmas_type="zero"`: the
`timestep_spacing` grids of discrete VP models (integer training timesteps), the shifted flow sigmas
(`shifted`: FlowMatchEulerDiscreteScheduler's; `flow_sigmas`: DPMSolverMultistepScheduler's `use_flow_sigmas`)
and EDM's Karras sigmas (`edm`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import SolversearchError
from .noise import DiscreteVP, KarrasVE, NoiseSchedule, RectifiedFlow

DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")


def time_uniform(n: int, t_start: float = 1.0, t_end: float = 1e-3) -> np.ndarray:
    return t_start + np.arange(n + 1) / n * (t_end - t_start)


def time_quadratic(n: int, t_start: float = 1.0, t_end: float = 1e-3) -> np.ndarray:
    root = np.sqrt(t_start) + np.arange(n + 1) / n * (np.sqrt(t_end) - np.sqrt(t_start))
    return _pin_ends(root**2, t_start, t_end)


def logsnr_uniform(noise: NoiseSchedule, n: int, t_start: float = 1.0, t_end: float = 1e-3) -> np.ndarray:
    lam = np.linspace(noise.lambda_(t_start), noise.lambda_(t_end), n + 1)
    return _pin_ends(noise.t_of_lambda(lam), t_start, t_end)


def karras(noise: NoiseSchedule, n: int, t_start: float = 1.0, t_end: float = 1e-3, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s grid, uniform in σ̃^{1/ρ} with σ̃ = σ/α = e^{−λ}."""
    s_max, s_min = np.exp(-noise.lambda_(t_start)), np.exp(-noise.lambda_(t_end))
    ramp = np.arange(n + 1) / n
    sigma_tilde = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _pin_ends(noise.t_of_lambda(-np.log(sigma_tilde)), t_start, t_end)


def diffusers_timesteps(
    n: int, spacing: str, num_train_timesteps: int = 1000, steps_offset: int = 0, convention: str = "multistep"
) -> np.ndarray:
    """The integer training timesteps a diffusers scheduler evaluates the model at, largest first.

    `convention="multistep"` is what DPMSolverMultistep, UniPCMultistep, DEISMultistep and their
    relatives do (N + 1 points, the last one dropped); `convention="ddim"` is DDIMScheduler's.
    """
    if spacing not in DIFFUSERS_SPACINGS:
        raise SolversearchError(f"unknown timestep spacing {spacing!r}; expected one of {DIFFUSERS_SPACINGS}")
    if convention not in ("multistep", "ddim"):
        raise SolversearchError(f"unknown diffusers convention {convention!r}; expected 'multistep' or 'ddim'")
    if not 1 <= n <= num_train_timesteps:
        raise SolversearchError(f"the number of steps must be in 1..{num_train_timesteps}, got {n}")
    big_n = num_train_timesteps
    if spacing == "trailing":
        return np.arange(big_n, 0, -big_n / n).round().astype(np.int64) - 1
    if convention == "ddim":
        if spacing == "linspace":
            return np.linspace(0, big_n - 1, n).round()[::-1].astype(np.int64)
        return (np.arange(n) * (big_n // n))[::-1].astype(np.int64) + steps_offset
    if spacing == "linspace":
        return np.linspace(0, big_n - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return (np.arange(n + 1) * (big_n // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset


def diffusers_grid(
    noise: NoiseSchedule,
    n: int,
    spacing: str,
    steps_offset: int = 0,
    convention: str = "multistep",
    final: str = "zero",
) -> np.ndarray:
    """diffusers' timesteps as continuous t = (n + 1)/N, followed by the final time: t = 0 (σ = 0,
    `final_sigmas_type="zero"`) or the first training timestep (`"sigma_min"`)."""
    if final not in ("zero", "sigma_min"):
        raise SolversearchError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    if not isinstance(noise, DiscreteVP):
        raise SolversearchError(f"the {spacing!r} grid needs a discrete (diffusers) noise schedule, not {noise!r}")
    steps = diffusers_timesteps(n, spacing, noise.num_train_timesteps, steps_offset, convention)
    if np.any(np.diff(steps) >= 0) or steps[-1] < 0:
        raise SolversearchError(f"{n} steps with {spacing!r} spacing give repeated or negative timesteps: {steps}")
    t_final = 0.0 if final == "zero" else float(noise.timestep_to_t(0))
    return np.concatenate([noise.timestep_to_t(steps), [t_final]])


def flow_shifted(noise: NoiseSchedule, n: int) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's sigmas: n unshifted sigmas uniform from 1 to the training schedule's
    smallest sigma (itself shifted when the shift is static, as diffusers computes it), shifted, then 0."""
    flow = _flow(noise, "shifted")
    s_min = 1.0 / flow.num_train_timesteps
    if not flow.use_dynamic_shifting:
        s_min = float(flow.shifted(s_min))
    unshifted = np.linspace(flow.num_train_timesteps, s_min * flow.num_train_timesteps, n) / flow.num_train_timesteps
    return np.concatenate([flow.shifted(unshifted), [0.0]])


def flow_sigmas(noise: NoiseSchedule, n: int) -> np.ndarray:
    """DPMSolverMultistepScheduler's `use_flow_sigmas` grid: 1 − α for α uniform from 1/N to 1, shifted,
    largest n first, then 0; it starts at the shifted `t_start` = 1 − 1/N, below σ = 1.

    UniPCMultistepScheduler's default flow grid differs (before the shift its sigmas are 1/N larger, the
    first, σ = 1, nudged to 1 − 1e-6); it runs on this grid when handed `noise.unshifted(grid[:-1])` as `sigmas=`.
    """
    flow = _flow(noise, "flow_sigmas")
    unshifted = 1.0 - np.linspace(1.0, 1.0 / flow.num_train_timesteps, n + 1)
    return np.concatenate([flow.shifted(unshifted)[::-1][:-1], [0.0]])


def edm_karras(noise: NoiseSchedule, n: int) -> np.ndarray:
    """EDM's schedulers' grid: n Karras sigmas (ρ of the path) from σ_max to σ_min, then 0."""
    if not isinstance(noise, KarrasVE):
        raise SolversearchError(f"the 'edm' grid needs an EDM noise path, not {noise!r}")
    if n < 2:
        return np.array([1.0, 0.0])
    return np.concatenate([karras(noise, n - 1, 1.0, noise.t_of_sigma(noise.sigma_min), noise.rho), [0.0]])


def _flow(noise: NoiseSchedule, grid: str) -> RectifiedFlow:
    if not isinstance(noise, RectifiedFlow):
        raise SolversearchError(f"the {grid!r} grid needs a rectified-flow noise path, not {noise!r}")
    return noise


GridFn = Callable[[NoiseSchedule, int], np.ndarray]

GRIDS: dict[str, GridFn] = {
    "time_uniform": lambda noise, n: time_uniform(n, noise.t_start, noise.default_t_end(n)),
    "time_quadratic": lambda noise, n: time_quadratic(n, noise.t_start, noise.default_t_end(n)),
    "logsnr": lambda noise, n: logsnr_uniform(noise, n, noise.t_start, noise.default_t_end(n)),
    "karras": lambda noise, n: karras(noise, n, noise.t_start, noise.default_t_end(n)),
    "linspace": lambda noise, n: diffusers_grid(noise, n, "linspace"),
    "leading": lambda noise, n: diffusers_grid(noise, n, "leading"),
    "trailing": lambda noise, n: diffusers_grid(noise, n, "trailing"),
    "shifted": flow_shifted,
    "flow_sigmas": flow_sigmas,
    "edm": edm_karras,
}
# The schedulers' own grids exist only on their family of paths; the continuous ones on every path.
FAMILY_GRIDS: dict[str, tuple[str, ...]] = {
    "vp": ("linspace", "leading", "trailing"),
    "flow": ("shifted", "flow_sigmas"),
    "edm": ("edm",),
}


def grid_applies(name: str, noise: NoiseSchedule) -> bool:
    """Whether grid `name` exists on `noise` (the diffusers spacings need a discrete VP schedule)."""
    own = {g for grids in FAMILY_GRIDS.values() for g in grids}
    if name not in own:
        return name in GRIDS
    if name in FAMILY_GRIDS["vp"]:
        return isinstance(noise, DiscreteVP)
    return name in FAMILY_GRIDS[noise.family]


def make_grid(name: str, noise: NoiseSchedule, n_steps: int) -> np.ndarray:
    """A named grid with `n_steps` steps on `noise`, using the schedule's usual end points."""
    if name not in GRIDS:
        raise SolversearchError(f"unknown grid {name!r}; expected one of {sorted(GRIDS)}")
    if n_steps < 1:
        raise SolversearchError(f"a grid needs at least one step, got {n_steps}")
    return GRIDS[name](noise, n_steps)


def _pin_ends(t: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
    """Round trips through λ move the end points by an ulp; put them back exactly."""
    t = np.array(t, dtype=np.float64)
    t[0], t[-1] = t_start, t_end
    return t


def scheduler_grid(noise: NoiseSchedule) -> str:
    """The grid diffusers' multistep schedulers use on this family of paths: trailing timesteps (VP), the
    shifted flow sigmas of DPMSolverMultistep (flow) or Karras sigmas (EDM)."""
    return {"vp": "trailing", "flow": "flow_sigmas", "edm": "edm"}[noise.family]
