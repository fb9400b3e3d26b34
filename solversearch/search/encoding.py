"""A flat, Optuna-friendly parameterisation of a search space: schedule ↔ {name: value} with distributions.

Times are positive λ-step weights w_k (their normalised cumulative sum places the times), so any
parameter values give strictly decreasing times. Per-step decisions are categorical parameters.
The same names are used as the params of every stored Optuna trial, whatever algorithm produced it,
so a study reads the same in Optuna's tools and can warm-start Optuna's samplers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from ..schedule import SolverSchedule, Step
from .operators import LambdaOperators

WEIGHT_RANGE = (0.01, 1.0)


class ScheduleEncoding:
    """Maps between schedules of one space/NFE and flat parameters (define-by-run for Optuna)."""

    def __init__(self, operators: LambdaOperators):
        self.ops = operators
        self.space = operators.space

    # --- Optuna define-by-run -----------------------------------------------------------------

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask `trial` for every parameter (conditional ones only when they apply); return the params."""
        params: dict[str, Any] = {}
        for _ in self._distributions(params, trial=trial):
            pass  # walking the generator asks the trial for each parameter in order
        return params

    def to_schedule(self, params: dict[str, Any]) -> SolverSchedule:
        space, ts = self.space, self.space.timesteps
        first = params.get("first_step", space.first_steps[0])
        t_start = float(params.get("t_start", ts.t_start[0]))
        t_end = float(params.get("t_end", ts.t_end[0]))
        n = self.ops.n_steps(first)
        weights = np.array([float(params[f"w{k}"]) for k in range(n)])
        lam0 = float(self.ops.noise.lambda_(t_start))
        lam_end = self.ops.lambda_max if t_end == 0 else float(self.ops.noise.lambda_(t_end))
        lams = lam0 + np.concatenate([[0.0], np.cumsum(weights) / weights.sum()]) * (lam_end - lam0)
        times = self.ops.times_from_lambdas(lams, t_start, t_end)
        steps = []
        for i in range(n):
            if space.fixed_solver:
                steps.append(Step())
                continue
            order = int(params.get(f"order_{i}", 1))
            scaling = params.get(f"scaling_{i}", "none")
            points = [tuple(range(1, order)) for _ in range(order - 1)]
            if params.get(f"derivatives_{i}") == "low" and order >= 3:
                points[0] = (1,)
            steps.append(
                Step(
                    prediction=params.get(f"prediction_{i}", space.predictions[0]),
                    order=order,
                    derivative_points=tuple(points),
                    scaling=scaling,
                    linear_coefficient=float(params.get(f"coefficient_{i}", 0.0)) if scaling == "linear" else 0.0,
                    corrector=params.get(f"corrector_{i}", "none"),
                )
            )
        return self.ops.repair(times, steps, first)

    def from_schedule(self, schedule: SolverSchedule) -> tuple[dict[str, Any], dict[str, BaseDistribution]]:
        """Params (and their distributions) describing `schedule`, for storing it as an Optuna trial.

        λ-step weights are the steps' λ lengths relative to the longest, clipped to the weight range;
        decisions outside the space's choices are stored as the nearest allowed choice."""
        space, ts = self.space, self.space.timesteps
        params: dict[str, Any] = {}
        if len(space.first_steps) > 1:
            params["first_step"] = schedule.first_step
        if len(ts.t_start) > 1:
            params["t_start"] = _nearest(ts.t_start, schedule.timesteps[0])
        if len(ts.t_end) > 1:
            params["t_end"] = _nearest(ts.t_end, schedule.timesteps[-1])
        lams = self.ops.lambdas(schedule.timesteps)  # a start at pure noise counts as the path's t_start
        if schedule.ends_at_zero:
            lams = np.append(lams, self.ops.lambda_max)
        gaps = np.diff(lams)
        weights = np.clip(gaps / gaps.max(), *WEIGHT_RANGE)
        for k, w in enumerate(weights):
            params[f"w{k}"] = float(w)
        if not space.fixed_solver:
            for i, step in enumerate(schedule.steps):
                params.update(self._step_params(i, step, schedule.n_steps))
        distributions = dict(self._distributions(params))
        return {k: params[k] for k in distributions}, distributions

    # --- internals ----------------------------------------------------------------------------

    def _distributions(self, params: dict[str, Any], trial: optuna.Trial | None = None):
        """(name, distribution) in define-by-run order; conditional names depend on earlier values."""
        space, ts = self.space, self.space.timesteps

        def value(name, distribution):
            if trial is not None and name not in params:
                params[name] = _suggest(trial, name, distribution)
            return params[name]

        if len(space.first_steps) > 1:
            d = CategoricalDistribution(list(space.first_steps))
            value("first_step", d)
            yield "first_step", d
        if len(ts.t_start) > 1:
            d = CategoricalDistribution(list(ts.t_start))
            value("t_start", d)
            yield "t_start", d
        if len(ts.t_end) > 1:
            d = CategoricalDistribution(list(ts.t_end))
            value("t_end", d)
            yield "t_end", d
        n = self.ops.n_steps(params.get("first_step", space.first_steps[0]))
        for k in range(n):
            d = FloatDistribution(*WEIGHT_RANGE, log=True)
            value(f"w{k}", d)
            yield f"w{k}", d
        if space.fixed_solver:
            return
        for i in range(n):
            for name, choices in self._step_choices(i, n):
                d = CategoricalDistribution(list(choices))
                chosen = value(name, d)
                yield name, d
                if name.startswith("scaling_") and chosen == "linear":
                    d = FloatDistribution(*space.linear_range)
                    value(f"coefficient_{i}", d)
                    yield f"coefficient_{i}", d

    def _step_choices(self, i: int, n: int):
        space = self.space
        yield f"prediction_{i}", space.predictions
        orders = [k for k in space.orders if k <= i + 1]
        if len(orders) > 1:
            yield f"order_{i}", orders
        if len(space.derivatives) > 1 and i >= 2 and max(orders) >= 3:
            yield f"derivatives_{i}", space.derivatives
        yield f"scaling_{i}", space.scalings
        if i < n - 1 and len(space.correctors) > 1:
            yield f"corrector_{i}", space.correctors

    def _step_params(self, i: int, step: Step, n: int) -> dict[str, Any]:
        space = self.space
        params: dict[str, Any] = {
            f"prediction_{i}": step.prediction if step.prediction in space.predictions else space.predictions[0],
            f"order_{i}": _nearest([k for k in space.orders if k <= i + 1], step.order),
            f"derivatives_{i}": "low"
            if step.order >= 3 and len(step.derivative_points[0]) < step.order - 1
            else "full",
            f"scaling_{i}": step.scaling if step.scaling in space.scalings else space.scalings[0],
            f"corrector_{i}": step.corrector if step.corrector in space.correctors else space.correctors[0],
        }
        if params[f"derivatives_{i}"] not in space.derivatives:
            params[f"derivatives_{i}"] = space.derivatives[0]
        if params[f"scaling_{i}"] == "linear":
            low, high = space.linear_range
            params[f"coefficient_{i}"] = float(np.clip(step.linear_coefficient, low, high))
        return params


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)


def _nearest(options, value):
    return min(options, key=lambda o: abs(float(o) - float(value)))
