"""Train the bundled flow model: the digits UNet of `train_digits_model.py`, trained by flow matching.

Rectified flow: x_σ = (1 − σ) x₀ + σ ε, the network predicts the velocity ε − x₀ from x_σ and σ·1000
(the SD3 convention). Writes a diffusers directory (unet/ + scheduler/ from FlowMatchEulerDiscreteScheduler,
safetensors) to --out, which `solversearch` loads as `bundled:digits-flow`. Resumable: a checkpoint is
kept in --work every --checkpoint-every steps.

    python experiments/train_digits_flow_model.py --steps 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from train_digits_model import UNET_CONFIG, ema_decay

from solversearch.datasets import digits
from solversearch.outputs import atomic_output

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights" / "digits_flow"
NUM_TRAIN_TIMESTEPS = 1000
# 16×16 images: SD3's shift > 1 moves the grids toward high noise because large images keep their
# structure at σ where small ones have lost it; at this size there is nothing to compensate.
SHIFT = 1.0


def training_sigmas(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """σ ~ U(0, 1). Uniform rather than SD3's logit-normal: a 3–10 step sampler spends its evaluations
    near both ends (σ ≈ 1 for the first step, σ ≈ 0 for the last), where the logit-normal barely trains."""
    return torch.rand(batch, device=device, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on the shared 2-core machine a 2-thread step cost 4.5 CPU-s against 0.56 for one
    # (the threads wait on each other whenever another job holds a core).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS)
    parser.add_argument("--work", type=Path, default=Path("runs/digits_flow"))
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    images, _ = digits(16)
    images = images.to(device)
    unet = UNet2DModel(**UNET_CONFIG).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.work / "checkpoint.pt"
    step, elapsed, losses = 0, 0.0, []
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        torch.set_rng_state(state["rng"])
        print(f"resumed at step {step}")

    generator = torch.Generator(device=device).manual_seed(args.seed + step)
    started = time.time() - elapsed
    while step < args.steps:
        idx = torch.randint(0, images.shape[0], (args.batch,), device=device, generator=generator)
        x0 = images[idx]
        sigma = training_sigmas(args.batch, generator, device)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * noise
        loss = F.mse_loss(unet(x_sigma, sigma * NUM_TRAIN_TIMESTEPS).sample, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = ema_decay(step, args.ema)
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        losses.append(float(loss.detach()))
        step += 1
        if step % 100 == 0:
            recent = sum(losses[-100:]) / 100
            lr = schedule.get_last_lr()[0]
            print(f"step {step:6d}  loss {recent:.4f}  lr {lr:.2e}  {time.time() - started:.0f}s", flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            state = {
                "unet": unet.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step,
                "elapsed": time.time() - started,
                "losses": losses,
                "rng": torch.get_rng_state(),
            }
            with atomic_output(checkpoint) as tmp:  # a kill mid-write keeps the previous checkpoint
                torch.save(state, tmp)

    args.out.mkdir(parents=True, exist_ok=True)
    ema.to("cpu").save_pretrained(args.out / "unet", safe_serialization=True)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SHIFT)
    scheduler.save_pretrained(args.out / "scheduler")
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    record = {
        "objective": "flow matching (rectified flow), velocity ε − x₀, σ ~ U(0, 1)",
        "steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "final_loss_last_500": sum(losses[-500:]) / min(500, len(losses)),
        "training_seconds": round(time.time() - started, 1),
        "hardware": hardware,
        "parameters": sum(p.numel() for p in ema.parameters()),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
