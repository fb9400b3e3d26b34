"""Hypothesis strategies for valid solver schedules."""

from __future__ import annotations

import itertools

from hypothesis import strategies as st

from solversearch import SolverSchedule, Step

finite = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False, allow_infinity=False)


@st.composite
def steps(draw, i: int, last: bool, to_zero: bool, with_skip: bool) -> Step:
    order = 1 if to_zero else draw(st.integers(1, min(4, i + 1)))
    points = []
    for n in range(1, order):
        chosen = draw(st.sets(st.integers(1, i), min_size=n, max_size=i))
        points.append(tuple(sorted(chosen)))
    scaling = draw(st.sampled_from(["none", "bh1", "bh2", "linear"]))
    return Step(
        prediction=draw(st.sampled_from(["noise", "data"])),
        order=order,
        derivative_points=tuple(points),
        scaling=scaling,
        linear_coefficient=draw(finite) if scaling == "linear" else 0.0,
        second_derivative_factor=draw(st.sampled_from([1.0, 0.5])) if order >= 3 else 1.0,
        corrector="none" if last else draw(st.sampled_from(["none", "unic"])),
        skip=tuple(draw(st.lists(st.sampled_from(["down.0", "mid.attn", "up.1"]), unique=True))) if with_skip else (),
    )


@st.composite
def schedules(draw, max_steps: int = 8, with_skip: bool = True, allow_zero_end: bool = True, min_gap: float = 1e-4):
    """Valid schedules; times closer than `min_gap` are replaced by a uniform grid (λ must separate them)."""
    n = draw(st.integers(1, max_steps))
    times = draw(
        st.lists(st.floats(min_value=1e-3, max_value=1.0, allow_nan=False), min_size=n + 1, max_size=n + 1, unique=True)
    )
    times = sorted(times, reverse=True)
    if min_gap and any(a - b < min_gap for a, b in itertools.pairwise(times)):
        times = [1.0 - k * (1.0 - 1e-3) / n for k in range(n + 1)]
    if allow_zero_end and draw(st.booleans()):
        times[-1] = 0.0
    to_zero = times[-1] == 0.0
    step_list = [draw(steps(i, i == n - 1, to_zero and i == n - 1, with_skip)) for i in range(n)]
    return SolverSchedule(
        timesteps=tuple(times),
        steps=tuple(step_list),
        first_step=draw(st.sampled_from(["model", "analytic"])),
        name=draw(st.text(max_size=12)),
        metrics=draw(st.dictionaries(st.sampled_from(["fid", "kid"]), finite, max_size=2)),
    )
