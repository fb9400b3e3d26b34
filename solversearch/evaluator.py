"""Score a schedule on a model: FID and KID to a reference distribution, distances to the teacher, cost.

Common random numbers: every schedule an Evaluator scores starts from the same x_T (and the same
conditioning), drawn once from its seed, so differences between schedules are the solvers', not the
noise's. The teacher is the converged solution from that same x_T; its samples are also the floor.
A schedule that diverges (NaN/inf samples) is a result flagged `diverged` with infinite metrics.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import presets
from .errors import SolversearchError
from .grids import logsnr_uniform
from .metrics.distances import GaussianStats, error_to_reference, frechet_distance, kernel_inception_distance
from .metrics.features import (
    BundledDigitsFeatures,
    FeatureExtractor,
    IdentityFeatures,
    TorchScriptFeatures,
    perceptual_distance,
)
from .metrics.reference import ArrayCache, ReferenceFeatures, reference_features
from .models.spec import ModelHandle
from .noise import NoiseSchedule
from .plan import compile_plan
from .sampler import execute
from .schedule import SolverSchedule

# The model's own converged distribution (reference for models without data):
REFERENCE_SOLVER_STEPS = 200
# Steps of the teacher, UniPC-3 on a λ-uniform grid. On the bundled digits model (seed 1, n = 1000) 50 steps
# are 0.012 pixel RMS from a 200-step solve (median sample 0.0016; ten of the 1000 samples carry 92 % of
# the squared error), where 5-NFE schedules are 0.06 away. More steps converge slowly because a
# discrete-time network's output oscillates along t between its training timesteps (its sinusoidal time
# embedding): benchmarks/teacher_accuracy.py measures both. On smooth models 50 steps are converged
# (tests/test_evaluator.py).
TEACHER_STEPS = 50

# The metrics every evaluation reports (what a trial stores), lower is better for each.
METRIC_NAMES = ("fid", "kid", "kid_std", "teacher_distance", "error_to_reference")

# (what is being built, done, total): progress of the reference statistics and the teacher
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EvaluationSettings:
    n: int = 1000
    seed: int = 0
    batch_size: int = 500  # 0: the largest batch that fits the device (probed once on CUDA; 500 on the CPU)
    device: str = "cpu"
    mixed_precision: bool = False  # autocast the network on CUDA (the solver combines in float32)
    features: str | None = None  # "identity" | "digits" | "inception"; None = the model's default
    inception_path: str | None = None
    kid_subsets: int = 20
    kid_subset_size: int = 500
    error_to_reference: bool = True  # the teacher distances (feature space and pixels) to the converged solution
    reference_steps: int = TEACHER_STEPS  # steps of the teacher: the converged solution from the same x_T
    # Where the reference distribution comes from: None = the model's default (its real data if it has
    # any, else its own converged samples); "data"; "model"; or a path (image folder, .npz of images,
    # or pytorch-fid / clean-fid statistics with `mu` and `sigma`).
    reference: str | None = None
    reference_n: int | None = None  # samples of the model's own converged distribution (default: n)


@dataclass(frozen=True)
class EvaluationResult:
    fid: float
    kid: float
    kid_std: float
    error_to_reference: float | None  # pixel RMS distance to the teacher (rewards blur: never trust it alone)
    diverged: bool
    nfe: int
    n: int
    seed: int
    seconds: float
    sampling_seconds: float
    metric_seconds: float
    samples_per_second: float
    macs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    teacher_distance: float | None = None  # perceptual (feature-space) distance to the teacher, mean over samples

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: infinite metrics (a diverged schedule) become None, `diverged` says why."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def metrics(self) -> dict[str, float]:
        values = {"fid": self.fid, "kid": self.kid, "kid_std": self.kid_std}
        if self.teacher_distance is not None:
            values["teacher_distance"] = self.teacher_distance
        if self.error_to_reference is not None:
            values["error_to_reference"] = self.error_to_reference
        return values


@dataclass(frozen=True)
class Prepared:
    """What an evaluator needs besides the model, built once by the driver and handed to the workers:
    the reference statistics and the teacher's samples. An evaluator given one never builds either."""

    reference: ReferenceFeatures
    teacher: torch.Tensor | None


