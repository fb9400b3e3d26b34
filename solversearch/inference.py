"""Use a searched schedule at inference: a diffusers scheduler, and checks that it fits the model.

`SearchedScheduler.from_schedule(path, pipe.scheduler.config)` drops into a diffusers pipeline of a
DDPM-family (VP), rectified-flow (FlowMatch*) or EDM model that runs the usual `set_timesteps` /
`scale_model_input` / `step` loop. Each `step` runs exactly the update `solversearch.solve` runs
(`SamplerState.advance`), so both give the same samples.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .errors import NoiseScheduleError, ScheduleError, SolversearchError
from .noise import (
    DiscreteVP,
    KarrasVE,
    NoiseSchedule,
    RectifiedFlow,
    noise_schedule_from_dict,
    noise_schedule_from_diffusers_config,
)
from .plan import PlannedStep, SamplingPlan, compile_plan
from .sampler import SamplerState
from .schedule import SolverSchedule, load_schedule

# The scheduler-config keys that describe each family's noise path, named as the paths' `to_dict` names
# them (and as diffusers' own schedulers do, so pipelines that read e.g. `use_dynamic_shifting` find it).
PATH_KEYS: dict[str, tuple[str, ...]] = {
    "vp": (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "rescale_betas_zero_snr",
        "precision",
    ),
    "flow": (
        "num_train_timesteps",
        "shift",
        "use_dynamic_shifting",
        "time_shift_type",
        "mu",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
    ),
    "edm": ("sigma_min", "sigma_max", "sigma_data", "rho"),
}
NOISE_KEYS = PATH_KEYS["vp"]
PATH_KINDS = {"vp": "discrete_vp", "flow": "rectified_flow", "edm": "edm"}  # family → `to_dict` kind
PREDICTION_TYPES: dict[str, tuple[str, ...]] = {
    "vp": ("epsilon", "v_prediction", "sample"),
    "flow": ("flow_prediction",),  # the velocity ε − x₀, what FlowMatch* models return
    "edm": ("epsilon", "v_prediction"),  # the raw network output F, preconditioned as EDM*Schedulers do
}


class SearchedScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs one solversearch schedule (its steps, orders, correctors, …).

    `timesteps` are the network's own time inputs at the schedule's model evaluations (N·t − 1 on VP,
    σ·N on flow, EDM's c_noise = ¼ ln σ); `set_timesteps(None)` or `set_timesteps(schedule.nfe)` accepts
    the schedule, any other step count is an error. On EDM `scale_model_input` applies c_in and `step`
    the output preconditioning, as diffusers' EDM schedulers do. The schedule travels inside the config,
    so `save_pretrained` / `from_pretrained` round-trip it.
    """

    order = 1
    _compatibles: ClassVar[list[str]] = []

    @register_to_config
    def __init__(
        self,
        schedule: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str | None = None,
        rescale_betas_zero_snr: bool = False,
        family: str = "vp",
        precision: str | None = None,
        shift: float | None = None,
        use_dynamic_shifting: bool | None = None,
        time_shift_type: str | None = None,
        mu: float | None = None,
        base_shift: float | None = None,
        max_shift: float | None = None,
        base_image_seq_len: int | None = None,
        max_image_seq_len: int | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        sigma_data: float | None = None,
        rho: float | None = None,
    ):
        if schedule is None:
            raise ScheduleError("SearchedScheduler needs a schedule: use SearchedScheduler.from_schedule(path, config)")
        self.noise = own_path({**self.config, "family": family})
        prediction_type = prediction_type or PREDICTION_TYPES[family][0]
        if prediction_type not in PREDICTION_TYPES[family]:
            raise ScheduleError(
                f"prediction_type of a {family} model must be one of {', '.join(PREDICTION_TYPES[family])}, "
                f"got {prediction_type!r}"
            )
        self.register_to_config(prediction_type=prediction_type)
        self.schedule = SolverSchedule.from_dict(schedule)
        check_noise_schedule(self.schedule, self.noise)
        self.plan: SamplingPlan = compile_plan(self.schedule, self.noise)
        # x_T is drawn with this standard deviation: σ(t_0) on EDM, 1 on VP and flow paths.
        self.init_noise_sigma = self.noise.prior_std(self.schedule.timesteps[0])
        self._reset()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_schedule(
        cls,
        schedule: SolverSchedule | str | Path,
        scheduler_config: Mapping[str, Any] | None = None,
        mu: float | None = None,
    ) -> SearchedScheduler:
        """The scheduler for `schedule` (object or JSON path) on a model with `scheduler_config`
        (e.g. `pipe.scheduler.config`: its noise path — DDPM family, FlowMatch*, EDM* — and prediction
        type are used). A dynamically shifted flow model takes the schedule's μ (or `mu`)."""
        if not isinstance(schedule, SolverSchedule):
            schedule = load_schedule(schedule)
        config = dict(scheduler_config or {})
        own = "schedule" in config and "family" in config  # e.g. pipe.scheduler.config after a first swap
        noise = own_path(config) if own else noise_schedule_from_diffusers_config(config)
        if isinstance(noise, RectifiedFlow) and noise.use_dynamic_shifting and noise.mu is None:
            searched_mu = (schedule.noise_schedule or {}).get("mu") if mu is None else mu
            noise = noise if searched_mu is None else noise.with_mu(searched_mu)
        path = {k: v for k, v in noise.to_dict().items() if k != "kind"}
        if noise.family == "flow":  # keep the model's dynamic-shift keys: some pipelines compute a mu from them always
            path = {**{k: config[k] for k in PATH_KEYS["flow"] if config.get(k) is not None}, **path}
        prediction_type = config.get("prediction_type") if noise.family != "flow" else None
        return cls(schedule=schedule.to_dict(), family=noise.family, prediction_type=prediction_type, **path)

    # --- the diffusers scheduler contract -----------------------------------------------------

    @property
    def timesteps(self) -> torch.Tensor:
        return self._timesteps

    @property
    def current_skip(self) -> tuple[str, ...]:
        """The blocks the network skips at its next evaluation (see `pruned`)."""
        return self._evaluated_step().skip

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Accept the schedule's own times. A pipeline's `sigmas=` / `timesteps=` (FluxPipeline always
        passes its default sigmas) must count the schedule's evaluations and are then ignored with a
        warning; a dynamically shifted flow model's `mu` that differs from the schedule's is a warning."""
        nfe = self.schedule.nfe
        if num_inference_steps is not None and num_inference_steps != nfe:
            raise ScheduleError(
                f"num_inference_steps={num_inference_steps}, but the schedule {self.schedule.name or ''!s} has "
                f"{nfe} network evaluations; pass num_inference_steps={nfe} (or None)"
            )
        for name, given in (("sigmas", sigmas), ("timesteps", timesteps)):
            if given is None:
                continue
            if len(given) != nfe:
                raise ScheduleError(
                    f"{name}= has {len(given)} entries, but the schedule {self.schedule.name or ''!s} has {nfe} network "
                    "evaluations; SearchedScheduler takes its times from the schedule (pass neither)"
                )
            message = f"SearchedScheduler ignores the {name}= it was given: the searched schedule fixes its own times"
            warnings.warn(message, stacklevel=2)
        self._check_mu(mu)
        self._device = torch.device(device) if device is not None else None
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ScheduleError(
                "SearchedScheduler runs whole schedules; image-to-image with strength < 1 is not supported"
            )

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network's input: c_in·x on EDM paths, x itself on VP and flow paths — except before the
        first evaluation of a schedule with the analytic first step (ε̂ = x_T): the model must see
        x(t_1), which is that step applied to x_T. Both are elementwise, so they also work on a
        guidance-doubled batch; `step` takes the analytic step again on its own."""
        if self._analytic_pending():
            self._analytic_seen = True
            state = SamplerState.start(sample)
            state.advance(self.plan, 0, sample)
            sample = state.x
        if isinstance(self.noise, KarrasVE):
            c_in, _, _ = self.noise.preconditioning(torch.tensor(self._evaluated_step().sigma, dtype=torch.float64))
            return sample * float(c_in)
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
                    "the first model call; this pipeline does not call it (DDPMPipeline and the flow pipelines do "
                    "not) — use solversearch.sample or a schedule with first_step 'model'"
                )
            self._state = SamplerState.start(sample)
            self._state.advance(self.plan, 0, sample / self.plan.steps[0].prior_std)
            self._next_step = 1
        elif self._state is None:
            self._state = SamplerState.start(sample)
        else:
            self._state.x = sample  # pipelines may edit the latents between steps (inpainting)
        i = self._next_step
        if i >= len(self.plan.steps):
            raise ScheduleError(f"step() called more often than the schedule's {self.schedule.nfe} evaluations")
        x = self._state.x
        eps, x0 = self._model_values(model_output.to(x.dtype), x, self.plan.steps[i])
        self._state.advance(self.plan, i, eps, x0)
        self._next_step = i + 1
        prev_sample = self._state.x.to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α(t) x₀ + σ(t) ε at the times whose network time inputs are `timesteps`."""
        t = self._t_of_network_time(np.asarray(timesteps.detach().cpu(), dtype=np.float64)).reshape(-1)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = torch.as_tensor(
            self.noise.alpha(t), dtype=original_samples.dtype, device=original_samples.device
        ).reshape(shape)
        sigma = torch.as_tensor(
            self.noise.sigma(t), dtype=original_samples.dtype, device=original_samples.device
        ).reshape(shape)
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

    def _evaluated_step(self) -> PlannedStep:
        """The planned step whose model evaluation comes next."""
        index = 1 if self._analytic_pending() else self._next_step
        return self.plan.steps[min(index, len(self.plan.steps) - 1)]

    def _check_mu(self, mu: float | None) -> None:
        """μ only picks a dynamically shifted model's own σ grid for a resolution; the flow path (α = 1 − σ)
        is the same for every μ, and the searched schedule fixes its σ. So another μ gives correct
        samples of an untested schedule — a warning, like a schedule searched on other weights."""
        if mu is None or not isinstance(self.noise, RectifiedFlow) or not self.noise.use_dynamic_shifting:
            return  # a static shift ignores mu, as FlowMatchEulerDiscreteScheduler does
        if self.noise.mu is not None and not math.isclose(float(mu), self.noise.mu, rel_tol=1e-9, abs_tol=1e-12):
            warnings.warn(
                f"the pipeline passed mu={float(mu):.6g} (its image size), but the schedule was searched at "
                f"mu={self.noise.mu:.6g}: its times are used as they are, and its quality at this size is unmeasured",
                stacklevel=3,
            )

    def _model_values(
        self, output: torch.Tensor, x: torch.Tensor, planned: PlannedStep
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ε̂ and x̂₀ (None where `advance` derives it from ε̂) from the network's raw output at (x, t)."""
        alpha, sigma = planned.alpha, planned.sigma
        if isinstance(self.noise, RectifiedFlow):
            # velocity v = ε − x₀ with x = α x₀ + σ ε, α + σ = 1; exact at σ = 1 (α = 0), where ε = x.
            return x + alpha * output, x - sigma * output
        if isinstance(self.noise, KarrasVE):
            _, c_skip, c_out = self.noise.preconditioning(torch.tensor(sigma, dtype=torch.float64))
            sign = 1.0 if self.config.prediction_type == "epsilon" else -1.0
            x0 = float(c_skip) * x + sign * float(c_out) * output
            return (x - x0) / sigma, x0
        return self._to_eps(output, x, alpha, sigma), None

    def _to_eps(self, output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return output
        if kind == "v_prediction":
            return sigma * x + alpha * output
        return (x - alpha * output) / sigma

    def _t_of_network_time(self, timesteps: np.ndarray) -> np.ndarray:
        """The inverse of the path's `network_time`."""
        if isinstance(self.noise, DiscreteVP):
            return self.noise.timestep_to_t(timesteps)
        if isinstance(self.noise, RectifiedFlow):
            return timesteps / self.noise.num_train_timesteps
        return self.noise.t_of_sigma(np.exp(4.0 * timesteps))


def own_path(config: Mapping[str, Any]) -> NoiseSchedule:
    """The noise path a SearchedScheduler config describes (its `family` and that family's keys)."""
    family = config.get("family", "vp")
    if family not in PATH_KEYS:
        raise ScheduleError(f"family must be one of {sorted(PATH_KEYS)}, got {family!r}")
    return noise_schedule_from_dict(
        {"kind": PATH_KINDS[family], **{k: config[k] for k in PATH_KEYS[family] if config.get(k) is not None}}
    )


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
        raise ScheduleError(
            f"the schedule skips blocks this network does not have: {unknown}; it has e.g. {sorted(known)[:4]}"
        )
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
    """A schedule searched on one noise path means nothing on another: that is an error. A flow model
    shifted dynamically to another μ (another image size) is the same path on another grid, which the
    schedule's own times replace: a warning (see `SearchedScheduler._check_mu`)."""
    if schedule.noise_schedule is None:
        return
    searched = noise_schedule_from_dict(schedule.noise_schedule)
    if searched == noise:
        return
    if isinstance(searched, RectifiedFlow) and isinstance(noise, RectifiedFlow) and searched.use_dynamic_shifting:
        without_mu = {k: v for k, v in searched.to_dict().items() if k != "mu"}
        if without_mu == {k: v for k, v in noise.to_dict().items() if k != "mu"}:
            if noise.mu is not None and searched.mu is not None:
                warnings.warn(
                    f"the schedule was searched at mu={searched.mu:.6g}, this model is shifted with mu={noise.mu:.6g} "
                    "(another image size): its times are used as they are, and its quality here is unmeasured",
                    stacklevel=2,
                )
            return
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
    actual_type = getattr(model, "prediction_type", None) or getattr(
        getattr(model, "denoiser", None), "prediction_type", None
    )
    if expected_type and actual_type and expected_type != actual_type:
        raise ScheduleError(
            f"the schedule was searched on a {expected_type} model, but this model predicts {actual_type}"
        )
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
