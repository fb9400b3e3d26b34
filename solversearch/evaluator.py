"""Score a schedule on a model: proxy FID, KID and error to a reference solution, with its cost.

Common random numbers: every schedule an Evaluator scores starts from the same x_T (and the same
conditioning), drawn once from its seed, so differences between schedules are the solvers', not the
noise's. A schedule that diverges (NaN/inf samples) is a result flagged `diverged` with infinite
metrics — never an exception that would kill a search.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import presets
from .errors import SolversearchError
from .grids import logsnr_uniform
from .metrics.distances import GaussianStats, error_to_reference, frechet_distance, kernel_inception_distance
from .metrics.features import BundledDigitsFeatures, FeatureExtractor, IdentityFeatures, TorchScriptFeatures
from .metrics.reference import ArrayCache, ReferenceFeatures, reference_features
from .models.spec import ModelHandle
from .plan import compile_plan
from .sampler import execute
from .schedule import SolverSchedule

# The model's own converged distribution (reference for models without data, and the "floor"):
REFERENCE_SOLVER_STEPS = 200


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
    error_to_reference: bool = True
    reference_steps: int = 100  # steps of the high-accuracy solution for error-to-reference


@dataclass(frozen=True)
class EvaluationResult:
    fid: float
    kid: float
    kid_std: float
    error_to_reference: float | None
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: infinite metrics (a diverged schedule) become None, `diverged` says why."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def metrics(self) -> dict[str, float]:
        values = {"fid": self.fid, "kid": self.kid, "kid_std": self.kid_std}
        if self.error_to_reference is not None:
            values["error_to_reference"] = self.error_to_reference
        return values


class Evaluator:
    """Evaluates schedules on one model with fixed noise; reference statistics are cached on disk."""

    def __init__(self, model: ModelHandle, settings: EvaluationSettings | None = None, cache: ArrayCache | None = None):
        self.model = model
        self.settings = settings or EvaluationSettings()
        self.cache = cache or ArrayCache()
        self.device = torch.device(self.settings.device)
        self.denoiser = model.denoiser.to(self.device) if isinstance(model.denoiser, torch.nn.Module) else model.denoiser
        self.features = self._feature_extractor()
        generator = torch.Generator().manual_seed(self.settings.seed)
        self.x_T = torch.randn((self.settings.n, *model.sample_shape), generator=generator)
        self.condition_index = {
            name: torch.randint(0, bank.shape[0], (self.settings.n,), generator=generator)
            for name, bank in model.conditions.items()
        }
        self._reference: ReferenceFeatures | None = None
        self._batch_size: int | None = None
        self._solutions: dict[tuple[float, float], torch.Tensor] = {}

    # --- public -------------------------------------------------------------------------------

    def evaluate(self, schedule: SolverSchedule) -> EvaluationResult:
        started = time.perf_counter()
        samples = self.sample(schedule)
        sampled = time.perf_counter()
        diverged = not bool(torch.isfinite(samples).all())
        if diverged:
            fid = kid = kid_std = err = math.inf
        else:
            reference = self.reference()
            features = self.features(samples.clamp(-1, 1).to(self.device)).cpu().numpy()
            fid = frechet_distance(GaussianStats.of(features), reference.stats)
            kid, kid_std = kernel_inception_distance(
                features, reference.features, self.settings.kid_subsets, self.settings.kid_subset_size, self.settings.seed
            )
            err = None
            if self.settings.error_to_reference:
                err = error_to_reference(samples, self.reference_solution(schedule.timesteps[0], schedule.timesteps[-1]))
        finished = time.perf_counter()
        return EvaluationResult(
            fid=fid,
            kid=kid,
            kid_std=kid_std,
            error_to_reference=err,
            diverged=diverged,
            nfe=schedule.nfe,
            n=self.settings.n,
            seed=self.settings.seed,
            seconds=finished - started,
            sampling_seconds=sampled - started,
            metric_seconds=finished - sampled,
            samples_per_second=self.settings.n / max(sampled - started, 1e-9),
            macs=self.macs(schedule),
        )

    @torch.no_grad()
    def sample(self, schedule: SolverSchedule) -> torch.Tensor:
        """All n samples of `schedule` from the evaluator's fixed x_T (float32, on the CPU)."""
        plan = compile_plan(schedule, self.model.noise_schedule)
        out = []
        batch_size = self.batch_size
        for start in range(0, self.settings.n, batch_size):
            stop = min(start + batch_size, self.settings.n)
            x_T = self.x_T[start:stop].to(self.device)
            with self._autocast():
                x = execute(plan, self._denoiser_for(start, stop), x_T).sample
            out.append(x.float().cpu())
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
            raise SolversearchError(f"even a batch of {min(64, largest_needed)} samples does not fit on {self.device}; lower the model size or use the CPU")
        return max(1, min(self.settings.n, fits // 2))

    def macs(self, schedule: SolverSchedule) -> float | None:
        """Multiply-accumulates per sample: Σ over the model evaluations of (full − skipped units), when
        the model can count them (diffusers UNets; None for the analytic mixture)."""
        costs = getattr(self.denoiser, "unit_costs", None)
        return None if costs is None else float(costs().schedule_cost(schedule))

    def reference(self) -> ReferenceFeatures:
        """Reference statistics in the metric's feature space (cached on disk)."""
        if self._reference is None:
            self._reference = self._compute_reference()
        return self._reference

    def floor(self) -> EvaluationResult:
        """The metric of the model's own converged distribution: a 200-step solution from the same x_T."""
        return self.evaluate(self._high_accuracy_schedule(1.0, self.model.noise_schedule.default_t_end(REFERENCE_SOLVER_STEPS), REFERENCE_SOLVER_STEPS))

    def reference_solution(self, t_start: float, t_end: float) -> torch.Tensor:
        """High-accuracy solution from the same x_T to t_end (cached on disk and in memory)."""
        key = (t_start, t_end)
        if key not in self._solutions:
            cache_key = {
                "kind": "solution",
                "model": self.model.fingerprint,
                "n": self.settings.n,
                "seed": self.settings.seed,
                "t_start": t_start,
                "t_end": t_end,
                "steps": self.settings.reference_steps,
            }
            schedule = self._high_accuracy_schedule(t_start, t_end, self.settings.reference_steps)
            arrays = self.cache.get_or_compute(cache_key, lambda: {"samples": self.sample(schedule).numpy()})
            self._solutions[key] = torch.from_numpy(arrays["samples"])
        return self._solutions[key]

    # --- internals ----------------------------------------------------------------------------

    def _high_accuracy_schedule(self, t_start: float, t_end: float, steps: int) -> SolverSchedule:
        """UniPC-3 (fourth order) on a λ-uniform grid; a final t = 0 is reached by the denoising step."""
        noise = self.model.noise_schedule
        last = t_end if t_end > 0 else noise.default_t_end(steps)
        times = list(logsnr_uniform(noise, steps, t_start, last))
        if t_end == 0:
            times.append(0.0)
        return presets.unipc(times, p=3, variant="bh2", lower_order_final=False)

    def _compute_reference(self) -> ReferenceFeatures:
        model, settings = self.model, self.settings
        feature_name = settings.features or model.default_features
        if model.exact_reference is not None and feature_name == "identity":
            mean, cov = model.exact_reference()
            samples = model.reference_data() if model.reference_data else None
            features = None if samples is None else self.features(samples).cpu().numpy()
            return ReferenceFeatures(GaussianStats(mean, cov, n=10**9), features)
        key = {"features": self.features.identity, "model": model.fingerprint}
        if model.reference_data is not None:
            key["source"] = "data"
            return reference_features(self.cache, key, lambda: self._batched_features(model.reference_data()))
        key.update(source="model", steps=REFERENCE_SOLVER_STEPS, n=settings.n, seed=2**31 - 1)
        schedule = self._high_accuracy_schedule(1.0, model.noise_schedule.default_t_end(REFERENCE_SOLVER_STEPS), REFERENCE_SOLVER_STEPS)
        reference_evaluator = Evaluator(model, _replace_seed(settings, 2**31 - 1), self.cache)
        return reference_features(self.cache, key, lambda: self._batched_features(reference_evaluator.sample(schedule)))

    def _batched_features(self, images: torch.Tensor) -> np.ndarray:
        chunks = [
            self.features(images[i : i + self.batch_size].to(self.device).clamp(-1, 1)).cpu().numpy()
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return np.concatenate(chunks)

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

    def _denoiser_for(self, start: int, stop: int):
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


def _replace_seed(settings: EvaluationSettings, seed: int) -> EvaluationSettings:
    from dataclasses import replace

    return replace(settings, seed=seed, error_to_reference=False)
