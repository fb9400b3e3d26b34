"""Performance predictors that screen candidate solver schedules before anyone pays to evaluate them.

Trained on schedules whose metric (lower is better) was measured, a predictor scores unevaluated
candidates so the evolutionary search (USF's S³) evaluates only the promising ones. One model serves
every NFE budget: schedules are encoded as variable-length sequences of per-step feature rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from scipy.stats import kendalltau
from sklearn.ensemble import GradientBoostingRegressor

from .noise import NoiseSchedule
from .schedule import MAX_ORDER, SCALINGS, SolverSchedule, Step

# Fixed normalisation constants (never fitted to a training set, so encodings are comparable across
# fits and search rounds). VP schedules span λ ≈ −6..6; few-step solvers take λ steps of about 0.5..4.
LAMBDA_SCALE = 6.0
STEP_SCALE = 4.0
# The normalised step size that stands in for the infinite λ step of the final denoising step to t = 0.
TO_ZERO_STEP = 1.0
# Search spaces keep linear coefficients within ±1; clipping keeps extreme (but valid) values finite in
# float32 without letting one outlier dominate the inputs.
COEFFICIENT_CLIP = 4.0
# Pairwise losses grow quadratically with the training set; beyond this, sample pairs per epoch.
MAX_PAIRS_PER_EPOCH = 20_000

# Column layout of one step row (see `_step_row` for what each column means).
STEP_COLUMNS: tuple[str, ...] = tuple(
    ["lambda_start", "step_size", "to_zero"]
    + [f"order_{k}" for k in range(1, MAX_ORDER + 1)]
    + ["data_prediction", "unic"]
    + [f"scaling_{s}" for s in SCALINGS]
    + [
        "linear_coefficient",
        "low_order_derivative",
        "mean_back_index",
        "first_derivative_factor",
        "second_derivative_factor",
        "skip_fraction",
    ]
    + ["analytic_first_step"]
)
STEP_FEATURES: int = len(STEP_COLUMNS)
GLOBAL_FEATURES: int = 4


def encode_schedule(schedule: SolverSchedule, noise: NoiseSchedule, n_units: int | None = None) -> np.ndarray:
    """One float32 row of STEP_FEATURES per step, in sampling order; `n_units` counts skippable blocks."""
    # A start at pure noise (a flow path's σ = 1, λ = −∞) is encoded as the path's t_start: the first-order
    # data step taken from either lands on almost the same point. Other λ are never below it.
    lambdas = np.maximum(noise.lambda_(np.asarray(schedule.timesteps, dtype=np.float64)), noise.lambda_(noise.t_start))
    rows = [_step_row(i, step, lambdas[i], lambdas[i + 1], schedule, n_units) for i, step in enumerate(schedule.steps)]
    return np.asarray(rows, dtype=np.float32).reshape(schedule.n_steps, STEP_FEATURES)


def _step_row(
    i: int, step: Step, lam_start: float, lam_end: float, schedule: SolverSchedule, n_units: int | None
) -> list[float]:
    to_zero = math.isinf(lam_end)  # the step to t = 0, where λ = +inf
    row = [
        # Where the step starts on the noise scale: every step starts at t > 0, so λ is finite (see above).
        lam_start / LAMBDA_SCALE,
        # How far it goes: the solvers' truncation error is governed by h = λ_end − λ_start.
        TO_ZERO_STEP if to_zero else (lam_end - lam_start) / STEP_SCALE,
        # The denoising step x = x̂₀ behaves unlike any finite step; flag it rather than encode h = inf.
        float(to_zero),
    ]
    row += [float(step.order == k) for k in range(1, MAX_ORDER + 1)]
    row += [float(step.prediction == "data"), float(step.corrector == "unic")]
    row += [float(step.scaling == s) for s in SCALINGS]
    first_points = step.derivative_points[0] if step.derivative_points else ()
    used = step.history_used
    row += [
        _clip(step.linear_coefficient),  # 0 unless scaling is linear (validation guarantees it)
        # USF's low-order derivative estimate: the first derivative uses fewer points than it could.
        float(step.order > 1 and len(first_points) < step.order - 1),
        # How far back the history reaches (stale points hurt more on coarse grids); 0 for order 1.
        (sum(used) / len(used) / MAX_ORDER) if used else 0.0,
        # A learned scale of the first-derivative term (refine.py); 0 for the presets and the space.
        _clip(step.first_derivative_factor - 1.0),
        # Departure from the exact Taylor coefficient (published DPM-Solver++(3M) has −0.5).
        _clip(step.second_derivative_factor - 1.0),
        # Share of the network skipped at this step's evaluation.
        len(step.skip) / n_units if n_units else 0.0,
        # Step 0 replaced by the analytic ε(x_T, T) = x_T: no model evaluation behind it.
        float(i == 0 and schedule.first_step == "analytic"),
    ]
    return row


def _clip(value: float) -> float:
    return float(np.clip(value, -COEFFICIENT_CLIP, COEFFICIENT_CLIP))


def encode_globals(schedule: SolverSchedule) -> np.ndarray:
    """Whole-schedule features: NFE/10, steps/10, analytic first step, ends at t = 0."""
    analytic = float(schedule.first_step == "analytic")
    values = [schedule.nfe / 10.0, schedule.n_steps / 10.0, analytic, float(schedule.ends_at_zero)]
    return np.array(values, dtype=np.float32)


def metric_targets(metrics: Sequence[float]) -> np.ndarray:
    """Regression / ranking targets: log of the metric, so ratios (not absolute gaps) matter.

    Non-finite metrics (a diverged schedule) become the largest finite log + 1, ranking worst.
    Values ≤ 0 (an unbiased estimator can dip below zero) are floored at 1e-12: the best possible.
    """
    values = np.asarray(metrics, dtype=np.float64).reshape(-1)
    finite = np.isfinite(values)
    logs = np.full(values.shape, np.nan)
    logs[finite] = np.log(np.maximum(values[finite], 1e-12))
    worst = (logs[finite].max() if finite.any() else 0.0) + 1.0
    logs[~finite] = worst
    return logs


def kendall_tau(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Kendall's τ between predicted and true scores; 0.0 where it is undefined (e.g. constant input)."""
    tau = kendalltau(np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)).statistic
    return 0.0 if tau is None or not math.isfinite(tau) else float(tau)


