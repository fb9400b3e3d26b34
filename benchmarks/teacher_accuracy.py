"""How converged is the teacher? Its samples against a much finer solve from the same x_T, and what the
difference does to the comparison a report makes.

1. Accuracy: for each of `--steps` the teacher (`teacher_schedule`: UniPC-3 on a λ-uniform grid) and
   the `--fine` solve on one seed at n — the pooled pixel RMS between them, the per-sample RMS
   quantiles, the share of the squared error carried by the 10 worst samples, and the solve's time.
2. Why it converges slowly: the network's output along t at fixed x (x from the fine solve, noised to
   t), as the RMS of second differences over first differences at spacings of ¼, 1 and 4 × 0.001 in t
   (0.001 is one training timestep of a 1000-step model). A function smooth on the scale of a solver
   step gives ratios far below 1 that shrink with the spacing; ratios near 1 mean the output varies
   from one training timestep to the next, which no step of a 50-step solve resolves.
3. The comparison: two schedules (with `--study`, its best searched schedule and best baseline as
   stored; otherwise `--schedules`, two presets) scored against each teacher and against the fine
   solve: their teacher distances and pixel distances, and the difference between the two.

    python benchmarks/teacher_accuracy.py
    python benchmarks/teacher_accuracy.py --storage sqlite:///solversearch.db --study digits-nfe5

The teachers go to the usual cache (SOLVERSEARCH_CACHE): a second run reads them.
"""

from __future__ import annotations

import argparse
import time

import torch

from solversearch.evaluator import TEACHER_STEPS, EvaluationSettings, Evaluator, teacher_schedule
from solversearch.metrics import error_to_reference
from solversearch.models.spec import load_model
from solversearch.presets import build

TIME_UNIT = 1e-3  # one training timestep of a 1000-step discrete model


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def accuracy_line(steps: int, teacher: torch.Tensor, fine: torch.Tensor, seconds: float) -> str:
    per = per_sample_rms(teacher, fine)
    median, q90, q99, worst = torch.quantile(per, torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)).tolist()
    squared = per.pow(2).sort(descending=True).values
    top10 = float(squared[:10].sum() / squared.sum()) if float(squared.sum()) > 0 else 0.0
    pooled = error_to_reference(teacher, fine)
    return (
        f"  {steps:4d} steps  {pooled:8.5f}  {median:8.5f} {q90:8.5f} {q99:8.5f} {worst:8.5f}  {top10:6.2f}"
        f"  {seconds:6.1f} s"
    )


def network_output(model, x: torch.Tensor, t: float) -> torch.Tensor:
    with torch.no_grad():
        return model.denoiser(x, torch.full((len(x),), t)).double()


def roughness(model, samples: torch.Tensor, centres: list[float], probes: int = 64) -> list[tuple[float, list[float]]]:
    """Per centre time: RMS(second difference) / RMS(first difference) of ε̂(x, t) at each spacing."""
    generator = torch.Generator().manual_seed(0)
    x0 = samples[:probes].double()
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    path = model.noise_schedule
    rows = []
    for centre in centres:
        alpha, sigma = float(path.alpha(centre)), float(path.sigma(centre))
        x = (alpha * x0 + sigma * noise).float()
        middle, ratios = network_output(model, x, centre), []
        for spacing in (0.25 * TIME_UNIT, TIME_UNIT, 4 * TIME_UNIT):
            before, after = network_output(model, x, centre - spacing), network_output(model, x, centre + spacing)
            first = (after - before).pow(2).mean().sqrt() / 2
            second = (after - 2 * middle + before).pow(2).mean().sqrt()
            ratios.append(float(second / first))
        rows.append((centre, ratios))
    return rows


def schedules_to_compare(args, model):
    if args.study:
        from solversearch.search import open_existing, storage_url
        from solversearch.search.report import ranked

        history = open_existing(storage_url(args.storage), args.study).history()
        searched, baseline = ranked(history, baselines=False), ranked(history, baselines=True)
        if not searched or not baseline:
            raise SystemExit(f"study {args.study!r} has no searched schedule or no baseline to compare")
        return ("searched", searched[0].schedule), ("best baseline", baseline[0].schedule)
    pairs = []
    for text in args.schedules.split(","):
        name, _, grid = text.partition("/")
        pairs.append((text, build(name, model.noise_schedule, args.nfe, grid or "logsnr")))
    return tuple(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:digits")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", default="25,35,50,100", help="teacher steps to measure")
    parser.add_argument("--fine", type=int, default=200, help="steps of the solve they are measured against")
    parser.add_argument("--storage", default="sqlite:///solversearch.db")
    parser.add_argument("--study", help="compare this study's best searched schedule and best baseline")
    parser.add_argument("--schedules", default="unipc_1_bh1_noise/leading,dpmpp_2m/logsnr")
    parser.add_argument("--nfe", type=int, default=5, help="NFE of --schedules")
    args = parser.parse_args()

    model = load_model(args.model)
    steps = sorted({int(s) for s in args.steps.split(",")} | {args.fine})
    evaluators, teachers, seconds = {}, {}, {}
    for count in steps:
        evaluators[count] = Evaluator(model, EvaluationSettings(n=args.n, seed=args.seed, reference_steps=count))
        started = time.perf_counter()
        teachers[count] = evaluators[count].teacher()
        seconds[count] = time.perf_counter() - started
    fine = teachers[args.fine]
    print(f"{args.model}: teachers against a {args.fine}-step solve, seed {args.seed}, n = {args.n} (0.0 s: cached)")
    print("             pixel RMS   per-sample RMS: median   90 %     99 %      max  worst 10's share  time")
    for count in steps:
        if count != args.fine:
            print(accuracy_line(count, teachers[count], fine, seconds[count]))

    noise = model.noise_schedule
    centres = [float(t) for t in (0.9, 0.5, 0.1, 0.02) if noise.default_t_end(50) < t < noise.t_max]
    print("\nroughness of ε̂(x, t) along t: RMS second / first difference at spacing ¼, 1, 4 × 0.001 in t")
    for centre, ratios in roughness(model, fine, centres):
        print(f"  t = {centre:5.3f}: " + "  ".join(f"{r:6.3f}" for r in ratios))

    pair = schedules_to_compare(args, model)
    print(f"\n{pair[0][0]} − {pair[1][0]} against each teacher (same seed and n):")
    print("  teacher      distance A  distance B  difference   pixel A   pixel B  difference")
    for count in steps:
        a, b = (evaluators[count].evaluate(schedule) for _, schedule in pair)
        print(
            f"  {count:4d} steps  {a.teacher_distance:10.5f}  {b.teacher_distance:10.5f}  "
            f"{a.teacher_distance - b.teacher_distance:+10.5f}  {a.error_to_reference:8.5f}  "
            f"{b.error_to_reference:8.5f}  {a.error_to_reference - b.error_to_reference:+10.5f}"
        )
    print(f"\nthe evaluator's teacher: {teacher_schedule(noise, TEACHER_STEPS).name}")


if __name__ == "__main__":
    main()