class Evaluator:
    """Evaluates schedules on one model with fixed noise; reference statistics are cached on disk."""

    def __init__(
        self,
        model: ModelHandle,
        settings: EvaluationSettings | None = None,
        cache: ArrayCache | None = None,
        prepared: Prepared | None = None,
        reference: ReferenceFeatures | None = None,
    ):
        self.model = model
        self.settings = settings or EvaluationSettings()
        self.cache = cache or ArrayCache()
        self.device = torch.device(self.settings.device)
        self.denoiser = (
            model.denoiser.to(self.device) if isinstance(model.denoiser, torch.nn.Module) else model.denoiser
        )
        self.features = self._feature_extractor()
        generator = torch.Generator().manual_seed(self.settings.seed)
        self.x_T = torch.randn((self.settings.n, *model.sample_shape), generator=generator)
        self.condition_index = {
            name: torch.randint(0, bank.shape[0], (self.settings.n,), generator=generator)
            for name, bank in model.conditions.items()
        }
        self.prepared = prepared is not None
        # `reference` alone: statistics another process built (the report's driver); the teacher is built here
        self._reference: ReferenceFeatures | None = prepared.reference if prepared else reference
        self._teacher: torch.Tensor | None = prepared.teacher if prepared else None
        self._teacher_layers: list[torch.Tensor] | None = None
        self._batch_size: int | None = None

    # --- public -------------------------------------------------------------------------------

    def evaluate(self, schedule: SolverSchedule) -> EvaluationResult:
        started = time.perf_counter()
        samples = self.sample(schedule)
        sampled = time.perf_counter()
        scores = self.score(samples)
        finished = time.perf_counter()
        return EvaluationResult(
            **scores,
            nfe=schedule.nfe,
            n=self.settings.n,
            seed=self.settings.seed,
            seconds=finished - started,
            sampling_seconds=sampled - started,
            metric_seconds=finished - sampled,
            samples_per_second=self.settings.n / max(sampled - started, 1e-9),
            macs=self.macs(schedule),
        )

    def score(self, samples: torch.Tensor) -> dict[str, Any]:
        """The metrics of n samples from the evaluator's x_T: FID and KID to the reference, and the
        feature-space and pixel distances to the teacher (when `error_to_reference` is on)."""
        settings = self.settings
        if not bool(torch.isfinite(samples).all()):
            teacher = math.inf if settings.error_to_reference else None
            return {
                "fid": math.inf,
                "kid": math.inf,
                "kid_std": math.inf,
                "error_to_reference": teacher,
                "teacher_distance": teacher,
                "diverged": True,
            }
        reference = self.reference()
        images = self.images(samples)
        layers = self._layers(images) if settings.error_to_reference else None
        features = self._features(images)
        fid = frechet_distance(GaussianStats.of(features), reference.stats)
        kid, kid_std = math.nan, math.nan
        if reference.features is not None:
            kid, kid_std = kernel_inception_distance(
                features, reference.features, settings.kid_subsets, settings.kid_subset_size, settings.seed
            )
        teacher_distance = err = None
        if layers is not None:
            teacher = self.teacher()
            distances = [perceptual_distance(a, b) for a, b in zip(layers, self._teacher_layers_all())]
            teacher_distance = float(torch.cat(distances).double().mean())
            err = error_to_reference(images, self.images(teacher))
        return {
            "fid": fid,
            "kid": kid,
            "kid_std": kid_std,
            "error_to_reference": err,
            "teacher_distance": teacher_distance,
            "diverged": False,
        }

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples as they are scored and seen: clamped to the model's data range (unbounded data as is)."""
        if self.model.data_range is None:
            return samples
        return samples.clamp(*self.model.data_range)

    @torch.no_grad()
    def sample(self, schedule: SolverSchedule, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """All n samples of `schedule` from the evaluator's fixed x_T (float32, on the CPU);
        `on_batch(samples done)` after each batch."""
        plan = compile_plan(schedule, self.model.noise_schedule)
        scale = self.model.noise_schedule.prior_std(schedule.timesteps[0])  # 1 on VP and flow paths
        out = []
        batch_size = self.batch_size
        for start in range(0, self.settings.n, batch_size):
            stop = min(start + batch_size, self.settings.n)
            x_T = self.x_T[start:stop].to(self.device) * scale
            with self._autocast():
                x = execute(plan, self.denoiser_for(start, stop), x_T).sample
            out.append(x.float().cpu())
            if on_batch is not None:
                on_batch(stop)
        return torch.cat(out)

    @property
    def batch_size(self) -> int:
        if self._batch_size is None:
            self._batch_size = self.settings.batch_size or self._largest_batch()
        return self._batch_size

    def _largest_batch(self) -> int:
        """Double the batch until a model call runs out of GPU memory or reaches 2n; keep half of the
        largest that ran as headroom for the solver's stored model values."""
        if self.device.type != "cuda":
            return min(self.settings.n, 500)
        largest_needed = 2 * self.settings.n
        batch, fits = min(64, largest_needed), 0
        t = torch.full((1,), 0.5, device=self.device)
        while fits < largest_needed:
            try:
                with torch.no_grad(), self._autocast():
                    x = torch.randn((batch, *self.model.sample_shape), device=self.device)
                    self.denoiser(x, t.expand(batch))
                fits = batch
                batch = min(2 * batch, largest_needed)
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
        if fits == 0:
            raise SolversearchError(
                f"even a batch of {min(64, largest_needed)} samples does not fit on {self.device}; lower the model size or use the CPU"
            )
        return max(1, min(self.settings.n, fits // 2))

    def macs(self, schedule: SolverSchedule) -> float | None:
        """Multiply-accumulates per sample: Σ over the model evaluations of (full − skipped units), when
        the model can count them (diffusers UNets; None for the analytic mixture)."""
        costs = getattr(self.denoiser, "unit_costs", None)
        return None if costs is None else float(costs().schedule_cost(schedule))

    def reference(self, on_progress: Progress | None = None) -> ReferenceFeatures:
        """Reference statistics in the metric's feature space (cached on disk)."""
        if self._reference is None:
            self._require_unprepared("the reference statistics")
            self._reference = self._compute_reference(on_progress)
        return self._reference

    def teacher(self, on_progress: Progress | None = None) -> torch.Tensor:
        """The teacher: the converged solution from the evaluator's x_T (`reference_steps` steps of
        `teacher_schedule`), cached on disk. Every schedule is compared with this one target, whatever
        its own end time, so the distance measures what a user gets, not what the schedule aimed at."""
        if self._teacher is None:
            self._require_unprepared("the teacher solution")
            steps, n = self.settings.reference_steps, self.settings.n
            schedule = teacher_schedule(self.model.noise_schedule, steps)
            key = {
                "kind": "teacher",
                "model": self.model.fingerprint,
                "n": n,
                "seed": self.settings.seed,
                "steps": steps,
                "schedule": schedule.to_dict(),
                "conditions": sorted(self.model.conditions),
            }

            def build() -> dict[str, np.ndarray]:
                report = (lambda done: on_progress("teacher", done, n)) if on_progress else None
                if report:
                    report(0)  # the start: the estimate counts from here
                return {"samples": self.sample(schedule, on_batch=report).numpy()}

            self._teacher = torch.from_numpy(self.cache.get_or_compute(key, build)["samples"])
        return self._teacher

    def prepare(self, on_progress: Progress | None = None) -> Prepared:
        """Build (or read from the cache) everything the workers need, with progress."""
        reference = self.reference(on_progress)
        teacher = self.teacher(on_progress) if self.settings.error_to_reference else None
        return Prepared(reference, teacher)

    def floor(self) -> EvaluationResult:
        """The metrics of the model's own converged samples: the teacher scored like any schedule."""
        started = time.perf_counter()
        teacher = self.teacher()
        return EvaluationResult(
            **self.score(teacher),
            nfe=self.settings.reference_steps,
            n=self.settings.n,
            seed=self.settings.seed,
            seconds=time.perf_counter() - started,
            sampling_seconds=0.0,
            metric_seconds=time.perf_counter() - started,
            samples_per_second=math.inf,
        )

    # --- internals ----------------------------------------------------------------------------

    def _require_unprepared(self, what: str) -> None:
        if self.prepared:
            raise SolversearchError(f"{what} was not prepared by the driver; workers only read what it built")

    def _features(self, images: torch.Tensor) -> np.ndarray:
        return np.concatenate(
            [
                self.features(images[i : i + self.batch_size].to(self.device)).cpu().numpy()
                for i in range(0, images.shape[0], self.batch_size)
            ]
        )

    def _layers(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Perceptual layers per batch (kept per batch: at most one batch of activations at a time)."""
        return [
            [layer.cpu() for layer in self.features.layers(images[i : i + self.batch_size].to(self.device))]
            for i in range(0, images.shape[0], self.batch_size)
        ]

    def _teacher_layers_all(self) -> list[list[torch.Tensor]]:
        if self._teacher_layers is None:
            self._teacher_layers = self._layers(self.images(self.teacher()))
        return self._teacher_layers

    def _compute_reference(self, on_progress: Progress | None = None) -> ReferenceFeatures:
        """`settings.reference`: None = the model's data if it has any, else its own converged samples;
        "data"; "model"; or a path (metrics/sources.py). The keywords win over folders of that name."""
        model, settings = self.model, self.settings
        feature_name = settings.features or model.default_features
        exact = model.exact_reference is not None and feature_name == "identity"
        source = settings.reference
        if source is None:
            source = "data" if exact or model.reference_data is not None else "model"
        if source == "model":
            return self._model_reference(on_progress)
        if source != "data":
            from .metrics.sources import reference_from_path

            dimension = self._features(torch.zeros((1, *model.sample_shape))).shape[1]
            return reference_from_path(
                source,
                channels=model.sample_shape[0],
                dimension=dimension,
                features=self._batched_features,
                cache=self.cache,
                key={"features": self.features.identity},
            )
        if exact:
            mean, cov = model.exact_reference()
            samples = model.reference_data() if model.reference_data else None
            features = None if samples is None else self.features(samples).cpu().numpy()
            return ReferenceFeatures(GaussianStats(mean, cov, n=10**9), features, f"the exact moments of {model.spec}")
        if model.reference_data is None:
            raise SolversearchError(
                f"{model.spec} has no data of its own: metric.reference 'data' (--reference data) needs a path "
                "instead: the dataset's statistics (.npz with mu and sigma), an image folder or an .npz of images"
            )
        key = {"features": self.features.identity, "model": model.fingerprint, "source": "data"}
        reference = reference_features(self.cache, key, lambda: self._batched_features(model.reference_data()))
        return ReferenceFeatures(
            reference.stats, reference.features, f"real data: {reference.stats.n:,} images ({model.spec})"
        )

    def _model_reference(self, on_progress: Progress | None = None) -> ReferenceFeatures:
        """The model's own converged distribution: `reference_n` (default n) samples of the 200-step
        solution from a seed no evaluation uses. With no more samples than feature dimensions their
        covariance is singular, and a Fréchet distance to it meaningless: an error."""
        from dataclasses import replace

        model, settings = self.model, self.settings
        n = settings.reference_n or settings.n
        dimension = self._features(torch.zeros((1, *model.sample_shape))).shape[1]
        if n <= dimension:
            message = (
                f"the model's own reference needs more samples than the {dimension} feature dimensions (it has "
                f"n = {n}): set metric.reference_n (--reference-n) ≥ {dimension + 1}, or give metric.reference "
                "(--reference): a dataset's statistics (.npz with mu and sigma) or its images"
            )
            raise SolversearchError(message)
        seed = 2**31 - 1
        key = {
            "features": self.features.identity,
            "model": model.fingerprint,
            "source": "model",
            "steps": REFERENCE_SOLVER_STEPS,
            "n": n,
            "seed": seed,
        }
        schedule = teacher_schedule(model.noise_schedule, REFERENCE_SOLVER_STEPS)
        reference_evaluator = Evaluator(model, replace(settings, n=n, seed=seed, error_to_reference=False), self.cache)
        report = (
            (lambda done: on_progress("reference: the model's converged samples", done, n)) if on_progress else None
        )
        if report:
            report(0)
        reference = reference_features(
            self.cache, key, lambda: self._batched_features(reference_evaluator.sample(schedule, on_batch=report))
        )
        description = f"the model's own converged samples: {REFERENCE_SOLVER_STEPS} steps, n={n:,}"
        return ReferenceFeatures(reference.stats, reference.features, description)

    def _batched_features(self, images: torch.Tensor) -> np.ndarray:
        return self._features(self.images(images))

    def _feature_extractor(self) -> FeatureExtractor:
        name = self.settings.features or self.model.default_features
        if name == "identity":
            return IdentityFeatures()
        if name == "digits":
            return BundledDigitsFeatures()
        if name == "inception":
            if not self.settings.inception_path:
                raise SolversearchError(
                    "this model's proxy FID uses Inception features: give the path of a local TorchScript "
                    "Inception file (metric.inception_path / --inception); solversearch never downloads it"
                )
            return TorchScriptFeatures(self.settings.inception_path, "inception")
        raise SolversearchError(f"unknown features {name!r}; expected 'identity', 'digits' or 'inception'")

    def denoiser_for(self, start: int, stop: int):
        """The denoiser for samples start..stop of the fixed x_T, bound to their conditioning if any."""
        if not self.condition_index:
            return self.denoiser
        conditioning = {
            name: self.model.conditions[name][index[start:stop]].to(self.device)
            for name, index in self.condition_index.items()
        }
        return self.denoiser.bind(**conditioning)

    def _autocast(self):
        if self.settings.mixed_precision and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return contextlib.nullcontext()


def teacher_schedule(noise: NoiseSchedule, steps: int) -> SolverSchedule:
    """The converged solution: UniPC-3 (fourth order, no lower-order final steps) on a λ-uniform grid
    from the start of the noise schedule to its usual end for that many steps. Where λ(t_max) = −∞ (a
    flow path at σ = 1) the first step is a first-order step to `t_start`, where λ is finite."""
    end = noise.default_t_end(steps)
    if noise.t_start < noise.t_max:
        times = [noise.t_max, *logsnr_uniform(noise, steps - 1, noise.t_start, end)]
        schedule = presets.from_pure_noise(presets.unipc(times, p=3, variant="bh2", lower_order_final=False))
    else:
        times = list(logsnr_uniform(noise, steps, noise.t_max, end))
        schedule = presets.unipc(times, p=3, variant="bh2", lower_order_final=False)
    return schedule.with_metadata(name=f"teacher/unipc_3_bh2/logsnr/{steps}", noise_schedule=noise.to_dict())
