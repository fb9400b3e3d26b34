"""The `solversearch` command line.

Every error a user can cause is a `SolversearchError`: it is printed as one line and the command exits
with status 2, having written nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .errors import SearchInterrupted, SolversearchError
from .exports import EXPORT_FORMATS, EXPORT_KINDS
from .outputs import atomic_output, output_file, output_folder, write_text

EXIT_USER_ERROR = 2
METRIC_LABELS = {
    "fid": "FID",
    "kid": "KID",
    "teacher_distance": "teacher\ndistance",
    "error_to_reference": "teacher\nRMSE px",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except SolversearchError as exc:
        print(f"solversearch: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SearchInterrupted as stop:
        kept = "" if stop.kept is None else f": {stop.kept} evaluations kept"
        print(f"solversearch: interrupted{kept} — run the same command again to resume", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("solversearch: interrupted", file=sys.stderr)
        return 130


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job (`command_parsers` gives each one's own parser)."""
    return _parsers()[0]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, by name (the docker tests hold the documented commands against them)."""
    return dict(_parsers()[1])


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="solversearch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("presets", help="list the solver presets, or export one as a schedule JSON")
    p.add_argument("name", nargs="?", help="a preset to show or export")
    p.add_argument("--nfe", type=_positive_int, default=10)
    p.add_argument("--grid", default="logsnr", help="time grid (default: logsnr)")
    p.add_argument("--model", default="gmm:digits", help="model whose noise schedule the grid uses")
    p.add_argument("--out", help="write the schedule JSON here")
    p.set_defaults(run=_cmd_presets)

    p = commands.add_parser("baselines", help="rank every solver preset × grid on a model at the given NFEs")
    _model_options(p)
    p.add_argument("--nfe", type=_int_list, default=[4, 5, 6, 8, 10], help="comma-separated, e.g. 4,5,6,8,10")
    p.add_argument(
        "--solvers", type=_name_list, help="comma-separated presets, or 'all' (default: a representative set)"
    )
    p.add_argument("--grids", type=_name_list, help="comma-separated grids, or 'all' (default: a representative set)")
    p.add_argument("--out", default="baselines", help="directory for baselines.json and the PNGs")
    p.add_argument("--top", type=_positive_int, default=10, help="rows shown per NFE")
    p.set_defaults(run=_cmd_baselines)

    p = commands.add_parser("evaluate", help="score one schedule JSON on a model")
    _model_options(p)
    p.add_argument("--schedule", required=True, help="schedule JSON file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_cmd_evaluate)
    p = commands.add_parser(
        "check", help="is a schedule searched on another checkpoint still as good as this model's best baseline?"
    )
    p.add_argument(
        "--model", default="bundled:digits", help="bundled:digits, gmm:digits or a diffusers model directory"
    )
    p.add_argument(
        "--schedule", required=True, help="schedule JSON file, searched on another checkpoint of the same family"
    )
    p.add_argument(
        "--metric",
        choices=["teacher_distance", "fid", "kid", "error_to_reference"],
        default="teacher_distance",
        help="the objective the verdict judges (default: teacher_distance)",
    )
    p.add_argument("--n", type=_positive_int, default=500, help="samples per seed (default 500)")
    p.add_argument("--seeds", type=_positive_int, default=5, help="validation seeds K (default 5)")
    p.add_argument("--validation-seed", type=_non_negative_int, default=1, help="the first validation seed (default 1)")
    p.add_argument(
        "--selection-seed",
        type=_non_negative_int,
        default=1000,
        help="the seed the best baseline is picked on (default 1000, a search's selection seed)",
    )
    p.add_argument(
        "--solvers", type=_name_list, help="comma-separated presets the baseline is chosen from (default: all)"
    )
    p.add_argument(
        "--grids", type=_name_list, help="comma-separated grids (default: all that exist on the model's path)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument("--mixed-precision", action="store_true", help="autocast the network on CUDA")
    p.add_argument(
        "--features", choices=["identity", "digits", "inception"], help="proxy-FID features (default: the model's)"
    )
    p.add_argument("--inception", help="local TorchScript Inception file for --features inception")
    p.add_argument("--reference", help="what FID/KID compare with (as for evaluate)")
    p.add_argument("--reference-n", type=_positive_int, help="samples of the model's own reference (default: --n)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(run=_cmd_check)
    p = commands.add_parser("sample", help="draw samples with a schedule JSON and save them as a PNG grid")
    p.add_argument(
        "--model",
        default="bundled:digits",
        help="bundled:digits, bundled:digits-flow, gmm:digits or a diffusers model directory",
    )
    p.add_argument("--schedule", required=True, help="schedule JSON file")
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument("--out", default="samples.png", help="PNG grid")
    p.add_argument("--npz", help="also write the raw samples (float32, model data range) to this .npz")
    p.add_argument("--strict", action="store_true", help="a schedule searched on another model is an error")
    p.set_defaults(run=_cmd_sample)

    p = commands.add_parser("refine", help="learn a schedule's times (and step factors) against the converged solution")
    p.add_argument(
        "--model",
        default="bundled:digits",
        help="bundled:digits, bundled:digits-flow, gmm:digits or a diffusers model directory",
    )
    p.add_argument(
        "--schedule",
        required=True,
        help="a schedule JSON file, PRESET[/GRID] (e.g. dpmpp_2m/logsnr) with --nfe, or STUDY[:RANK] with --storage",
    )
    p.add_argument("--storage", help="SQLAlchemy URL of the study named by --schedule STUDY[:RANK]")
    p.add_argument("--nfe", type=_positive_int, default=5, help="NFE of a preset schedule (default 5)")
    p.add_argument("--out", required=True, help="the refined schedule JSON")
    p.add_argument("--n", type=_positive_int, default=64, help="training samples (x_T from a seed no search uses)")
    p.add_argument("--heldout-n", type=_positive_int, default=64, help="held-out samples for early stopping")
    p.add_argument("--iterations", type=_positive_int, default=60)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument(
        "--patience",
        type=_positive_int,
        default=8,
        help="stop after this many steps in a row without a held-out gain (each is undone and the learning rate halved)",
    )
    p.add_argument("--no-factors", action="store_true", help="learn the times only, not the first-derivative factors")
    p.add_argument(
        "--features", choices=["identity", "digits"], help="feature space of the loss (default: the model's)"
    )
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, …")
    p.set_defaults(run=_cmd_refine)

    p = commands.add_parser("search", help="search the best solver schedule for an experiment")
    p.add_argument("experiment", help="experiment YAML, e.g. experiments/digits.yaml")
    p.add_argument("--nfe", type=_positive_int, help="NFE budget (overrides the experiment)")
    p.add_argument("--budget", type=_positive_int, help="true evaluations in all (resuming counts stored ones)")
    p.add_argument("--algorithm", help="the search algorithm (overrides the experiment's), e.g. s3, evolution or tpe")
    p.add_argument("--storage", help="SQLAlchemy URL of the Optuna storage (default: sqlite:///solversearch.db)")
    p.add_argument("--study", help="study name (default: <experiment>-nfe<N>)")
    p.add_argument("--address", help="an existing Ray cluster: auto or HOST:PORT")
    p.add_argument("--no-validation", action="store_true", help="skip re-evaluating the winner on fresh noise")
    p.add_argument("--out", default=".", help="directory for <study>.json")
    p.set_defaults(run=_cmd_search)

    p = commands.add_parser("studies", help="list the studies in a storage")
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///solversearch.db)")
    p.set_defaults(run=_cmd_studies)

    p = commands.add_parser("show", help="top schedules, baselines, predictor τ and search cost of a study")
    p.add_argument("study")
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///solversearch.db)")
    p.add_argument("--top", type=_positive_int, default=5)
    p.set_defaults(run=_cmd_show)

    p = commands.add_parser("export", help="export a stored schedule as JSON")
    p.add_argument("study")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument(
        "--rank",
        type=_positive_int,
        help="the K-th best on the search seed (default: the search's winner, picked on the selection seed; "
        "rank 1 if the study has no validation)",
    )
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="solversearch",
        help="solversearch: the whole schedule; diffusers: its times for a diffusers scheduler; comfyui: "
        "a custom-sigmas list (with the final 0)",
    )
    p.add_argument(
        "--diffusers-kind",
        choices=EXPORT_KINDS,
        help="with --format diffusers: integer timesteps (VP models, the default there) or sigmas in the "
        "units of the model's scheduler (the default, and the only kind, for flow and EDM models)",
    )
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///solversearch.db)")
    p.set_defaults(run=_cmd_export)
    return parser, commands.choices


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="bundled:digits",
        help="bundled:digits, bundled:digits-flow, gmm:digits or a diffusers model directory",
    )
    p.add_argument("--n", type=_positive_int, default=500, help="samples (the same x_T for every schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument("--mixed-precision", action="store_true", help="autocast the network on CUDA")
    p.add_argument(
        "--features", choices=["identity", "digits", "inception"], help="proxy-FID features (default: the model's)"
    )
    p.add_argument("--inception", help="local TorchScript Inception file for --features inception")
    p.add_argument("--no-error-to-reference", action="store_true", help="skip the high-accuracy reference solution")
    p.add_argument(
        "--reference",
        help="what FID/KID compare with: 'data', 'model', an image folder, an .npz of images, "
        "or pytorch-fid / clean-fid statistics (.npz with mu, sigma); default: the model's data, else 'model'",
    )
    p.add_argument("--reference-n", type=_positive_int, help="samples of the model's own reference (default: --n)")


def _evaluation_settings(args: argparse.Namespace, **chosen_elsewhere: Any):
    """EvaluationSettings from the evaluation options every scoring command shares (`_model_options`);
    a command that sets a field its own way passes it."""
    from .evaluator import EvaluationSettings

    return EvaluationSettings(
        n=args.n,
        batch_size=args.batch_size,
        device=args.device,
        mixed_precision=args.mixed_precision,
        features=args.features,
        inception_path=args.inception,
        reference=args.reference,
        reference_n=args.reference_n,
        **chosen_elsewhere,
    )


def _evaluator(args: argparse.Namespace):
    from .evaluator import Evaluator
    from .models.spec import load_model

    settings = _evaluation_settings(args, seed=args.seed, error_to_reference=not args.no_error_to_reference)
    return Evaluator(load_model(args.model, args.device), settings)


def _cmd_presets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import presets
    from .models.spec import load_model
    from .schedule import describe

    console = Console()
    if args.name is None:
        table = Table("preset", "description")
        for preset in presets.PRESETS.values():
            table.add_row(preset.name, preset.description)
        console.print(table)
        return 0
    out = output_file(args.out) if args.out else None
    noise = load_model(args.model).noise_schedule
    schedule = presets.build(args.name, noise, args.nfe, args.grid)
    if out:
        schedule.save(out)
        console.print(f"wrote {args.out}")
    else:
        console.print(f"{schedule.name}: NFE {schedule.nfe}")
        for line in describe(schedule):
            console.print(line, markup=False, highlight=False)
    return 0


def _cmd_baselines(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from . import presets
    from .baselines import DEFAULT_GRIDS, DEFAULT_SOLVERS, applicable_grids, choose, run_baselines, write_report
    from .grids import GRIDS

    output_folder(args.out)
    console = Console()
    solvers = choose(args.solvers, DEFAULT_SOLVERS, presets.PRESETS, "solver presets")
    grids = choose(args.grids, DEFAULT_GRIDS, GRIDS, "grids")
    evaluator = _evaluator(args)
    grids = applicable_grids(grids, evaluator.model.noise_schedule)
    total = len(args.nfe) * len(grids) * len(solvers)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task("reference statistics and teacher", total=None)
        evaluator.prepare()  # the teacher: one solve from the common x_T that every row is compared with
        task = progress.add_task("evaluating presets", total=total)

        def advance(row):
            progress.update(task, advance=1, description=f"NFE {row.nfe} {row.grid} {row.solver}")

        rows = run_baselines(evaluator, args.nfe, solvers, grids, on_row=advance)
    for nfe in args.nfe:
        table = Table(
            "rank",
            "solver",
            "grid",
            "FID",
            "KID×1e3",
            "teacher distance",
            "teacher RMSE px",
            title=f"NFE {nfe} — {args.model}, n={args.n}",
        )
        ranked = sorted((r for r in rows if r.nfe == nfe), key=lambda r: r.fid)
        for rank, row in enumerate(ranked[: args.top], start=1):
            table.add_row(
                str(rank),
                row.solver,
                row.grid,
                _fmt(row.fid),
                _fmt(row.kid * 1e3, digits=3),
                _fmt(row.teacher_distance),
                _fmt(row.error_to_reference),
            )
        console.print(table)
    for path in write_report(rows, evaluator, Path(args.out)):
        console.print(f"wrote {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    import warnings

    from rich.console import Console
    from rich.table import Table

    from .inference import check_compatibility
    from .schedule import load_schedule

    schedule = load_schedule(args.schedule)
    evaluator = _evaluator(args)
    with warnings.catch_warnings(record=True) as caught:  # as `sample` does: another noise schedule is an error
        warnings.simplefilter("always")
        check_compatibility(schedule, evaluator.model)
    for warning in caught:
        print(f"solversearch: warning: {warning.message}", file=sys.stderr)
    result = evaluator.evaluate(schedule)
    if args.json:
        print(json.dumps({"schedule": schedule.name, "model": args.model, **result.to_dict()}, indent=2))
        return 0
    table = Table(
        "metric", "value", title=f"{schedule.name or args.schedule} on {args.model} (n={args.n}, seed={args.seed})"
    )
    for name, value in result.to_dict().items():
        if name != "extra":
            table.add_row(name, "inf (diverged)" if value is None and result.diverged else str(value))
    Console().print(table)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import presets
    from .baselines import choose
    from .check import CheckSettings, check_schedule, compatibility_notes
    from .grids import GRIDS
    from .models.spec import load_model
    from .schedule import load_schedule

    out = output_file(args.json, "--json", suffixes=(".json",)) if args.json else None
    settings = CheckSettings(
        metric=args.metric,
        selection_seed=args.selection_seed,
        validation_seeds=tuple(range(args.validation_seed, args.validation_seed + args.seeds)),
        presets=tuple(choose(args.solvers, list(presets.PRESETS), presets.PRESETS, "solver presets")),
        grids=tuple(choose(args.grids, list(GRIDS), GRIDS, "grids")),
    )
    evaluation = _evaluation_settings(args)  # seeds: the check's own
    schedule = load_schedule(args.schedule)
    model = load_model(args.model, args.device)
    compatibility_notes(schedule, model)  # a schedule of another family is refused before the model is prepared
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # logs and pipes: keep the table readable
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total)
            progress.update(tasks[what], completed=done, total=total)

        result = check_schedule(model, schedule, settings, evaluation, on_progress=report)
    _print_check(console, args, result)
    if out is not None:
        write_text(
            out, json.dumps({"model": args.model, "schedule_file": args.schedule, **result.to_dict()}, indent=2) + "\n"
        )
        console.print(f"wrote {out}")
    return 0


def _print_check(console, args: argparse.Namespace, result) -> None:
    from rich.table import Table

    from .check import KEEP

    seeds = result.settings.validation_seeds
    label = METRIC_LABELS[result.settings.metric].replace("\n", " ")
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(
        f"best baseline: {result.baseline.name} ({label} "
        f"{_fmt(result.baseline_selection.metrics().get(result.settings.metric))} on selection seed "
        f"{result.settings.selection_seed}; the best of {result.candidates} presets × grids at NFE {result.schedule.nfe})",
        markup=False,
        highlight=False,
    )
    table = Table(
        "metric",
        "schedule",
        "best baseline",
        "floor",
        "difference (95% CI)",
        "verdict",
        title=f"{result.schedule.name or args.schedule} − best baseline on {args.model}, paired over "
        f"validation seeds {seeds[0]}–{seeds[-1]} (n={result.n})",
        caption=f"floor: the converged solution · FID/KID against {result.reference}",
    )
    for metric, difference in result.comparisons.items():
        table.add_row(
            METRIC_LABELS[metric].replace("\n", " "),
            _fmt(difference.mean_a),
            _fmt(difference.mean_b),
            _fmt(result.floor_mean(metric)),
            f"{_fmt(difference.mean, signed=True)} [{_fmt(difference.low, signed=True)}, "
            f"{_fmt(difference.high, signed=True)}]",
            difference.verdict,
        )
    console.print(table)
    objective = result.objective
    interval = (
        f"{_fmt(objective.mean, signed=True)} [{_fmt(objective.low, signed=True)}, {_fmt(objective.high, signed=True)}]"
    )
    if result.verdict == KEEP:
        how = "significantly better than" if result.significantly_better else "not significantly different from"
        line = f"verdict: keep — on {label} the schedule is {how} the best baseline ({interval})"
    else:
        line = (
            f"verdict: re-search (warm-start from it: algorithm.settings.warm_start: {args.schedule}) — on {label} "
            f"the schedule is significantly worse than the best baseline ({interval})"
        )
    console.print(line, markup=False, highlight=False)


def _cmd_sample(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    import numpy as np

    from .baselines import save_sample_grid
    from .inference import sample
    from .schedule import load_schedule

    out = output_file(args.out, suffixes=(".png",))
    npz = output_file(args.npz, "--npz", suffixes=(".npz",)) if args.npz else None
    schedule = load_schedule(args.schedule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = sample(args.model, schedule, n=args.n, seed=args.seed, device=args.device, strict=args.strict)
    for warning in caught:
        print(f"solversearch: warning: {warning.message}", file=sys.stderr)
    if not bool(images.isfinite().all()):
        raise SolversearchError(
            f"the schedule {schedule.name or args.schedule} diverged on this model (NaN/inf samples); nothing written"
        )
    per_row = 8
    rows = [images[i : i + per_row] for i in range(0, images.shape[0], per_row)]
    labels = [f"{schedule.name or Path(args.schedule).name}, seed {args.seed}"] + [""] * (len(rows) - 1)
    if npz:
        with atomic_output(npz) as tmp:
            np.savez(tmp, samples=images.numpy(), seed=np.array(args.seed))
    save_sample_grid(rows, labels, out)
    print(f"wrote {out}" + (f" and {args.npz}" if args.npz else ""))
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from .models.spec import load_model
    from .progress import duration
    from .refine import RefineSettings, refine
    from .schedule import describe

    out = output_file(args.out)
    settings = RefineSettings(
        n=args.n,
        heldout_n=args.heldout_n,
        iterations=args.iterations,
        learning_rate=args.learning_rate,
        patience=args.patience,
        learn_factors=not args.no_factors,
        features=args.features,
        device=args.device,
    )
    model = load_model(args.model, args.device)
    parent = _schedule_argument(args.schedule, model.noise_schedule, args.nfe, args.storage)

    def report(iteration: int, train: float, heldout: float) -> None:
        print(f"iteration {iteration:3d}: training {train:.5f} · held-out {heldout:.5f}", flush=True)

    result = refine(model, parent, settings, on_progress=report)
    first, best = result.heldout_losses[0], result.heldout_losses[result.best_iteration]
    if result.best_iteration == 0:
        print(
            f"no iterate beat {parent.name or args.schedule} on the held-out batch ({first:.5f}); it is written unchanged"
        )
    else:
        print(
            f"held-out teacher distance {first:.5f} → {best:.5f} ({100 * result.improvement:.1f} % lower, "
            f"iteration {result.best_iteration}) in {duration(result.seconds)}"
        )
    refined = result.schedule
    if not refined.name:  # an unnamed parent: name it after what the user gave
        refined = refined.with_metadata(name=f"{args.schedule}+refined")
    for line in describe(refined):
        print(line)
    refined.save(out)
    print(f"wrote {out}")
    return 0


def _schedule_argument(text: str, noise, nfe: int, storage: str | None = None):
    """A schedule JSON file, a stored trial (STUDY[:RANK] with a storage), or PRESET[/GRID] built on the
    model's noise schedule."""
    from pathlib import Path

    from . import presets
    from .schedule import load_schedule

    if Path(text).exists() or text.endswith(".json"):
        return load_schedule(text)
    if storage is not None:
        from .search.database import storage_url
        from .search.storage import open_existing

        study, _, rank = text.partition(":")
        rank_number = _positive_int(rank or "1")
        ranked = open_existing(storage_url(storage), study).best(k=rank_number)
        if len(ranked) < rank_number:
            raise SolversearchError(
                f"study {study!r} has only {len(ranked)} finished schedules; there is no rank {rank_number}"
            )
        return ranked[rank_number - 1].schedule
    name, _, grid = text.partition("/")
    if name not in presets.PRESETS:
        raise SolversearchError(
            f"--schedule: {text!r} is neither a schedule file nor a preset; presets: {sorted(presets.PRESETS)}"
        )
    return presets.build(name, noise, nfe, grid or "logsnr")


