"""Evaluation on a GPU: batch size, mixed precision and several trials sharing one card.

Prints, for the bundled digits model on the first CUDA device:
  1. the batch the evaluator's probe picks (batch_size 0) and how long probing takes;
  2. samples/s of sampling alone and of a whole evaluation (sampling + proxy FID) at NFE 5 and 10,
     for float32 and bf16 autocast, at batch 500 (the CPU default) and the probed batch;
  3. what bf16 does to the proxy FID (same x_T, n = 2000) next to the seed-to-seed spread;
  4. search-sized evaluations (n = 500) per minute with 1, 2 and 4 worker processes on the one card,
     which is what fractional GPU trials (`resources.gpu: 0.5 / 0.25`) do under Ray.
`python benchmarks/gpu_evaluation.py`
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from functools import partial

import torch

from solversearch import presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up (cuDNN autotuning, allocator)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(model, cache, n: int) -> None:
    noise = model.noise_schedule
    probe = Evaluator(model, EvaluationSettings(n=n, batch_size=0, device="cuda", error_to_reference=False), cache)
    start = time.perf_counter()
    probed = probe.batch_size
    print(f"probed batch (n = {n}): {probed}  ({time.perf_counter() - start:.2f} s to probe)")
    print(f"\n{'NFE':>4} {'precision':>9} {'batch':>6} {'sampling /s':>12} {'evaluation /s':>14}")
    for nfe in (5, 10):
        schedule = presets.build("dpmpp_2m", noise, nfe, "logsnr")
        for mixed in (False, True):
            for batch in sorted({500, probed}):
                settings = EvaluationSettings(
                    n=n, batch_size=batch, device="cuda", mixed_precision=mixed, error_to_reference=False
                )
                evaluator = Evaluator(model, settings, cache)
                evaluator.reference()
                sampling = timed(partial(evaluator.sample, schedule))
                whole = timed(partial(evaluator.evaluate, schedule))
                print(
                    f"{nfe:>4} {'bf16' if mixed else 'float32':>9} {batch:>6} {n / sampling:>12.0f} {n / whole:>14.0f}",
                    flush=True,
                )


def precision_effect(model, cache, seeds: int) -> None:
    noise = model.noise_schedule
    schedule = presets.build("dpmpp_2m", noise, 5, "logsnr")
    rows = []
    for seed in range(seeds):
        fids = []
        for mixed in (False, True):
            settings = EvaluationSettings(
                n=2000, seed=seed, device="cuda", mixed_precision=mixed, error_to_reference=False
            )
            fids.append(Evaluator(model, settings, cache).evaluate(schedule).fid)
        rows.append(fids)
    exact = [r[0] for r in rows]
    diffs = [abs(r[1] - r[0]) for r in rows]
    print(
        f"\nproxy FID of DPM-Solver++(2M) NFE 5, n = 2000, {seeds} seeds: float32 mean {statistics.mean(exact):.4f}, "
        f"seed std {statistics.stdev(exact):.4f}; |bf16 − float32| mean {statistics.mean(diffs):.4f}, max {max(diffs):.4f}"
    )


def _worker(args) -> float:
    cache_dir, evaluations, barrier = args
    model = load_model("bundled:digits", "cuda")
    noise = model.noise_schedule
    evaluator = Evaluator(
        model, EvaluationSettings(n=500, device="cuda", error_to_reference=False), ArrayCache(cache_dir)
    )
    schedules = [presets.build(name, noise, 5, "logsnr") for name in ("dpmpp_2m", "ddim", "unipc_2_bh2", "dpmpp_3m")]
    evaluator.evaluate(schedules[0])  # warm-up and reference statistics
    barrier.wait()
    start = time.perf_counter()
    for i in range(evaluations):
        evaluator.evaluate(schedules[i % len(schedules)])
    return time.perf_counter() - start


def sharing(cache_dir: str, evaluations: int) -> None:
    """Like Ray, give each worker its share of the CPU cores (Ray sets OMP_NUM_THREADS to a trial's
    cpus): scoring runs on the CPU, and workers that each take every core slow each other down."""
    print(f"\n{'processes':>9} {'threads each':>12} {'evaluations/min (n = 500, NFE 5)':>34}")
    context = mp.get_context("spawn")
    for processes in (1, 2, 4):
        threads = max(1, (os.cpu_count() or 1) // processes)
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[variable] = str(threads)  # inherited by the spawned workers
        with context.Manager() as manager:
            barrier = manager.Barrier(processes)
            with context.Pool(processes) as pool:
                seconds = pool.map(_worker, [(cache_dir, evaluations, barrier)] * processes)
        print(f"{processes:>9} {threads:>12} {60 * processes * evaluations / max(seconds):>34.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--sections", default="throughput,precision,sharing")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not torch.cuda.is_available():
        raise SystemExit("gpu_evaluation.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    model = load_model("bundled:digits", "cuda")
    with tempfile.TemporaryDirectory() as cache_dir:
        cache = ArrayCache(cache_dir)
        if "throughput" in sections:
            throughput(model, cache, args.n)
        if "precision" in sections:
            precision_effect(model, cache, args.seeds)
        if "sharing" in sections:
            sharing(cache_dir, args.evaluations)


if __name__ == "__main__":
    main()
