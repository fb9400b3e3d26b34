"""How much the unified sampler adds on top of the network, compared with diffusers' own loop.

Prints, for a small UNet2DModel on this machine's CPU (or `--device cuda`), at NFE 5 and 10:
  ours / diffusers   — solversearch.solve with the DPM-Solver++(2M) preset vs. a DPMSolverMultistepScheduler
                       loop (same model, batch, x_T, timesteps);
  ours / forwards    — solversearch.solve vs. NFE back-to-back forward passes of the same network.
Goal: both ratios ≤ 1.05. Median of repeated runs; run with `python benchmarks/sampler_overhead.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel

from solversearch import DiscreteVP, presets, solve
from solversearch.grids import diffusers_grid
from solversearch.models import UNetDenoiser


def median_seconds(fn, repeats: int, synchronize=lambda: None) -> float:
    fn()  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    unet = (
        UNet2DModel(
            sample_size=args.size,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        .eval()
        .to(device)
    )
    noise = DiscreteVP.from_diffusers_config({})
    denoiser = UNetDenoiser(unet, noise)
    x_T = torch.randn(args.batch, 3, args.size, args.size, device=device)
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet2DModel {n_params / 1e6:.2f}M parameters, batch {args.batch}, {args.size}×{args.size}, "
        f"float32, "
        + (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}")
    )
    print(
        f"{'NFE':>4} {'ours ms':>9} {'diffusers ms':>13} {'forwards ms':>12} {'ours/diffusers':>15} {'ours/forwards':>14}"
    )

    for nfe in (5, 10):
        schedule = presets.dpmpp_2m(diffusers_grid(noise, nfe, "trailing"))
        scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing")

        @torch.no_grad()
        def ours(schedule=schedule):
            solve(denoiser, schedule, x_T)

        @torch.no_grad()
        def theirs(scheduler=scheduler, nfe=nfe):
            scheduler.set_timesteps(nfe)
            x = x_T
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample

        timesteps = torch.full((args.batch,), 500.0, device=device)

        @torch.no_grad()
        def forwards(nfe=nfe, timesteps=timesteps):
            for _ in range(nfe):
                unet(x_T, timesteps)

        # Interleave the three measurements so machine noise hits them alike.
        samples = {"ours": [], "theirs": [], "forwards": []}
        for _ in range(3):
            samples["ours"].append(median_seconds(ours, args.repeats // 3, synchronize))
            samples["theirs"].append(median_seconds(theirs, args.repeats // 3, synchronize))
            samples["forwards"].append(median_seconds(forwards, args.repeats // 3, synchronize))
        t_ours, t_theirs, t_fwd = (min(samples[k]) for k in ("ours", "theirs", "forwards"))
        print(
            f"{nfe:>4} {t_ours * 1e3:>9.1f} {t_theirs * 1e3:>13.1f} {t_fwd * 1e3:>12.1f} "
            f"{t_ours / t_theirs:>15.3f} {t_ours / t_fwd:>14.3f}"
        )


if __name__ == "__main__":
    main()