def _cmd_search(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .progress import SearchProgress
    from .search.experiment import load_experiment
    from .search.registry import check_algorithm
    from .search.runner import run_search

    experiment = load_experiment(args.experiment).override(
        nfe=args.nfe, budget=args.budget, algorithm=args.algorithm, storage_url=args.storage, study=args.study
    )
    check_algorithm(experiment.algorithm)
    out = output_folder(args.out)  # known good before the search: its winner is never lost to a bad --out
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # logs and pipes: keep the result table readable
    title = f"{experiment.study_name}: {experiment.algorithm}, NFE {experiment.nfe}"
    with SearchProgress(console, title, experiment.metric.name) as progress:
        outcome = run_search(
            experiment, address=args.address, on_update=progress, validate=not args.no_validation, export_dir=out
        )
    _print_outcome(console, experiment, outcome)
    return 0


def _print_outcome(console, experiment, outcome) -> None:
    from rich.table import Table

    from .schedule import describe
    from .search.report import REPORT_METRICS

    report = outcome.report
    metric = experiment.metric.name
    searched = outcome.evaluations - outcome.baseline_evaluations
    heading = (
        f"{outcome.study}: {outcome.evaluations} evaluations ({outcome.baseline_evaluations} baselines, "
        f"{searched} searched; {outcome.new_evaluations} new)"
    )
    names = METRIC_LABELS
    validated = bool(report.validation_seeds)
    seeds = report.validation_seeds
    caption = f"search: seed {experiment.metric.seed}, n={experiment.metric.n}" + (
        f" · selection: best of the top {experiment.validation_top} on seed {report.selection_seed}, n={report.n}"
        f" · validation: mean over seeds {seeds[0]}–{seeds[-1]}, n={report.n} · FID/KID against "
        f"{report.reference}"
        if validated
        else ""
    )
    table = Table(
        "",
        "schedule",
        "NFE",
        f"{metric}\nsearch",
        *([f"{metric}\nselection"] if validated else []),
        *([names[m] for m in REPORT_METRICS] if validated else []),
        "GMACs\n/sample",
        "ms\n/sample",
        title=heading,
        caption=caption,
    )
    for row in report.rows:
        ms = "–" if not row.validation else f"{1000.0 / row.validation[0].samples_per_second:.2f}"
        macs = row.stored.cost.get("macs")
        cells = [
            row.label,
            row.stored.schedule.name,
            str(row.stored.schedule.nfe),
            _fmt(row.stored.metrics.get(metric)),
        ]
        if validated:
            cells.append(_fmt(row.selection.metrics().get(metric)))
            cells += [_fmt(row.mean(m)) for m in REPORT_METRICS]
        cells += ["–" if macs is None else f"{macs / 1e9:.3f}", ms]
        table.add_row(*cells)
    if report.floor:
        table.add_row(
            "converged (floor)",
            "teacher: UniPC-3 on a λ-uniform grid",
            str(report.floor[0].nfe),
            "–",
            "–",
            *[_fmt(report.floor_mean(m)) for m in REPORT_METRICS],
            "–",
            "–",
        )
    console.print(table)
    if report.comparisons:
        paired = Table(
            "metric",
            "searched",
            "best baseline",
            "floor",
            "difference (95% CI)",
            "verdict",
            "excess left",
            title=f"searched − best baseline, paired over {len(seeds)} validation seeds",
            caption="excess left = (searched − floor) / (baseline − floor); ≤ 0.5 removes half the baseline's excess",
        )
        for m, difference in report.comparisons.items():
            paired.add_row(
                names[m].replace("\n", " "),
                _fmt(difference.mean_a),
                _fmt(difference.mean_b),
                _fmt(report.floor_mean(m)),
                f"{_fmt(difference.mean, signed=True)} [{_fmt(difference.low, signed=True)}, "
                f"{_fmt(difference.high, signed=True)}]",
                difference.verdict,
                _fmt(report.excess_left(m), digits=2),
            )
        console.print(paired)
    if outcome.best is not None:
        for line in describe(outcome.best.schedule):
            console.print("  " + line, markup=False, highlight=False)
    if outcome.exported is not None:
        console.print(f"wrote {outcome.exported}")
    console.print(
        report_share(outcome.search_seconds, outcome.report_seconds, "this run"), markup=False, highlight=False
    )


def report_share(search_seconds: float, report_seconds: float, what: str = "all runs") -> str:
    """The cost line: the search's and the report's wall times and the report's share of the search (the
    report re-scores on fresh seeds at a larger n; it should stay a fraction of the search)."""
    from .progress import duration

    share = f" = {100 * report_seconds / search_seconds:.0f} % of the search" if search_seconds > 0 else ""
    return f"wall time ({what}): search {duration(search_seconds)}, report {duration(report_seconds)}{share}"


def _fmt(value, signed: bool = False, digits: int = 4) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:+.{digits}g}" if signed else f"{value:.{digits}g}"


