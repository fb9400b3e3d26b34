"""The `solversearch` command line.

Every error a user can cause is a `SolversearchError`: it is printed as one line and the command exits
with status 2, having written nothing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import SolversearchError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SolversearchError as exc:
        print(f"solversearch: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("solversearch: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solversearch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    p = commands.add_parser("presets", help="list the solver presets, or export one as a schedule JSON")
    p.add_argument("name", nargs="?", help="a preset to show or export")
    p.add_argument("--nfe", type=_positive_int, default=10)
    p.add_argument("--grid", default="logsnr", help="time grid (default: logsnr)")
    p.add_argument("--model", default="gmm:digits", help="model whose noise schedule the grid uses")
    p.add_argument("--out", help="write the schedule JSON here")
    p.set_defaults(run=_cmd_presets)

    p = commands.add_parser("baselines", help="rank every preset × grid on a model at the given NFEs")
    p.add_argument("--model", default="gmm:digits")
    p.add_argument("--nfe", type=_int_list, default=[4, 6, 10], help="comma-separated, e.g. 4,5,6,8,10")
    p.add_argument("--n", type=_positive_int, default=256, help="samples (same x_T for every solver)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=_positive_int, default=10, help="rows shown per NFE")
    p.set_defaults(run=_cmd_baselines)
    return parser


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
    noise = load_model(args.model).noise_schedule
    schedule = presets.build(args.name, noise, args.nfe, args.grid)
    if args.out:
        schedule.save(args.out)
        console.print(f"wrote {args.out}")
    else:
        console.print(f"{schedule.name}: NFE {schedule.nfe}")
        for line in describe(schedule):
            console.print(line, markup=False, highlight=False)
    return 0


def _cmd_baselines(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from . import presets
    from .baselines import run_baselines
    from .grids import GRIDS
    from .models.spec import load_model

    console = Console()
    model = load_model(args.model)
    total = len(args.nfe) * len(GRIDS) * len(presets.PRESETS)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluating presets", total=total)
        rows = run_baselines(model, args.nfe, n=args.n, seed=args.seed, on_row=lambda _: progress.advance(task))
    for nfe in args.nfe:
        table = Table("rank", "solver", "grid", "error to reference", title=f"NFE {nfe} — {args.model}, n={args.n}")
        ranked = sorted((r for r in rows if r.nfe == nfe), key=lambda r: r.error_to_reference)
        for rank, row in enumerate(ranked[: args.top], start=1):
            table.add_row(str(rank), row.solver, row.grid, f"{row.error_to_reference:.4f}")
        console.print(table)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    sys.exit(main())
