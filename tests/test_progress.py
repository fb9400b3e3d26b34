"""Progress in a log or a pipe: one plain line per build quarter, per finished stage, per validation seed."""

from __future__ import annotations

import io

from rich.console import Console

from solversearch.progress import SearchProgress, duration


def lines_for(updates: list[dict]) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with SearchProgress(console, "study", "teacher_distance") as progress:
        for update in updates:
            progress(update)
    return [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]


def search(recorded: int, stage: int, total: int = 12, phase: str = "search", best: float = 0.5) -> dict:
    return {
        "phase": phase,
        "recorded": recorded,
        "total": total,
        "best": best,
        "stage": stage,
        "tau": {},
        "elapsed": 2.0 * recorded,
    }


def test_builds_report_their_start_quarters_and_end_with_an_estimate():
    updates = [{"phase": "prepare", "what": "teacher", "done": done, "total": 1000} for done in range(0, 1001, 100)]
    lines = lines_for(updates)
    assert lines[0] == "teacher: 0/1000, ETA ?"
    assert [line.split(",")[0] for line in lines] == [
        "teacher: 0/1000",
        "teacher: 300/1000",
        "teacher: 500/1000",
        "teacher: 800/1000",
        "teacher: 1000/1000",
    ]
    assert "ETA" not in lines[-1]


def test_a_line_per_finished_stage_with_best_elapsed_and_eta():
    updates = [search(1, 0), search(2, 0), search(3, 1, best=0.4), search(4, 1, best=0.3), search(5, 2, best=0.3)]
    lines = lines_for(updates)
    assert lines[0].startswith("search stage 0 done: 2/12 evaluations · best teacher_distance 0.5000 · elapsed 4s")
    assert "ETA ≤ 20s" in lines[0]  # 2 s per evaluation, 10 to go
    assert lines[-1].startswith("search stage 1 done: 4/12 evaluations · best teacher_distance 0.3000")


def test_the_end_of_a_phase_is_printed_once_even_if_its_stage_never_changes():
    updates = [search(k, 0, total=8, phase="baselines") for k in range(1, 9)] + [search(1, 1)]
    lines = lines_for(updates)
    finished = [line for line in lines if line.startswith("baseline pool done: 8/8")]
    assert len(finished) == 1 and not any(line.startswith("search stage") for line in lines)
    assert any(line.startswith("baseline pool: 2/8") for line in lines)  # a long stage reports its quarters


def test_durations_read_as_clock_time():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