def _cmd_studies(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .search.database import storage_url
    from .search.storage import list_studies

    table = Table("study", "trials", "best", "model", "nfe")
    for row in list_studies(storage_url(args.storage)):
        description = row.get("description") or {}
        best = row.get("best_value")
        table.add_row(
            row["name"],
            str(row["n_trials"]),
            "–" if best is None else f"{best:.4f}",
            str(description.get("model", "")),
            str(description.get("nfe", "")),
        )
    Console().print(table)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .search.database import storage_url
    from .search.report import ranked
    from .search.storage import open_existing

    console = Console()
    store = open_existing(storage_url(args.storage), args.study)
    history = store.history()
    description = store.description
    metric = description.get("metric", {}).get("name", "fid")
    searched, baselines = ranked(history, baselines=False), ranked(history, baselines=True)
    for title, rows in ((f"top {args.top} searched schedules", searched), (f"top {args.top} baselines", baselines)):
        table = Table("trial", "schedule", metric, "stage", "algorithm", title=title)
        for e in rows[: args.top]:
            table.add_row(str(e.number), e.schedule.name, f"{e.values[0]:.4f}", str(e.stage), e.algorithm)
        console.print(table)
    taus = store.get_attr("kendall_tau", {})
    if taus:
        console.print("predictor Kendall τ per stage: " + ", ".join(f"{k}: {v:.2f}" for k, v in taus.items()))
    sampling = sum(e.cost.get("sampling_seconds", 0.0) for e in history)
    scoring = sum(e.cost.get("metric_seconds", 0.0) for e in history)
    refining = sum(e.cost.get("refine_seconds", 0.0) for e in history)
    predictor = float(store.get_attr("predictor_seconds", 0.0))
    wall = float(store.get_attr("wall_seconds", 0.0))
    report = float(store.get_attr("report_seconds", 0.0))
    cost = Table(
        "search cost",
        "seconds",
        title=f"{args.study}: {len(history)} evaluations, {sum(e.diverged for e in history)} diverged",
    )
    lines = [("sampling (workers)", sampling), ("metric (workers)", scoring)]
    if refining:
        lines.append((f"refinement (workers, {sum(1 for e in history if e.refinement)} schedules)", refining))
    lines += [
        ("predictor training + screening", predictor),
        ("wall time: search (driver)", wall),
        ("wall time: report (selection + validation)", report),
    ]
    for name, seconds in lines:
        cost.add_row(name, f"{seconds:.1f}")
    console.print(cost)
    console.print(report_share(wall, report), markup=False, highlight=False)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json

    from .exports import export_comfyui, export_diffusers
    from .noise import noise_schedule_from_dict
    from .search.database import storage_url
    from .search.provenance import exported_schedule
    from .search.storage import open_existing

    if args.diffusers_kind is not None and args.format != "diffusers":
        raise SolversearchError(f"--diffusers-kind applies to --format diffusers, not --format {args.format}")
    out = output_file(args.out)
    store = open_existing(storage_url(args.storage), args.study)
    validation = store.get_attr("validation", {}) or {}
    searched = validation.get("rows", {}).get("searched", {})
    winner = [e for e in store.history() if e.number == searched.get("trial")] if args.rank is None else []
    if winner:  # what the search itself exported: the winner on the selection seed, not the best search-seed value
        chosen = winner[0]
    else:
        rank = args.rank or 1
        ranked = store.best(k=rank)
        if len(ranked) < rank:
            raise SolversearchError(
                f"study {args.study!r} has only {len(ranked)} finished schedules; cannot export rank {rank}"
            )
        chosen = ranked[rank - 1]
    # The search's own winner carries its paired comparison with the best baseline on fresh seeds.
    comparison = validation.get("comparison") if searched.get("trial") == chosen.number else None
    schedule = exported_schedule(
        chosen, args.study, store.description, rank=None if winner else args.rank or 1, comparison=comparison
    )
    if args.format == "solversearch":
        schedule.save(out)
    else:
        if schedule.noise_schedule is None:
            raise SolversearchError(
                f"the stored schedule has no noise schedule; cannot convert it to {args.format} times"
            )
        noise = noise_schedule_from_dict(schedule.noise_schedule)
        if args.format == "diffusers":
            doc = export_diffusers(schedule, noise, args.diffusers_kind)
            write_text(out, json.dumps(doc, indent=2) + "\n")
        else:  # a plain list, as ComfyUI's custom-sigmas inputs take it
            doc = export_comfyui(schedule, noise)
            write_text(out, json.dumps(doc["sigmas"]) + "\n")
        print(f"solversearch: {args.format} {'timesteps' if 'timesteps' in doc else 'sigmas'}: {doc['units']}")
        if doc["dropped"]:
            print(
                f"solversearch: warning: a list of times cannot carry {'; '.join(doc['dropped'])} — "
                "SearchedScheduler runs the whole schedule",
                file=sys.stderr,
            )
    print(f"wrote {out} (trial {chosen.number}, {chosen.schedule.name})")
    return 0


def _device(text: str) -> str:
    """A torch device this machine has: 'bogus' and 'cuda' on a CPU-only build are refused up front."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:1, …") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    elif device.type not in ("cpu", "mps") or (device.type == "mps" and not torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; use cpu or cuda")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
