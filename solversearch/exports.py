"""Schedules for consumers that take only a list of times: diffusers pipelines and ComfyUI.

Beside the schedule JSON (schedule.py, which carries every decision), a schedule can be handed on as
the times a diffusers scheduler (`timesteps=` / `sigmas=`) or ComfyUI's custom sigmas take, in their
units. Such a list carries only the times: `dropped_decisions` says what else is lost.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SolversearchError
from .noise import DiscreteVP, KarrasVE, NoiseSchedule, RectifiedFlow
from .schedule import SolverSchedule

EXPORT_KINDS = ("timesteps", "sigmas")
EXPORT_FORMATS = ("solversearch", "diffusers", "comfyui")
LIST_NOTE = (
    "only the times transfer: the per-step solver decisions (order, prediction, scaling, corrector, "
    "skips) need solversearch's SearchedScheduler"
)


def export_diffusers(schedule: SolverSchedule, noise: NoiseSchedule, kind: str | None = None) -> dict:
    """The schedule's times in a form a diffusers pipeline takes (`timesteps=` or `sigmas=`), in the units of
    the path's diffusers scheduler.

    The exported times are where the schedule evaluates the model: its positive step-start times (all
    positive times when it ends at t = 0). diffusers supplies the final point itself (its
    final_sigmas_type), so a schedule ending at t_end > 0 keeps its NFE but ends at diffusers' final σ.
    `kind` defaults to integer timesteps on a discrete VP model and to sigmas elsewhere:
    - VP: σ/α = e^{−λ} (DDPM-family schedulers' sigma);
    - flow: the *unshifted* σ, because FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…) shifts custom
      sigmas too (by `shift`, or by the `mu` it is given): its shift lands them on the schedule's σ;
    - EDM: σ, and beside it `edm_euler_ramp`, what EDMEulerScheduler.set_timesteps(sigmas=…) takes (it maps
      a ramp in [0, 1] through its Karras formula rather than taking σ).
    The returned `dropped` lists what this schedule decides that a list of times cannot carry.
    """
    kind = kind or ("timesteps" if isinstance(noise, DiscreteVP) else "sigmas")
    if kind not in EXPORT_KINDS:
        raise SolversearchError(f"unknown export kind {kind!r}; expected one of {EXPORT_KINDS}")
    times = np.array([t for t in schedule.timesteps[:-1] if t > 0], dtype=np.float64)
    common = {"note": LIST_NOTE, "dropped": dropped_decisions(schedule, noise, final_point=False)}
    if kind == "sigmas":
        if isinstance(noise, RectifiedFlow):
            shift = f"mu={noise.mu!r}: pass it the same mu" if noise.use_dynamic_shifting else f"shift={noise.shift!r}"
            units = (
                "unshifted flow sigmas for FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=…), whose shift "
                f"({shift}) turns them into the schedule's σ ∈ (0, 1]; the scheduler appends the final 0"
            )
            return {"sigmas": _floats(noise.unshifted(times)), "units": units, **common}
        if isinstance(noise, KarrasVE):
            units = (
                "EDM σ (k-diffusion units); EDMEulerScheduler.set_timesteps(sigmas=torch.tensor(edm_euler_ramp)) "
                "lands on them, as its Karras formula maps the ramp to σ; the scheduler appends the final 0"
            )
            return {
                "sigmas": _floats(noise.sigma(times)),
                "edm_euler_ramp": _floats(edm_ramp(noise, times)),
                "units": units,
                **common,
            }
        units = "σ/α = sqrt((1 − ᾱ)/ᾱ), diffusers' sigma of DDPM-family schedulers (without the final 0)"
        return {"sigmas": _floats(np.exp(-noise.lambda_(times))), "units": units, **common}
    if not isinstance(noise, DiscreteVP):
        raise SolversearchError(
            f"integer diffusers timesteps need a discrete (diffusers) noise schedule, not {noise!r}; "
            "export kind 'sigmas' instead"
        )
    big_n = noise.num_train_timesteps
    steps = [min(max(math.floor(big_n * t - 1.0 + 0.5), 0), big_n - 1) for t in times]
    if len(set(steps)) != len(steps):
        raise SolversearchError(
            f"schedule {schedule.name or schedule.decisions_key()!r}: times {list(times)} round to repeated "
            f"training timesteps {steps}; export kind 'sigmas' instead"
        )
    return {"timesteps": steps, "units": "integer training timesteps of the DDPM-family scheduler", **common}


def export_comfyui(schedule: SolverSchedule, noise: NoiseSchedule) -> dict:
    """The schedule's times as a ComfyUI custom-sigmas list: every time including the last (0 when the
    schedule ends at t = 0), in ComfyUI's units — σ ∈ [0, 1] for flow models (used as given, already
    shifted), σ/α = e^{−λ} for VP and EDM models (σ itself on EDM, where α = 1)."""
    times = np.asarray(schedule.timesteps, dtype=np.float64)
    if isinstance(noise, RectifiedFlow):
        sigmas, units = noise.sigma(times), "flow σ ∈ [0, 1] (ComfyUI's flow models; no shift to apply)"
    elif isinstance(noise, KarrasVE):
        sigmas, units = noise.sigma(times), "EDM σ"
    else:
        sigmas, units = np.exp(-noise.lambda_(times)), "σ/α = sqrt((1 − ᾱ)/ᾱ) (ComfyUI's VP models)"
    return {
        "sigmas": _floats(sigmas),
        "units": units + ", including the final time",
        "note": LIST_NOTE,
        "dropped": dropped_decisions(schedule, noise, final_point=True),
    }


def dropped_decisions(schedule: SolverSchedule, noise: NoiseSchedule, final_point: bool) -> list[str]:
    """What `schedule` decides that a list of its times cannot carry, concretely; empty when the consumer's
    first-order solver (Euler / DDIM) at these times is the schedule. `final_point`: the list carries the
    last time itself (ComfyUI), else the consumer supplies its own final σ (diffusers)."""
    steps = schedule.steps
    dropped = []
    orders = [s.order for s in steps]
    if max(orders) > 1:
        dropped.append(
            f"per-step orders {orders} and their derivative estimates (the consumer's own solver runs instead)"
        )
    # A first-order step without corrector is the same update in either prediction form.
    noise_steps = [i for i, s in enumerate(steps) if s.prediction == "noise" and (s.order > 1 or s.corrector != "none")]
    if noise_steps:
        dropped.append(f"noise (ε) prediction at steps {noise_steps}")
    corrected = [i for i, s in enumerate(steps) if s.corrector != "none"]
    if corrected:
        dropped.append(f"the UniC corrector after steps {corrected}")
    skipping = [i for i, s in enumerate(steps) if s.skip]
    if skipping:
        dropped.append(f"skipped network blocks at steps {skipping}")
    if schedule.first_step == "analytic":
        dropped.append(
            f"the analytic first step: the consumer evaluates the model at t = {schedule.timesteps[0]:g} too "
            f"({schedule.nfe + 1} evaluations instead of {schedule.nfe})"
        )
    end = schedule.timesteps[-1]
    if end > 0 and not final_point:
        dropped.append(
            f"the end time t = {end:g} (σ = {float(noise.sigma(end)):.4g} > 0): diffusers ends at its own final σ "
            "(0 with final_sigmas_type='zero'), one more step of its solver"
        )
    return dropped


def edm_ramp(noise: KarrasVE, times: np.ndarray) -> np.ndarray:
    """The inverse of EDM's Karras formula σ = (σ_max^{1/ρ} + r (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ: the ramp r
    at which EDMEulerScheduler's `sigmas=` lands on σ(times)."""
    top, bottom = noise.sigma_max ** (1 / noise.rho), noise.sigma_min ** (1 / noise.rho)
    return (noise.sigma(times) ** (1 / noise.rho) - top) / (bottom - top)


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values).reshape(-1)]
