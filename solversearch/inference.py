"""Use a searched schedule at inference: a diffusers scheduler, and checks that it fits the model.

`SearchedScheduler.from_schedule(path, pipe.scheduler.config)` drops into any diffusers pipeline that
runs the usual `set_timesteps` / `scale_model_input` / `step` loop. Each `step` runs exactly the
update `solversearch.solve` runs (`SamplerState.advance`), so both give the same samples.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .errors import NoiseScheduleError, ScheduleError, SolversearchError
from .noise import DiscreteVP, NoiseSchedule, noise_schedule_from_dict
from .plan import SamplingPlan, compile_plan
from .sampler import SamplerState
from .schedule import SolverSchedule, load_schedule

NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


class SearchedScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs one solversearch schedule (its steps, orders, correctors, …).

    `timesteps` are the network's own time inputs (N·t − 1) at the schedule's model evaluations;
    `set_timesteps(None)` or `set_timesteps(schedule.nfe)` accepts the schedule, any other step count
    is an error. The schedule travels inside the config, so `save_pretrained` / `from_pretrained`
    round-trip it.
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        schedule: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
    ):
        if schedule is None:
            raise ScheduleError("SearchedScheduler needs a schedule: use SearchedScheduler.from_schedule(path, config)")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ScheduleError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
        self.schedule = SolverSchedule.from_dict(schedule)
        self.noise = DiscreteVP.from_diffusers_config(
            {k: v for k, v in self.config.items() if k in NOISE_KEYS}
        )
        check_noise_schedule(self.schedule, self.noise)
        self.plan: SamplingPlan = compile_plan(self.schedule, self.noise)
        self.init_noise_sigma = 1.0
        self._reset()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_schedule(
        cls, schedule: SolverSchedule | str | Path, scheduler_config: Mapping[str, Any] | None = None
    ) -> SearchedScheduler:
        """The scheduler for `schedule` (object or JSON path) on a model with `scheduler_config`
        (e.g. `pipe.scheduler.config`; its noise schedule and prediction type are used)."""
        if not isinstance(schedule, SolverSchedule):
            schedule = load_schedule(schedule)
        config = dict(scheduler_config or {})
        kwargs = {k: config[k] for k in NOISE_KEYS + ("prediction_type",) if k in config and config[k] is not None}
        return cls(schedule=schedule.to_dict(), **kwargs)

    # --- the diffusers scheduler contract -----------------------------------------------------

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @property
    def current_skip(self) -> tuple[str, ...]:
        """The blocks the network skips at its next evaluation (see `pruned`)."""
        index = 1 if self._analytic_pending() else self._next_step
        return self.plan.steps[min(index, len(self.plan.steps) - 1)].skip

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        if timesteps is not None or sigmas is not None:
            raise ScheduleError("SearchedScheduler takes its times from the schedule; do not pass timesteps= or sigmas=")
        if num_inference_steps is not None and num_inference_steps != self.schedule.nfe:
            raise ScheduleError(
                f"num_inference_steps={num_inference_steps}, but the schedule {self.schedule.name or ''!s} has "
                f"{self.schedule.nfe} network evaluations; pass num_inference_steps={self.schedule.nfe} (or None)"
            )
        self._device = torch.device(device) if device is not None else None
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ScheduleError("SearchedScheduler runs whole schedules; image-to-image with strength < 1 is not supported")

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Identity for VP models — except before the first evaluation of a schedule with the analytic
        first step (ε̂ = x_T): the model must see x(t_1), which is that step applied to x_T. The step
        is elementwise, so it also works on a guidance-doubled batch; `step` takes it again on its own."""
        if self._analytic_pending():
            self._analytic_seen = True
            state = SamplerState.start(sample)
            state.advance(self.plan, 0, sample)
            return state.x
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple:
        if self._analytic_pending():
            if not self._analytic_seen:
                raise ScheduleError(
                    "this schedule starts with the analytic first step, which needs scale_model_input() before "
                    "the first model call; this pipeline does not call it (DDPMPipeline does not) — use "
                    "solversearch.sample or a schedule with first_step 'model'"
                )
            self._state = SamplerState.start(sample)
            self._state.advance(self.plan, 0, sample)
            self._next_step = 1
        elif self._state is None:
            self._state = SamplerState.start(sample)
        else:
            self._state.x = sample  # pipelines may edit the latents between steps (inpainting)
        i = self._next_step
        if i >= len(self.plan.steps):
            raise ScheduleError(f"step() called more often than the schedule's {self.schedule.nfe} evaluations")
        planned = self.plan.steps[i]
        eps = self._to_eps(model_output.to(self._state.x.dtype), self._state.x, planned.alpha, planned.sigma)
        self._state.advance(self.plan, i, eps)
        self._next_step = i + 1
        prev_sample = self._state.x.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t = self.noise.timestep_to_t(np.asarray(timesteps.detach().cpu(), dtype=np.float64)).reshape(-1)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = torch.as_tensor(self.noise.alpha(t), dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        sigma = torch.as_tensor(self.noise.sigma(t), dtype=original_samples.dtype, device=original_samples.device).reshape(shape)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- internals ----------------------------------------------------------------------------

    def _reset(self) -> None:
        evaluated = [s.t for s in self.plan.steps if s.evaluate]
        device = getattr(self, "_device", None)
        times = torch.tensor(evaluated, dtype=torch.float64)
        self._timesteps = self.noise.network_time(times).to(torch.float32)
        if device is not None:
            self._timesteps = self._timesteps.to(device)
        self._state: SamplerState | None = None
        self._next_step = 0
        self._analytic_seen = False

    def _analytic_pending(self) -> bool:
        return self.schedule.first_step == "analytic" and self._next_step == 0

    def _to_eps(self, output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return output
        if kind == "v_prediction":
            return sigma * x + alpha * output
        return (x - alpha * output) / sigma


@contextlib.contextmanager
def pruned(unet: torch.nn.Module, scheduler: SearchedScheduler) -> Iterator[None]:
    """Run a schedule's skipped blocks inside an unmodified pipeline:

        with pruned(pipe.unet, pipe.scheduler):
            images = pipe(...).images

    Before each network call the current step's skip set is activated (for this thread only) and
    released after it. Unknown block names are an error here, before anything runs.
    """
    from .models.pruning import prunable_units, skipping

    known = set(prunable_units(unet))
    unknown = sorted({u for step in scheduler.schedule.steps for u in step.skip} - known)
    if unknown:
        raise ScheduleError(f"the schedule skips blocks this network does not have: {unknown}; it has e.g. {sorted(known)[:4]}")
    active: list[contextlib.ExitStack] = []

    def before(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(skipping(unet, scheduler.current_skip))
        active.append(stack)

    def after(module, args, output):
        active.pop().close()

    handles = [unet.register_forward_pre_hook(before), unet.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while active:
            active.pop().close()


def check_noise_schedule(schedule: SolverSchedule, noise: NoiseSchedule) -> None:
    """A schedule searched on one noise schedule means nothing on another: that is an error."""
    if schedule.noise_schedule is None:
        return
    if noise_schedule_from_dict(schedule.noise_schedule) != noise:
        raise ScheduleError(
            f"the schedule was searched on the noise schedule {dict(schedule.noise_schedule)}, "
            f"but this model uses {noise.to_dict()}"
        )


FAMILY_NAMES = {"vp": "variance-preserving", "flow": "rectified-flow", "edm": "EDM (Karras VE)"}


def schedule_noise(schedule: SolverSchedule, what: str = "the schedule") -> NoiseSchedule:
    """The noise path a schedule was made on, from its `noise_schedule` metadata. Without it, which
    path the schedule's times belong to cannot be checked: that is an error."""
    if schedule.noise_schedule is None:
        raise ScheduleError(
            f"{what} has no noise_schedule metadata, so the path it was made for cannot be checked; use a "
            "schedule written by solversearch (search, export, refine, presets --out)"
        )
    try:
        return noise_schedule_from_dict(schedule.noise_schedule)
    except NoiseScheduleError as exc:
        raise NoiseScheduleError(f"{what}: noise_schedule: {exc}") from None


def check_family(schedule: SolverSchedule, noise: NoiseSchedule, what: str = "the schedule") -> NoiseSchedule:
    """Refuse a schedule made for another family of paths (vp, flow, edm) than `noise`'s: its times
    name other noise levels there. Returns the schedule's own path (same family, maybe other parameters)."""
    own = schedule_noise(schedule, what)
    if own.family != noise.family:
        raise ScheduleError(
            f"{what} was made for a {FAMILY_NAMES[own.family]} path ({own.to_dict()['kind']}), but the model's "
            f"path is {FAMILY_NAMES[noise.family]} ({noise.to_dict()['kind']}); a schedule carries over only "
            "between checkpoints of one family"
        )
    return own


def check_compatibility(schedule: SolverSchedule, model: Any, strict: bool = False) -> None:
    """Check a schedule against the model it is loaded into.

    A different noise schedule or prediction type is an error; a different model fingerprint (the
    same kind of model, other weights) is a warning, or an error with `strict`.
    """
    check_noise_schedule(schedule, model.noise_schedule)
    expected_type = schedule.provenance.get("prediction_type")
    actual_type = getattr(model, "prediction_type", None) or getattr(getattr(model, "denoiser", None), "prediction_type", None)
    if expected_type and actual_type and expected_type != actual_type:
        raise ScheduleError(f"the schedule was searched on a {expected_type} model, but this model predicts {actual_type}")
    fingerprint = getattr(model, "fingerprint", None)
    fingerprint = fingerprint() if callable(fingerprint) else fingerprint
    if schedule.model_fingerprint and fingerprint and schedule.model_fingerprint != fingerprint:
        message = (
            f"the schedule was searched on model {schedule.model_fingerprint}, this is model {fingerprint}; "
            "its quality on this model is unmeasured"
        )
        if strict:
            raise SolversearchError(message)
        warnings.warn(message, stacklevel=2)


def sample(
    model: Any,
    schedule: SolverSchedule | str | Path,
    n: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    strict: bool = False,
) -> torch.Tensor:
    """Images from a schedule in one call: `model` is a spec (`bundled:digits`, a directory, …), a
    loaded ModelHandle or a denoiser with `noise_schedule` and `sample_shape`. x_T comes from `seed`.
    Returns a float32 CPU tensor of shape (n, *sample_shape) in the model's data range."""
    from .models.spec import ModelHandle, load_model
    from .plan import compile_plan
    from .sampler import execute

    handle = load_model(model, device) if isinstance(model, str) else model
    denoiser = handle.denoiser if isinstance(handle, ModelHandle) else handle
    shape = tuple(getattr(handle, "sample_shape", None) or getattr(denoiser, "sample_shape", None) or ())
    if not shape:
        raise SolversearchError("the model does not say its sample shape (sample_shape)")
    if not isinstance(schedule, SolverSchedule):
        schedule = load_schedule(schedule)
    check_compatibility(schedule, handle, strict=strict)
    if isinstance(denoiser, torch.nn.Module):
        denoiser = denoiser.to(device)
    plan = compile_plan(schedule, denoiser.noise_schedule)
    x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    x_T = x_T * denoiser.noise_schedule.prior_std(schedule.timesteps[0])
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            out.append(execute(plan, denoiser, x_T[start : start + batch_size].to(device)).sample.float().cpu())
    return torch.cat(out)
