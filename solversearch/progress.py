"""Progress of a search for the command line: a live panel on a terminal, one plain line per step in a
log or a pipe — the reference and teacher builds, each finished stage (evaluations, best, elapsed,
ETA) and each validation seed. It renders the update dicts `run_search` emits and nothing else.
"""

from __future__ import annotations

import math
import time
from typing import Any, Self

from rich.console import Console
from rich.live import Live
from rich.table import Table


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SearchProgress:
    """Call with each update; use as a context manager (the live panel needs closing)."""

    def __init__(self, console: Console, title: str, metric: str):
        self.console, self.title, self.metric = console, title, metric
        self.started = time.perf_counter()
        self.status: dict[str, Any] = {}
        self.live = (
            Live(self._panel(), console=console, refresh_per_second=2, transient=True) if console.is_terminal else None
        )
        self._last_line: tuple | None = None
        self._build_started: dict[str, float] = {}

    def __enter__(self) -> Self:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self, update: dict[str, Any]) -> None:
        previous, self.status = self.status, {**self.status, **update}
        if self.live is not None:
            self.live.update(self._panel())
            return
        for line in self._lines(previous, update):
            self.console.print(
                f"[{duration(time.perf_counter() - self.started):>7}] {line}", markup=False, highlight=False
            )
            self.console.file.flush()  # a log file or pipe is block-buffered: show each line as it happens

    # --- plain lines (logs, pipes) ----------------------------------------------------------------

    def _lines(self, previous: dict[str, Any], update: dict[str, Any]) -> list[str]:
        lines = []
        searching = ("baselines", "search")
        was, now = previous.get("phase"), update.get("phase")
        if was in searching and (now != was or previous.get("stage") != update.get("stage")):
            lines.append(self._stage_line(previous))  # a stage (or the pool) has finished
        if now in ("prepare", "report"):
            line = self._build_line(update)
            lines += [line] if line else []
        elif now in searching and update.get("total") is not None:
            if update["recorded"] >= update["total"]:
                lines.append(self._stage_line(update))
                self.status = {}  # printed: the next phase must not print it again
            elif int(4 * update["recorded"] / update["total"]) > int(4 * previous.get("recorded", 0) / update["total"]):
                lines.append(self._stage_line(update, done=False))  # a long stage: a line per quarter of the phase
        return lines

    def _build_line(self, update: dict[str, Any]) -> str | None:
        """Start, every quarter and the end of each build, with an estimate from its own rate."""
        what, done, total = update["what"], update["done"], max(1, update["total"])
        started = self._build_started.setdefault(what, time.perf_counter())
        quarter = int(4 * done / total)
        key = (what, quarter)
        if key == self._last_line:
            return None
        self._last_line = key
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (total - done) if done else math.inf
        return f"{what}: {done}/{total}" + ("" if done >= total else f", ETA {duration(eta)}")

    def _stage_line(self, status: dict[str, Any], done: bool = True) -> str:
        recorded, total, elapsed = status["recorded"], status.get("total"), status.get("elapsed", 0.0)
        eta = elapsed / recorded * (total - recorded) if recorded and total else math.inf
        name = "baseline pool" if status["phase"] == "baselines" else f"search stage {status.get('stage', 0)}"
        best = status.get("best", math.inf)
        parts = [
            f"{name}{' done' if done else ''}: {recorded}/{total if total is not None else '?'} evaluations",
            f"best {self.metric} {best:.4f}" if math.isfinite(best) else f"best {self.metric} –",
            f"elapsed {duration(elapsed)}",
        ]
        if total is not None and recorded < total:
            parts.append(f"ETA ≤ {duration(eta)}")
        taus = status.get("tau") or {}
        if taus:
            stage = max(taus)  # the held-out τ of the predictor that planned the latest stage
            parts.append(f"predictor τ {taus[stage]:.2f} (stage {stage})")
        return " · ".join(parts)

    # --- the live panel (terminals) ---------------------------------------------------------------

    def _panel(self) -> Table:
        s = self.status
        table = Table(show_header=False, title=self.title)
        table.add_row("elapsed", duration(time.perf_counter() - self.started))
        phase = s.get("phase")
        if phase in ("prepare", "report"):
            table.add_row(s["what"], f"{s['done']} / {s['total']}")
        elif phase in ("baselines", "search"):
            table.add_row("phase", "baseline pool" if phase == "baselines" else f"search, stage {s.get('stage', 0)}")
            table.add_row("evaluations (this phase)", f"{s['recorded']} / ≤{s.get('total')}")
            best = s.get("best", math.inf)
            table.add_row(f"best {self.metric}", f"{best:.4f}" if math.isfinite(best) else "–")
            if s.get("tau"):
                table.add_row("predictor τ per stage", ", ".join(f"{k}: {v:.2f}" for k, v in sorted(s["tau"].items())))
        return table
