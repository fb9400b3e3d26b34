"""Search operators on schedules: one interface, two implementations.

`ScheduleOperators` is what a searcher breeds with: random members of the space, mutation, crossover,
projection into the space and the canonical key. `LambdaOperators` moves continuous times in log-SNR λ
(local shifts relative to the neighbouring steps, resets, grids re-laid with `relay_times`) and every
per-step decision; `TimestepOperators` moves AutoDiffusion's integer training timesteps and per-step
skipped network blocks within a MAC budget. Both return valid schedules inside the space and never
silently drop a step without reason (the timestep operators drop one only to meet the budget).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from ..grids import make_grid
from ..noise import NoiseSchedule
from ..plan import MIN_LAMBDA_GAP
from ..presets import PRESETS
from ..schedule import SolverSchedule, Step
from .space import SearchSpace, SpaceError

LAMBDA_MARGIN = 1e-3  # minimal λ gap the operators keep between neighbouring times (≫ MIN_LAMBDA_GAP)
COEFFICIENT_DIGITS = 3  # linear scaling coefficients are kept on a 1e-3 lattice, so near-equal ones dedupe
assert LAMBDA_MARGIN > MIN_LAMBDA_GAP


def canonical_key(schedule: SolverSchedule, noise: NoiseSchedule) -> str:
    """The key a search identifies a schedule by (`Proposal.key`, a stored trial's "key"): equal for
    schedules that sample identically on `noise`'s path up to λ rounding (1e-4), whatever their metadata.
    Unlike `SolverSchedule.decisions_key` (the exact times), it does not tell apart times a search could
    not tell apart, so a search never evaluates the same sampler twice."""
    lams = [round(float(x), 4) if math.isfinite(x) else "inf" for x in noise.lambda_(np.array(schedule.timesteps))]
    doc = {"lambda": lams, "first": schedule.first_step, "steps": [s.to_dict() for s in schedule.steps]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


class ScheduleOperators(Protocol):
    """What a searcher breeds with, for one space, NFE budget and noise path. Every method returns a
    valid schedule inside the space; all randomness comes from the generator given."""

    space: SearchSpace
    nfe: int
    noise: NoiseSchedule

    def canonical_key(self, schedule: SolverSchedule) -> str: ...

    def random(self, rng: np.random.Generator) -> SolverSchedule: ...

    def mutate(self, schedule: SolverSchedule, rng: np.random.Generator, strength: int = 1) -> SolverSchedule: ...

    def crossover(self, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule: ...

    def project(self, schedule: SolverSchedule) -> SolverSchedule: ...


class LambdaOperators:
    """Continuous times in λ and every per-step decision: random / mutate / crossover / repair for one
    space, NFE budget and noise schedule."""

    def __init__(self, space: SearchSpace, nfe: int, noise: NoiseSchedule, units: Sequence[str] = ()):
        check_start_times(space, noise)
        self.space, self.nfe, self.noise = space, nfe, noise
        self.lambda_max = float(noise.lambda_(space.timesteps.t_min))
        # A time at pure noise (a flow path's t = 1, λ = −∞: diffusers' flow Euler grid starts there) is
        # read as the path's t_start, the nearest time with a finite λ, so its grid keeps its λ profile.
        # On VP and EDM paths every λ is at least this: nothing changes.
        self.lambda_min = float(noise.lambda_(noise.t_start))
        # Prunable network units a step may skip (empty: the space skips nothing).
        allowed = space.skip.units if space.skip and space.skip.units else tuple(units)
        self.units: tuple[str, ...] = tuple(allowed) if space.skip else ()
        self.max_skipped = int(space.skip.max_ratio * len(units)) if space.skip else 0

    # --- construction -------------------------------------------------------------------------

    def n_steps(self, first_step: str) -> int:
        return self.nfe + (first_step == "analytic")

    def random(self, rng: np.random.Generator) -> SolverSchedule:
        """A uniformly random member of the space: Dirichlet-distributed λ steps, random decisions."""
        ts = self.space.timesteps
        first = _pick(rng, self.space.first_steps)
        t_start, t_end = _pick(rng, ts.t_start), _pick(rng, ts.t_end)
        n = self.n_steps(first)
        lam0 = float(self.noise.lambda_(t_start))
        lam_end = self.lambda_max if t_end == 0 else float(self.noise.lambda_(t_end))
        fractions = np.cumsum(rng.dirichlet(np.ones(n)))  # n increments; with t_end = 0 the last is the tail
        lams = lam0 + np.concatenate([[0.0], fractions]) * (lam_end - lam0)
        times = self.times_from_lambdas(lams, t_start, t_end)
        steps = [self._random_step(rng, i, n) for i in range(n)]
        if self.max_skipped:
            steps = [replace(s, skip=self._random_skip(rng)) for s in steps]
        return self.repair(times, steps, first)

    def from_grid(self, grid: str, rng: np.random.Generator | None = None, first_step: str = "model") -> SolverSchedule:
        """A named grid with the space's end points and (random or default) decisions."""
        ts = self.space.timesteps
        n = self.n_steps(first_step)
        base = make_grid(grid, self.noise, n)
        times = self.relay_times(base, n, ts.t_start[0], ts.t_end[0])
        steps = [self._random_step(rng, i, n) if rng is not None else Step() for i in range(n)]
        return self.repair(times, steps, first_step)

    # --- variation ----------------------------------------------------------------------------

    def mutate(self, schedule: SolverSchedule, rng: np.random.Generator, strength: int = 1) -> SolverSchedule:
        """`strength` random edits: local λ shifts, λ resets, end-point or first-step changes, or one
        step's decisions redrawn."""
        times, steps, first = list(schedule.timesteps), list(schedule.steps), schedule.first_step
        for _ in range(max(1, strength)):
            moves = ["shift", "shift", "reset"]
            if len(self.space.timesteps.t_end) > 1 or len(self.space.timesteps.t_start) > 1:
                moves.append("ends")
            if len(self.space.first_steps) > 1:
                moves.append("first_step")
            if not self.space.fixed_solver:
                moves += ["decision"] * 4
            if self.max_skipped:
                moves += ["skip"] * 2
            move = _pick(rng, moves)
            if move in ("shift", "reset"):
                times = self.move_time(times, rng, local=move == "shift")
            elif move == "ends":
                ts = self.space.timesteps
                times = self.relay_times(times, len(steps), _pick(rng, ts.t_start), _pick(rng, ts.t_end))
            elif move == "skip":
                i = int(rng.integers(len(steps)))
                steps[i] = replace(steps[i], skip=self._toggle_unit(steps[i].skip, rng))
            elif move == "first_step":
                first = "analytic" if first == "model" else "model"
                n = self.n_steps(first)
                times = self.relay_times(times, n, times[0], times[-1])
                steps = _resize_steps(steps, n)
            else:
                i = int(rng.integers(len(steps)))
                steps[i] = self._mutate_step(steps[i], rng, i, len(steps))
        return self.repair(times, steps, first)

    def crossover(self, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
        """A child with a's structure (steps, end points, first step): its times a blend of both parents'
        in λ, each step's decisions from either parent."""
        n = a.n_steps
        b_times = self.relay_times(b.timesteps, n, a.timesteps[0], a.timesteps[-1])
        weight = float(rng.uniform(0.0, 1.0))
        lam_a, lam_b = self.lambdas(a.timesteps), self.lambdas(b_times)
        times = self.times_from_lambdas(
            np.append((1 - weight) * lam_a + weight * lam_b, self.lambda_max)
            if a.ends_at_zero
            else (1 - weight) * lam_a + weight * lam_b,
            a.timesteps[0],
            a.timesteps[-1],
        )
        b_steps = _resize_steps(list(b.steps), n)
        steps = [a.steps[i] if rng.random() < 0.5 else b_steps[i] for i in range(n)]
        return self.repair(times, steps, a.first_step)

    def project(self, schedule: SolverSchedule) -> SolverSchedule:
        """The schedule re-expressed in the space (e.g. a preset): nearest allowed end points and first
        step, its λ profile re-laid on the resulting step count, its decisions repaired."""
        ts, space = self.space.timesteps, self.space
        first = schedule.first_step if schedule.first_step in space.first_steps else space.first_steps[0]
        t_start = min(ts.t_start, key=lambda t: abs(t - schedule.timesteps[0]))
        t_end = min(ts.t_end, key=lambda t: abs(t - schedule.timesteps[-1]))
        n = self.n_steps(first)
        times = self.relay_times(schedule.timesteps, n, t_start, t_end)
        return self.repair(times, _resize_steps(list(schedule.steps), n), first)

    # --- validity -----------------------------------------------------------------------------

    def repair(self, times: list[float] | tuple[float, ...], steps: list[Step], first_step: str) -> SolverSchedule:
        """The nearest valid schedule in the space (decisions that cannot matter are normalised)."""
        n = len(steps)
        times = list(times)
        if not np.isfinite(self.noise.lambda_(times[0])):
            # A parent from a grid that starts at pure noise (FlowMatchEuler's σ = 1, λ = −∞): no step order
            # but the first is defined there, so its children start at the space's nearest start instead.
            times[0] = min(self.space.timesteps.t_start, key=lambda t: abs(t - times[0]))
        times = self._separate(times)
        skips = [self._repair_skip(step.skip) for step in steps]
        if self.space.fixed_solver:
            preset = PRESETS[self.space.solver].build(times)
            return replace(
                preset,
                name="",
                first_step=first_step,
                steps=tuple(replace(s, skip=k) for s, k in zip(preset.steps, skips)),
            )
        repaired = [
            replace(self._repair_step(step, i, n, to_zero=i == n - 1 and times[-1] == 0.0), skip=skips[i])
            for i, step in enumerate(steps)
        ]
        return SolverSchedule(timesteps=tuple(times), steps=tuple(repaired), first_step=first_step)

    def canonical_key(self, schedule: SolverSchedule) -> str:
        return canonical_key(schedule, self.noise)

    def relay_times(self, times, n_steps: int, t_start: float, t_end: float) -> list[float]:
        """Re-lay a grid's λ profile onto `n_steps` steps from t_start to t_end, keeping its shape:
        the profile (step index fraction → relative λ) is interpolated at the new step count."""
        lams = self.lambdas(times)
        # The tail to σ = 0, unless the grid's last positive time is t_min already (flow Euler's last σ is 1/N).
        if times[-1] == 0.0 and lams[-1] < self.lambda_max:
            lams = np.append(lams, self.lambda_max)
        profile = (lams - lams[0]) / (lams[-1] - lams[0])
        new = np.interp(np.linspace(0, 1, n_steps + 1), np.linspace(0, 1, len(profile)), profile)
        lam0 = float(self.lambdas([t_start])[0])
        lam_end = self.lambda_max if t_end == 0 else float(self.noise.lambda_(t_end))
        return self.times_from_lambdas(lam0 + new * (lam_end - lam0), t_start, t_end)

    # --- internals ----------------------------------------------------------------------------

    def lambdas(self, times) -> np.ndarray:
        """λ of the positive times; a time at pure noise counts as the path's t_start (see __init__)."""
        t = np.asarray([x for x in times if x > 0], dtype=np.float64)
        return np.maximum(self.noise.lambda_(t), self.lambda_min)

    def times_from_lambdas(self, lams: np.ndarray, t_start: float, t_end: float) -> list[float]:
        """n + 1 λ values → times; with t_end = 0 the last λ (the tail end) is replaced by t = 0."""
        t = [float(x) for x in self.noise.t_of_lambda(np.asarray(lams, dtype=np.float64))]
        t[0] = t_start
        t[-1] = t_end
        return t

    def _separate(self, times: list[float]) -> list[float]:
        """Enforce strictly increasing λ with a margin, moving interior points only (end points fixed)."""
        lams = self.lambdas(times)
        last = len(lams) - 1 if times[-1] > 0 else len(lams)  # index of the first point that is not free
        upper = lams[-1] if times[-1] > 0 else self.lambda_max
        count = len(lams) - (1 if times[-1] > 0 else 0)  # points from index 0 that must stay below `upper`
        if upper - lams[0] < LAMBDA_MARGIN * (count + 1):
            raise ValueError("the time range is too short for this many steps")
        for i in range(1, min(last, len(lams))):
            lams[i] = min(max(lams[i], lams[i - 1] + LAMBDA_MARGIN), upper - LAMBDA_MARGIN * (count - i))
        out = [float(times[0])] + [float(x) for x in self.noise.t_of_lambda(lams[1:])]
        if times[-1] > 0:
            out[-1] = float(times[-1])
        else:
            out.append(0.0)
        return out

    def move_time(self, times: list[float], rng: np.random.Generator, local: bool) -> list[float]:
        lams = self.lambdas(times)
        free_last = len(lams) - 1 if times[-1] > 0 else len(lams)
        if free_last <= 1:
            return times
        j = int(rng.integers(1, free_last))
        lo = lams[j - 1]
        hi = lams[j + 1] if j + 1 < len(lams) else self.lambda_max
        if local:
            scale = self.space.timesteps.local_shift * min(lams[j] - lo, hi - lams[j])
            value = lams[j] + rng.normal(0.0, scale)
        else:
            value = rng.uniform(lo, hi)
        lams[j] = float(np.clip(value, lo + LAMBDA_MARGIN, hi - LAMBDA_MARGIN))
        t = [float(x) for x in self.noise.t_of_lambda(lams)]
        t[0] = times[0]
        if times[-1] > 0:
            t[-1] = times[-1]
        else:
            t.append(0.0)
        return t

    def _random_step(self, rng: np.random.Generator | None, i: int, n: int) -> Step:
        if rng is None or self.space.fixed_solver:
            return Step()
        space = self.space
        order = int(_pick(rng, [k for k in space.orders if k <= i + 1]))
        scaling = _pick(rng, space.scalings)
        low = _pick(rng, space.derivatives) == "low"
        return Step(
            prediction=_pick(rng, space.predictions),
            order=order,
            derivative_points=_points(order, low),
            scaling=scaling,
            linear_coefficient=float(rng.uniform(*space.linear_range)) if scaling == "linear" else 0.0,
            corrector=_pick(rng, space.correctors) if i < n - 1 else "none",
        )

    def _mutate_step(self, step: Step, rng: np.random.Generator, i: int, n: int) -> Step:
        space = self.space
        field_name = _pick(rng, ["prediction", "order", "derivatives", "scaling", "corrector"])
        if field_name == "prediction":
            return replace(step, prediction=_pick(rng, space.predictions))
        if field_name == "order":
            order = int(_pick(rng, [k for k in space.orders if k <= i + 1]))
            return replace(step, order=order, derivative_points=_points(order, _is_low(step)))
        if field_name == "derivatives":
            return replace(step, derivative_points=_points(step.order, _pick(rng, space.derivatives) == "low"))
        if field_name == "scaling":
            scaling = _pick(rng, space.scalings)
            if scaling == "linear" and step.scaling == "linear" and rng.random() < 0.5:
                # local move of the coefficient
                width = space.linear_range[1] - space.linear_range[0]
                coefficient = step.linear_coefficient + rng.normal(0.0, 0.15 * width)
            else:
                coefficient = float(rng.uniform(*space.linear_range))
            return replace(step, scaling=scaling, linear_coefficient=coefficient if scaling == "linear" else 0.0)
        return replace(step, corrector=_pick(rng, space.correctors) if i < n - 1 else "none")

    def _random_skip(self, rng: np.random.Generator) -> tuple[str, ...]:
        """Half the steps skip nothing; the others a random subset up to the allowed ratio."""
        if rng.random() < 0.5:
            return ()
        count = int(rng.integers(1, self.max_skipped + 1))
        return tuple(sorted(rng.choice(self.units, size=count, replace=False).tolist(), key=self.units.index))

    def _toggle_unit(self, skip: tuple[str, ...], rng: np.random.Generator) -> tuple[str, ...]:
        """Add or remove one unit (a real change, unlike AutoDiffusion's no-op for non-empty sets)."""
        unit = str(rng.choice(self.units))
        if unit in skip:
            return tuple(u for u in skip if u != unit)
        if len(skip) >= self.max_skipped:
            skip = tuple(u for u in skip if u != skip[int(rng.integers(len(skip)))])  # swap one out
        return tuple(sorted(set(skip) | {unit}, key=self.units.index))

    def _repair_skip(self, skip: tuple[str, ...]) -> tuple[str, ...]:
        """Only known units, in network order, at most the allowed ratio."""
        if not self.max_skipped:
            return ()
        known = [u for u in self.units if u in set(skip)]
        return tuple(known[: self.max_skipped])

    def _repair_step(self, step: Step, i: int, n: int, to_zero: bool) -> Step:
        space = self.space
        allowed = [k for k in space.orders if k <= i + 1] or [1]
        order = 1 if to_zero else (step.order if step.order in allowed else max(allowed))
        corrector = step.corrector if i < n - 1 and step.corrector in space.correctors else "none"
        scaling = step.scaling if step.scaling in space.scalings else space.scalings[0]
        if order == 1 and corrector == "none":
            scaling = "none"  # no derivative term: the scaling cannot matter
        coefficient = 0.0
        if scaling == "linear":
            low, high = space.linear_range
            coefficient = round(float(np.clip(step.linear_coefficient, low, high)), COEFFICIENT_DIGITS)
        prediction = step.prediction if step.prediction in space.predictions else space.predictions[0]
        low_order = _is_low(step) and "low" in space.derivatives or "full" not in space.derivatives
        return Step(
            prediction=prediction,
            order=order,
            derivative_points=_points(order, low_order),
            scaling=scaling,
            linear_coefficient=coefficient,
            corrector=corrector,
            skip=step.skip,
        )


def check_start_times(space: SearchSpace, noise: NoiseSchedule) -> None:
    """Every start time must have a finite λ on the model's path: times move in λ, and a flow path's
    t = 1 (α = 0, pure noise) is λ = −∞."""
    bad = [t for t in space.timesteps.t_start if not math.isfinite(float(noise.lambda_(t)))]
    if bad:
        raise SpaceError(
            f"timesteps.t_start: {bad} is pure noise on this model's {noise.family} path (log-SNR −∞), where times "
            f"cannot be searched; start at or below the path's t_start {noise.t_start:g}"
            + (" (as search_spaces/usf_flow.yaml and timesteps_flow.yaml do)" if noise.family == "flow" else "")
        )


def _points(order: int, low: bool) -> tuple[tuple[int, ...], ...]:
    full = tuple(range(1, order))
    return tuple(((1,) if low and n == 1 else full) for n in range(1, order))


def _is_low(step: Step) -> bool:
    return step.order >= 3 and len(step.derivative_points[0]) < step.order - 1


def _resize_steps(steps: list[Step], n: int) -> list[Step]:
    """Steps for a schedule of n steps, taking the step at the proportional index of the old one."""
    m = len(steps)
    return [steps[min(m - 1, round(i * (m - 1) / max(n - 1, 1)))] for i in range(n)]


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


class TimestepOperators:
    """AutoDiffusion's operators: integer training timesteps of a discrete model (largest first, ending
    with the denoising step), the space's fixed solver on them, and per-step sets of skipped network
    units of at most `skip_ratio` of them, within the MAC budget of `nfe` unpruned evaluations.

    Unlike the public code: mutations of times are local moves as well as resets, a skip mutation always
    changes the set, and crossover never creates duplicate timesteps. `with_skip_ratio` gives the
    operators of a generation that may skip a larger share (AutoDiffusion's second stage)."""

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: Any,  # a DiscreteVP: only it has integer training timesteps
        costs: Any,  # the model's UnitCosts: the MACs of a full evaluation and of each unit
        units: Sequence[str] = (),
        min_first_step: float = 0.5,
        skip_ratio: float = 0.0,
    ):
        self.space, self.nfe, self.noise = space, nfe, noise
        self.costs, self.units = costs, tuple(units)
        self.skip_ratio = skip_ratio
        self.mac_budget = int(nfe * costs.full)  # the NFE budget, unpruned
        self.n_train = noise.num_train_timesteps
        self.min_first = int(min_first_step * self.n_train)

    def with_skip_ratio(self, ratio: float) -> TimestepOperators:
        """The same operators allowing another share of skipped units per step."""
        other = copy.copy(self)
        other.skip_ratio = ratio
        return other

    def canonical_key(self, schedule: SolverSchedule) -> str:
        return canonical_key(schedule, self.noise)

    # --- construction -------------------------------------------------------------------------

    def timesteps_of(self, schedule: SolverSchedule) -> list[int]:
        return [round(t * self.n_train - 1) for t in schedule.timesteps if t > 0]

    def build(self, steps: Sequence[int], skips: Sequence[Sequence[str]]) -> SolverSchedule:
        """The fixed solver on integer timesteps (largest first), ending with the denoising step."""
        times = [(n + 1) / self.n_train for n in steps] + [0.0]
        base = PRESETS[self.space.solver].build(times)
        # A searched schedule is no longer the preset: it must not carry the preset's name.
        return replace(base, name="", steps=tuple(replace(s, skip=tuple(k)) for s, k in zip(base.steps, skips)))

    def random(self, rng: np.random.Generator) -> SolverSchedule:
        """`nfe` distinct random timesteps (the first in the upper range), nothing skipped."""
        k = self.nfe
        first = int(rng.integers(self.min_first, self.n_train))
        rest = rng.choice(first, size=k - 1, replace=False) if k > 1 else []
        steps = sorted([first, *map(int, rest)], reverse=True)
        return self.repair(steps, [[] for _ in steps], rng)

    def from_grid(self, grid: str, rng: np.random.Generator) -> SolverSchedule:
        """A named grid rounded to training timesteps, nothing skipped (`rng` only breaks a budget tie)."""
        times = make_grid(grid, self.noise, self.nfe)
        steps = [round(t * self.n_train - 1) for t in times[:-1]]
        return self.repair(steps, [[] for _ in steps], rng)

    def project(self, schedule: SolverSchedule) -> SolverSchedule:
        """The schedule on its nearest training timesteps with the space's solver, its skips kept."""
        return self.repair(
            self.timesteps_of(schedule), [list(s.skip) for s in schedule.steps], np.random.default_rng(0)
        )

    # --- variation ----------------------------------------------------------------------------

    def mutate(self, schedule: SolverSchedule, rng: np.random.Generator, strength: int = 1) -> SolverSchedule:
        """`strength` edits: a local move or a reset of one timestep; once skipping is allowed also a
        changed skip set, an extra step in the widest gap, or a dropped step."""
        steps, skips = self.timesteps_of(schedule), [list(s.skip) for s in schedule.steps]
        for _ in range(max(1, strength)):
            moves = ["local", "local", "reset"]
            if self.skip_ratio > 0:
                moves += ["skip", "skip", "add_step", "remove_step"]
            move = moves[int(rng.integers(len(moves)))]
            if move in ("local", "reset"):
                steps = self._move(steps, rng, local=move == "local")
            elif move == "skip":
                i = int(rng.integers(len(skips)))
                skips[i] = self._toggle(skips[i], rng)
            elif move == "add_step":
                steps, skips = _add_step(steps, skips)
            elif len(steps) > 2:
                j = int(rng.integers(1, len(steps)))
                del steps[j], skips[j]
        return self.repair(steps, skips, rng)

    def crossover(self, a: SolverSchedule, b: SolverSchedule, rng: np.random.Generator) -> SolverSchedule:
        """a's number of steps; timesteps drawn without replacement from both parents' (so no
        duplicates), each step's skip set from the parent that has that timestep."""
        pool: dict[int, list[str]] = {}
        for parent in (b, a):  # a's skip sets win where both parents share a timestep
            for n, step in zip(self.timesteps_of(parent), parent.steps):
                pool[n] = list(step.skip)
        k = a.n_steps
        chosen = sorted(rng.choice(sorted(pool), size=min(k, len(pool)), replace=False).tolist(), reverse=True)
        return self.repair(chosen, [pool[n] for n in chosen], rng)

    # --- validity -----------------------------------------------------------------------------

    def repair(self, steps: list[int], skips: list[list[str]], rng: np.random.Generator) -> SolverSchedule:
        """Distinct decreasing timesteps in range, skip sets within the ratio, cost within budget."""
        order = sorted(range(len(steps)), key=lambda i: -steps[i])
        steps, skips = [steps[i] for i in order], [list(dict.fromkeys(skips[i])) for i in order]
        steps[0] = int(np.clip(steps[0], self.min_first, self.n_train - 1))
        for i in range(1, len(steps)):
            steps[i] = min(steps[i], steps[i - 1] - 1)
        while steps and steps[-1] < 0:
            del steps[-1], skips[-1]
        cap = int(self.skip_ratio * len(self.units))
        skips = [[u for u in self.units if u in set(s)][:cap] for s in skips]
        schedule = self.build(steps, skips)
        while self.costs.schedule_cost(schedule) > self.mac_budget:
            # Over budget: at a random step with room under the cap, skip the most expensive unit it
            # still runs (greedy, so pruning can pay for an extra step); else drop a step.
            room = [i for i, s in enumerate(skips) if len(s) < cap]
            if room:
                i = room[int(rng.integers(len(room)))]
                running = [u for u in self.units if u not in skips[i]]
                skips[i] = [*skips[i], max(running, key=lambda u: self.costs.units[u])]
            else:
                j = int(rng.integers(1, len(steps))) if len(steps) > 1 else 0
                del steps[j], skips[j]
            schedule = self.build(steps, skips)
        return schedule

    # --- internals ----------------------------------------------------------------------------

    def _move(self, steps: list[int], rng: np.random.Generator, local: bool) -> list[int]:
        j = int(rng.integers(len(steps)))
        high = self.n_train - 1 if j == 0 else steps[j - 1] - 1
        low = self.min_first if j == 0 else (steps[j + 1] + 1 if j + 1 < len(steps) else 0)
        if high <= low:
            return steps
        if local:
            scale = max(1.0, 0.3 * min(high - steps[j], steps[j] - low, (high - low) / 2))
            value = steps[j] + round(rng.normal(0.0, scale)) or steps[j] + 1
        else:
            value = int(rng.integers(low, high + 1))
        steps = list(steps)
        steps[j] = int(np.clip(value, low, high))
        return steps

    def _toggle(self, skip: list[str], rng: np.random.Generator) -> list[str]:
        cap = int(self.skip_ratio * len(self.units))
        if cap == 0:
            return []
        unit = self.units[int(rng.integers(len(self.units)))]
        if unit in skip:
            return [u for u in skip if u != unit]
        if len(skip) >= cap:
            skip = [u for u in skip if u != skip[int(rng.integers(len(skip)))]]
        return [*skip, unit]


def _add_step(steps: list[int], skips: list[list[str]]) -> tuple[list[int], list[list[str]]]:
    """A new timestep in the widest gap (between the last timestep and 0 counts too)."""
    bounds = [*steps, -1]
    gaps = [bounds[i] - bounds[i + 1] for i in range(len(steps))]
    i = int(np.argmax(gaps))
    if gaps[i] < 2:
        return steps, skips
    new = (bounds[i] + bounds[i + 1]) // 2 if bounds[i + 1] >= 0 else bounds[i] // 2
    return [*steps[: i + 1], new, *steps[i + 1 :]], [*skips[: i + 1], [], *skips[i + 1 :]]
