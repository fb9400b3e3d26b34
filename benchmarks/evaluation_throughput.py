"""Evaluation throughput and proxy-FID noise on the bundled digits model.

Prints
  1. samples/s of sampling + scoring at NFE 5 and 10 (this machine's CPU; `--device cuda` on a GPU);
  2. the proxy-FID noise: standard deviation over 5 seeds at n = 250, 500, 1000, 2000, next to the
     gap between DDIM and DPM-Solver++(2M) at NFE 5 — the smallest n whose noise is well below the
     gap ranks schedules reliably and is the search's default.
`python benchmarks/evaluation_throughput.py [--device cuda]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from solversearch import presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ns", default="250,500,1000,2000")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    model = load_model(args.model, args.device)
    noise = model.noise_schedule
    cache = ArrayCache()
    print(f"{args.model} on {device_name}")

    print("\nthroughput (sampling + proxy FID, n = 1000)")
    for nfe in (5, 10):
        evaluator = Evaluator(
            model,
            EvaluationSettings(n=1000, batch_size=args.batch_size, device=args.device, error_to_reference=False),
            cache,
        )
        evaluator.reference()
        schedule = presets.build("dpmpp_2m", noise, nfe, "logsnr")
        evaluator.evaluate(schedule)  # warm-up
        start = time.perf_counter()
        result = evaluator.evaluate(schedule)
        total = time.perf_counter() - start
        print(
            f"  NFE {nfe:2d}: {result.samples_per_second:8.0f} samples/s sampling, "
            f"{1000 / total:8.0f} samples/s with scoring ({total:.2f} s per evaluation)"
        )

    print(f"\nproxy-FID noise over {args.seeds} seeds (NFE 5, logSNR grid)")
    print(f"  {'n':>5} {'DDIM mean':>10} {'DPM++2M mean':>13} {'gap':>8} {'std DDIM':>9} {'std 2M':>8} {'gap/std':>8}")
    ddim = presets.build("ddim", noise, 5, "logsnr")
    dpm = presets.build("dpmpp_2m", noise, 5, "logsnr")
    for n in (int(v) for v in args.ns.split(",")):
        a, b = [], []
        for seed in range(args.seeds):
            evaluator = Evaluator(
                model,
                EvaluationSettings(
                    n=n, seed=seed, batch_size=args.batch_size, device=args.device, error_to_reference=False
                ),
                cache,
            )
            a.append(evaluator.evaluate(ddim).fid)
            b.append(evaluator.evaluate(dpm).fid)
        gap = statistics.mean(a) - statistics.mean(b)
        std = max(statistics.stdev(a), statistics.stdev(b))
        print(
            f"  {n:>5} {statistics.mean(a):>10.3f} {statistics.mean(b):>13.3f} {gap:>8.3f} "
            f"{statistics.stdev(a):>9.3f} {statistics.stdev(b):>8.3f} {gap / std:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
