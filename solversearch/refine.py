"""Gradient refinement: learn a schedule's times (and step factors) against the converged solution.

The discrete decisions of a schedule (orders, prediction types, derivative points, corrector, analytic
first step, skipped blocks) stay as they are; its continuous part is learned by back-propagating through
the sampler, as LD3 learns step positions:

- **the times**, in log-SNR: λ_0 stays where the schedule starts; the end λ moves within `end_range`
  (a sigmoid between its bounds); the steps in between are a softmax split of the way there, so the
  times always decrease strictly. A schedule that ends with the denoising step to t = 0 keeps it, and
  its last positive time is the free end;
- optionally **one factor per step** on the first-derivative term (`Step.first_derivative_factor`), for
  steps of order ≥ 2 (AMED/EPD-style learned step scales).

The loss is the evaluator's teacher distance: LPIPS-style distances in the metric's feature space
between the samples and the converged solution (`evaluator.teacher_schedule`) from the same x_T, on a
training batch whose seeds no search, selection or validation uses. (A pixel MSE would prefer blurred
outputs: see README "What the numbers mean".) Full-batch Adam; after every step the held-out batch is
scored: a step that does not lower it is undone and the learning rate halved (Adam's first steps move
every parameter by about the learning rate, which overshoots near an optimum), and `patience` such
failures in a row end the refinement. The best held-out iterate is kept, so the result never scores
worse there than the schedule it started from. The result is an ordinary `SolverSchedule`: it loads
and samples everywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .differentiable import plan_from_lambdas
from .errors import ScheduleError, SolversearchError
from .evaluator import TEACHER_STEPS, EvaluationSettings, Evaluator
from .metrics.features import perceptual_distance
from .metrics.reference import ArrayCache
from .models.spec import ModelHandle
from .noise import NoiseSchedule
from .sampler import execute
from .schedule import SolverSchedule

# Seeds of the training and held-out x_T: far from the seeds searches, selections and validations use
# (small integers, see search/experiment.py), and from the model reference's 2**31 − 1.
TRAIN_SEED = 2**31 - 3
HELDOUT_SEED = 2**31 - 4
EDGE = 1e-4  # an end time on a bound of its range starts this fraction of the range inside it

# (iteration i, training loss of the iterate step i started from, held-out loss of the iterate it reached)
Progress = Callable[[int, float, float], None]


@dataclass(frozen=True)
class RefineSettings:
    """How a refinement runs. `end_range` bounds the end time (t of the last positive time); None: from
    the model's usual end time to 5× that, widened to include the schedule's own end."""

    n: int = 64
    heldout_n: int = 64
    seed: int = TRAIN_SEED
    heldout_seed: int = HELDOUT_SEED
    iterations: int = 60
    learning_rate: float = 0.1
    patience: int = 8
    learn_factors: bool = True
    end_range: tuple[float, float] | None = None
    reference_steps: int = TEACHER_STEPS
    features: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("n", "heldout_n", "iterations", "patience", "reference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SolversearchError(f"refinement {name} must be a positive integer, got {value!r}")
        if self.n < 2 or self.heldout_n < 2:
            raise SolversearchError("refinement needs at least 2 training and 2 held-out samples")
        if not (
            isinstance(self.learning_rate, (int, float))
            and math.isfinite(self.learning_rate)
            and self.learning_rate > 0
        ):
            raise SolversearchError(f"refinement learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.seed == self.heldout_seed:
            raise SolversearchError("the refinement's training and held-out seeds must differ")
        if self.end_range is not None:
            low, high = self.end_range
            if not 0.0 < low < high <= 1.0:
                raise SolversearchError(f"refinement end_range must satisfy 0 < low < high ≤ 1, got {self.end_range}")

    @property
    def seeds(self) -> tuple[int, int]:
        return self.seed, self.heldout_seed


@dataclass(frozen=True)
class Refinement:
    """A refined schedule and how it was found: the held-out loss of every iterate (index 0: the parent;
    an iterate that did not improve on the best was undone), the training loss each step descended
    from, the iterate kept (0: nothing beat the parent on the held-out batch) and the wall time."""

    schedule: SolverSchedule
    parent: SolverSchedule
    train_losses: tuple[float, ...]
    heldout_losses: tuple[float, ...]
    best_iteration: int
    seconds: float
    settings: RefineSettings = field(repr=False)

    @property
    def improvement(self) -> float:
        """Relative decrease of the held-out teacher distance (0 when the parent was kept)."""
        first, best = self.heldout_losses[0], self.heldout_losses[self.best_iteration]
        return 0.0 if first <= 0 else (first - best) / first

    def summary(self) -> dict[str, Any]:
        """What the schedule's provenance records (and a stored trial's user attributes)."""
        return {
            "parent": self.parent.name,
            "parent_key": self.parent.decisions_key(),
            "seconds": round(self.seconds, 3),
            "iterations": len(self.heldout_losses) - 1,
            "best_iteration": self.best_iteration,
            "train_losses": [_rounded(v) for v in self.train_losses],
            "heldout_losses": [_rounded(v) for v in self.heldout_losses],
            "n": self.settings.n,
            "heldout_n": self.settings.heldout_n,
            "seeds": list(self.settings.seeds),
            "learn_factors": self.settings.learn_factors,
        }


class TimeParametrisation:
    """Unconstrained parameters ↔ strictly decreasing times of one schedule (see the module docstring)."""

    def __init__(self, schedule: SolverSchedule, noise: NoiseSchedule, end_range: tuple[float, float] | None):
        self.schedule, self.noise = schedule, noise
        times = np.asarray(schedule.timesteps, dtype=np.float64)
        self.finite = schedule.n_steps + 1 - schedule.ends_at_zero  # times with a finite log-SNR
        if self.finite < 2:
            raise SolversearchError("a one-step schedule to t = 0 has no time to refine")
        lambdas = noise.lambda_(times[: self.finite])
        end = float(times[self.finite - 1])
        if schedule.ends_at_zero:  # the last positive time: anywhere after the start, down to the usual end
            low, high = min(end, noise.default_t_end(schedule.n_steps)), float(times[0])
        elif end_range is None:
            usual = noise.default_t_end(schedule.n_steps)
            low, high = min(end, usual), max(end, 5.0 * usual)
        else:
            low, high = min(end_range[0], end), max(end_range[1], end)
        self.lam_start = float(lambdas[0])
        # The way the steps split starts here: at the start, or, from pure noise (a flow path's σ = 1,
        # λ = −∞, where the first step is a first-order data step), at the path's t_start.
        self.lam_origin = max(self.lam_start, float(noise.lambda_(noise.t_start)))
        self.lam_low = float(noise.lambda_(high)) if high < times[0] else self.lam_origin  # λ of the latest end
        self.lam_high = float(noise.lambda_(low))
        fraction = np.clip((lambdas[-1] - self.lam_low) / (self.lam_high - self.lam_low), EDGE, 1.0 - EDGE)
        self.initial_end_logit = float(np.log(fraction / (1.0 - fraction)))
        gaps = np.diff([self.lam_origin, *lambdas[1:]])
        self.initial_split_logits = np.log(gaps / gaps.sum()) if gaps.size > 1 else np.zeros(1)

    def lambdas(self, split_logits: torch.Tensor, end_logit: torch.Tensor) -> torch.Tensor:
        lam_end = self.lam_low + (self.lam_high - self.lam_low) * torch.sigmoid(end_logit)
        shares = torch.cumsum(torch.softmax(split_logits, 0), 0)[:-1]
        start = lam_end.new_tensor([self.lam_start])
        return torch.cat([start, self.lam_origin + (lam_end - self.lam_origin) * shares, lam_end.reshape(1)])

    def times(self, lambdas: torch.Tensor) -> torch.Tensor:
        """Network times: t(λ) differentiably, the start exactly as given, and a final 0 if the schedule has one."""
        inner = self.noise.torch_t_of_lambda(lambdas[1:])
        parts = [lambdas.new_tensor([self.schedule.timesteps[0]]), inner]
        if self.schedule.ends_at_zero:
            parts.append(lambdas.new_zeros(1))
        return torch.cat(parts)

    def schedule_at(self, lambdas: torch.Tensor, factors: torch.Tensor | None) -> SolverSchedule:
        """The parent schedule with these times (host float64, from λ) and first-derivative factors."""
        lam = lambdas.detach().cpu().numpy()
        times = [self.schedule.timesteps[0], *(float(t) for t in self.noise.t_of_lambda(lam[1:]))]
        if self.schedule.ends_at_zero:
            times.append(0.0)
        steps = self.schedule.steps
        if factors is not None:
            steps = tuple(
                replace(s, first_derivative_factor=float(f)) if s.order >= 2 else s
                for s, f in zip(steps, factors.detach().cpu().tolist())
            )
        return replace(self.schedule, timesteps=tuple(times), steps=steps)


class _TeacherBatch:
    """One batch of x_T with its teacher's feature layers: the loss of a plan is the mean teacher distance."""

    def __init__(
        self, model: ModelHandle, n: int, seed: int, settings: RefineSettings, cache: ArrayCache | None, t_start: float
    ):
        self.evaluator = Evaluator(model, _batch_settings(n, seed, settings), cache)
        teacher = self.evaluator.images(self.evaluator.teacher()).to(self.evaluator.device)
        self.teacher_layers = [layer.detach() for layer in self.evaluator.features.layers(teacher)]
        self.x_T = self.evaluator.x_T.to(self.evaluator.device) * model.noise_schedule.prior_std(t_start)
        self.denoiser = self.evaluator.denoiser_for(0, n)

    def loss(self, plan) -> torch.Tensor:
        images = self.evaluator.images(execute(plan, self.denoiser, self.x_T).sample)
        return perceptual_distance(self.evaluator.features.layers(images), self.teacher_layers).mean()


