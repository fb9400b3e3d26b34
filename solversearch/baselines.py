"""Every hand-designed solver side by side: presets × grids × NFEs on one model, noise and metric.

`run_baselines` evaluates; `write_report` writes baselines.json (one row per evaluation), a PNG of the
metric against NFE (the best grid of each solver) and a PNG grid of samples of the best baseline at
each NFE.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import presets
from .errors import SolversearchError
from .evaluator import Evaluator
from .grids import grid_applies
from .noise import NoiseSchedule
from .outputs import atomic_output, write_text

DEFAULT_SOLVERS = (
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_heun",
    "dpmpp_3m",
    "unipc_2_bh1",
    "unipc_2_bh2",
    "unipc_3_bh2",
    "deis_3",
)
DEFAULT_GRIDS = ("logsnr", "time_uniform", "time_quadratic", "karras", "trailing", "shifted", "flow_sigmas", "edm")


@dataclass(frozen=True)
class BaselineRow:
    solver: str
    grid: str
    nfe: int
    fid: float
    kid: float
    kid_std: float
    error_to_reference: float | None
    diverged: bool
    seconds: float
    teacher_distance: float | None = None

    def to_dict(self) -> dict:
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


def choose(names: Sequence[str] | None, default: Sequence[str], known: Iterable[str], what: str) -> list[str]:
    """Resolve a --solvers/--grids selection: None → default, ["all"] → every known name."""
    known = list(known)
    if not names:
        return list(default)
    if list(names) == ["all"]:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SolversearchError(f"unknown {what} {unknown}; expected some of {known}")
    return list(names)


def applicable_grids(grids: Sequence[str], noise: NoiseSchedule) -> list[str]:
    """The grids that exist on `noise`: the schedulers' own grids only on their family of paths."""
    return [g for g in grids if grid_applies(g, noise)]


def run_baselines(
    evaluator: Evaluator,
    nfes: Iterable[int],
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    grids: Sequence[str] = DEFAULT_GRIDS,
    on_row: Callable[[BaselineRow], None] | None = None,
) -> list[BaselineRow]:
    """Evaluate each solver × grid at each NFE with the evaluator's common random numbers."""
    noise = evaluator.model.noise_schedule
    rows = []
    for nfe in nfes:
        for grid in applicable_grids(grids, noise):
            for solver in solvers:
                result = evaluator.evaluate(presets.build(solver, noise, nfe, grid))
                row = BaselineRow(
                    solver,
                    grid,
                    nfe,
                    result.fid,
                    result.kid,
                    result.kid_std,
                    result.error_to_reference,
                    result.diverged,
                    result.seconds,
                    result.teacher_distance,
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


def best_by(rows: Iterable[BaselineRow], key: Callable[[BaselineRow], object]) -> dict[object, BaselineRow]:
    """The lowest-FID row for each value of `key`."""
    best: dict[object, BaselineRow] = {}
    for row in rows:
        k = key(row)
        if k not in best or row.fid < best[k].fid:
            best[k] = row
    return best


def write_report(rows: list[BaselineRow], evaluator: Evaluator, out: Path, samples_per_row: int = 16) -> list[Path]:
    """baselines.json, metric_vs_nfe.png and samples.png in `out` (created if needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "baselines.json"
    write_text(path, json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    per_solver = best_by(rows, lambda r: (r.solver, r.nfe))
    for solver in dict.fromkeys(r.solver for r in rows):
        points = sorted(
            (nfe, row.fid) for (s, nfe), row in per_solver.items() if s == solver and math.isfinite(row.fid)
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=solver)
    ax.set_xlabel("NFE")
    ax.set_ylabel("proxy FID (best grid)")
    ax.set_yscale("log")
    ax.set_title(evaluator.model.spec)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "metric_vs_nfe.png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    written.append(path)

    best = best_by(rows, lambda r: r.nfe)
    grid_rows = []
    for nfe in sorted(best):
        row = best[nfe]
        schedule = presets.build(row.solver, evaluator.model.noise_schedule, row.nfe, row.grid)
        grid_rows.append(evaluator.sample(schedule)[:samples_per_row])
    labels = [f"NFE {nfe}: {best[nfe].solver}/{best[nfe].grid}" for nfe in sorted(best)]
    path = out / "samples.png"
    save_sample_grid(grid_rows, labels, path)
    written.append(path)
    return written


def save_sample_grid(rows: list[torch.Tensor], labels: list[str], path: Path, cell: int = 48) -> None:
    """One labelled row of images per tensor (images in [−1, 1], shape (k, c, h, w)), as a PNG mosaic."""
    from PIL import Image, ImageDraw

    k = max(r.shape[0] for r in rows)
    label_height, pad = 14, 2
    width = k * (cell + pad) + pad
    height = len(rows) * (cell + label_height + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (images, label) in enumerate(zip(rows, labels)):
        top = pad + i * (cell + label_height + pad)
        draw.text((pad, top), label, fill="black")
        for j in range(images.shape[0]):
            pixels = ((images[j].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            mode = "L" if pixels.shape[-1] == 1 else "RGB"
            tile = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).resize(
                (cell, cell), Image.NEAREST
            )
            canvas.paste(tile.convert("RGB"), (pad + j * (cell + pad), top + label_height))
    with atomic_output(path) as tmp:
        canvas.save(tmp)