class Predictor(Protocol):
    """What the search needs: learn from measured schedules, then score unevaluated ones."""

    def fit(self, schedules: Sequence[SolverSchedule], metrics: Sequence[float]) -> Predictor: ...

    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """One score per schedule; lower = predicted better."""
        ...


# --- the ranking model --------------------------------------------------------------------------


class _SequenceScorer(torch.nn.Module):
    """GRU over step rows (each with the globals appended) → pooled → MLP → one badness score."""

    def __init__(self, hidden: int):
        super().__init__()
        self.gru = torch.nn.GRU(STEP_FEATURES + GLOBAL_FEATURES, hidden, batch_first=True)
        self.head = torch.nn.Sequential(
            torch.nn.Linear(2 * hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = torch.nn.utils.rnn.pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
        outputs, last = self.gru(packed)
        # Padded positions come back as zeros, so summing and dividing by the length is the masked mean.
        padded, _ = torch.nn.utils.rnn.pad_packed_sequence(outputs, batch_first=True)
        mean = padded.sum(1) / lengths[:, None].to(padded.dtype)
        return self.head(torch.cat([mean, last[0]], dim=1)).squeeze(1)


def _sequence_batch(
    schedules: Sequence[SolverSchedule], noise: NoiseSchedule, n_units: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded (batch, max steps, features) inputs and the true lengths."""
    rows = [
        np.concatenate([encode_schedule(s, noise, n_units), np.tile(encode_globals(s), (s.n_steps, 1))], axis=1)
        for s in schedules
    ]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    inputs = torch.zeros(len(rows), int(lengths.max()), STEP_FEATURES + GLOBAL_FEATURES)
    for b, r in enumerate(rows):
        inputs[b, : len(r)] = torch.from_numpy(r)
    return inputs, lengths


def _ordered_pairs(targets: np.ndarray, min_gap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs i < j whose targets differ by more than `min_gap` (smaller gaps are measurement noise)."""
    y = torch.from_numpy(targets)
    i, j = torch.triu_indices(len(y), len(y), offset=1)
    gap = y[i] - y[j]
    keep = gap.abs() > min_gap
    return i[keep], j[keep], torch.sign(gap[keep]).float()


class RankingPredictor:
    """A small GRU trained with a pairwise hinge ranking loss (as OMS-DPM / USF train theirs).

    Only the order of the predictions is meaningful, which is all a screening search needs.
    """

    def __init__(
        self,
        noise: NoiseSchedule,
        n_units: int | None = None,
        hidden: int = 32,
        epochs: int = 300,
        lr: float = 3e-3,
        margin: float = 1.0,
        min_gap: float = 0.05,
        seed: int = 0,
    ):
        self.noise, self.n_units = noise, n_units
        self.hidden, self.epochs, self.lr = hidden, epochs, lr
        self.margin, self.min_gap, self.seed = margin, min_gap, seed
        self._model: _SequenceScorer | None = None

    def fit(self, schedules: Sequence[SolverSchedule], metrics: Sequence[float]) -> RankingPredictor:
        if len(schedules) != len(metrics):
            raise ValueError(f"{len(schedules)} schedules but {len(metrics)} metrics")
        self._model = None
        first, second, signs = _ordered_pairs(metric_targets(metrics), self.min_gap)
        if len(signs) < 2:
            return self  # nothing to rank by: predict() gives no preference
        inputs, lengths = _sequence_batch(schedules, self.noise, self.n_units)
        # Seed the initialisation without disturbing the caller's global torch RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _SequenceScorer(self.hidden)
        generator = torch.Generator().manual_seed(self.seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.lr)
        model.train()
        for _ in range(self.epochs):
            pick = _pair_subset(len(signs), generator)
            scores = model(inputs, lengths)
            diffs = scores[first[pick]] - scores[second[pick]]
            # Scores are badness: the worse schedule of each pair should score higher by `margin`.
            loss = torch.relu(self.margin - signs[pick] * diffs).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        self._model = model.eval()
        return self

    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        if self._model is None or len(schedules) == 0:
            return np.zeros(len(schedules))
        inputs, lengths = _sequence_batch(schedules, self.noise, self.n_units)
        with torch.no_grad():
            return self._model(inputs, lengths).double().numpy()


def _pair_subset(n_pairs: int, generator: torch.Generator) -> torch.Tensor | slice:
    if n_pairs <= MAX_PAIRS_PER_EPOCH:
        return slice(None)
    return torch.randperm(n_pairs, generator=generator)[:MAX_PAIRS_PER_EPOCH]


# --- the baseline -------------------------------------------------------------------------------


class GradientBoostingPredictor:
    """Gradient-boosted trees regressing the log metric on fixed-length (padded) schedule vectors."""

    def __init__(self, noise: NoiseSchedule, n_units: int | None = None, max_steps: int = 24, seed: int = 0):
        self.noise, self.n_units, self.max_steps, self.seed = noise, n_units, max_steps, seed
        self._model: GradientBoostingRegressor | None = None

    def fit(self, schedules: Sequence[SolverSchedule], metrics: Sequence[float]) -> GradientBoostingPredictor:
        if len(schedules) != len(metrics):
            raise ValueError(f"{len(schedules)} schedules but {len(metrics)} metrics")
        self._model = None
        if len(schedules) < 2:
            return self
        model = GradientBoostingRegressor(random_state=self.seed)
        self._model = model.fit(self._vectors(schedules), metric_targets(metrics))
        return self

    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        if self._model is None or len(schedules) == 0:
            return np.zeros(len(schedules))
        return self._model.predict(self._vectors(schedules))

    def _vectors(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        return np.stack([self._vector(s) for s in schedules])

    def _vector(self, schedule: SolverSchedule) -> np.ndarray:
        if schedule.n_steps > self.max_steps:
            raise ValueError(
                f"a schedule with {schedule.n_steps} steps does not fit max_steps={self.max_steps}; "
                "build the predictor with a larger max_steps"
            )
        # Each slot holds one step's row plus a 1 marking it as a real step (padding slots are all 0).
        slots = np.zeros((self.max_steps, STEP_FEATURES + 1), dtype=np.float32)
        slots[: schedule.n_steps, :STEP_FEATURES] = encode_schedule(schedule, self.noise, self.n_units)
        slots[: schedule.n_steps, STEP_FEATURES] = 1.0
        return np.concatenate([slots.reshape(-1), encode_globals(schedule)])