def refine(
    model: ModelHandle,
    schedule: SolverSchedule,
    settings: RefineSettings | None = None,
    *,
    cache: ArrayCache | None = None,
    on_progress: Progress | None = None,
) -> Refinement:
    """Refine `schedule` on `model` (see the module docstring). Deterministic for given settings."""
    from .inference import check_noise_schedule

    settings = settings or RefineSettings()
    check_noise_schedule(schedule, model.noise_schedule)  # times mean nothing on another noise schedule
    started = time.perf_counter()
    noise = model.noise_schedule
    shape = TimeParametrisation(schedule, noise, settings.end_range)
    train = _TeacherBatch(model, settings.n, settings.seed, settings, cache, schedule.timesteps[0])
    heldout = _TeacherBatch(model, settings.heldout_n, settings.heldout_seed, settings, cache, schedule.timesteps[0])
    split = torch.tensor(shape.initial_split_logits, dtype=torch.float64, requires_grad=True)
    end = torch.tensor(shape.initial_end_logit, dtype=torch.float64, requires_grad=True)
    learnable = torch.tensor([s.order >= 2 for s in schedule.steps])
    factors = torch.tensor(
        [s.first_derivative_factor for s in schedule.steps],
        dtype=torch.float64,
        requires_grad=settings.learn_factors and bool(learnable.any()),
    )
    parameters = [split, end] + ([factors] if factors.requires_grad else [])

    def plan():
        lambdas = shape.lambdas(split, end)
        step_factors = torch.where(learnable, factors, torch.ones_like(factors))
        return lambdas, step_factors, plan_from_lambdas(schedule, lambdas, shape.times(lambdas), step_factors, noise)

    def held_out_loss() -> float:
        """inf where a step made the times invalid (two log-SNR values closer than MIN_LAMBDA_GAP): undone."""
        try:
            with torch.no_grad():
                return float(heldout.loss(plan()[2]))
        except ScheduleError:
            return math.inf

    def restore(values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for parameter, value in zip(parameters, values):
                parameter.copy_(value)

    learning_rate = settings.learning_rate
    optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    train_losses: list[float] = []  # the loss each step descends from
    heldout_losses = [held_out_loss()]  # at iterates 0 … k
    best_iteration, best, failures = 0, [p.detach().clone() for p in parameters], 0
    for iteration in range(1, settings.iterations + 1):
        optimiser.zero_grad()
        loss = train.loss(plan()[2])
        if iteration == 1:
            _checked(loss.detach(), schedule)
        if not loss.requires_grad:
            raise SolversearchError(
                f"the features {train.evaluator.features.identity!r} are not differentiable: "
                "refinement needs identity, digits or another torch feature network"
            )
        loss.backward()
        optimiser.step()
        held = held_out_loss()
        train_losses.append(float(loss.detach()))
        heldout_losses.append(held)
        if on_progress is not None:
            on_progress(iteration, train_losses[-1], held)
        if math.isfinite(held) and held < heldout_losses[best_iteration]:
            best_iteration, best, failures = iteration, [p.detach().clone() for p in parameters], 0
            continue
        failures += 1  # back to the best iterate with half the step: near an optimum Adam's first steps overshoot
        if failures >= settings.patience:
            break
        restore(best)
        learning_rate /= 2.0
        optimiser = torch.optim.Adam(parameters, lr=learning_rate)
    split_best, end_best, *factors_best = best
    refined = (
        shape.schedule_at(shape.lambdas(split_best, end_best), factors_best[0] if factors_best else None)
        if best_iteration
        else schedule
    )
    result = Refinement(
        refined,
        schedule,
        tuple(train_losses),
        tuple(heldout_losses),
        best_iteration,
        time.perf_counter() - started,
        settings,
    )
    name = f"{schedule.name}+refined" if schedule.name else ""  # unnamed: the study names it by its key
    return replace(
        result,
        schedule=refined.with_metadata(
            name=name,
            noise_schedule=noise.to_dict(),
            model_fingerprint=model.fingerprint,
            metrics={},
            provenance={**schedule.provenance, "refinement": result.summary()},
        ),
    )


def prepare_teachers(model: ModelHandle, settings: RefineSettings, cache: ArrayCache | None = None) -> None:
    """Build (or find) the teachers of the training and held-out batches in the cache, as a search's
    driver does before its workers refine: they then only read them (on this machine's cache)."""
    for n, seed in ((settings.n, settings.seed), (settings.heldout_n, settings.heldout_seed)):
        Evaluator(model, _batch_settings(n, seed, settings), cache).teacher()


def _batch_settings(n: int, seed: int, settings: RefineSettings) -> EvaluationSettings:
    return EvaluationSettings(
        n=n,
        seed=seed,
        batch_size=n,
        device=settings.device,
        features=settings.features,
        reference_steps=settings.reference_steps,
    )


def _rounded(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None  # JSON has no inf/NaN


def _checked(loss: torch.Tensor, schedule: SolverSchedule) -> torch.Tensor:
    if not bool(torch.isfinite(loss)):
        raise SolversearchError(
            f"the schedule {schedule.name or '(unnamed)'} diverges on this model (NaN/inf samples): nothing to refine"
        )
    return loss
