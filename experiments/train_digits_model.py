"""Train the bundled digits model: a small diffusers UNet2DModel on scikit-learn's digits at 16×16.

ε-prediction, linear DDPM betas, 1000 training steps — the setting most pixel-space DDPM checkpoints
use. Writes a diffusers directory (unet/ + scheduler/, safetensors) to --out, ready for
`UNet2DModel.from_pretrained` and for `solversearch` as `bundled:digits`. Resumable: a checkpoint is
kept in --work every --checkpoint-every steps.

    python experiments/train_digits_model.py --steps 8000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from solversearch.datasets import digits
from solversearch.outputs import atomic_output

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights" / "digits_unet"

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def ema_decay(step: int, max_decay: float) -> float:
    """Warm-up EMA: with a fixed 0.999 a short run would keep much of the random initial weights."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


@dataclass(frozen=True)
class Trained:
    """What a training run leaves: the EMA network (on the CPU), the steps done, every step's loss and the
    seconds spent over all resumed runs."""

    ema: UNet2DModel
    steps: int
    losses: list[float]
    seconds: float


LossOf = Callable[[UNet2DModel, torch.Tensor, torch.Generator], torch.Tensor]


def training_arguments(description: str, steps: int, lr: float, work: str, checkpoint_every: int, out: Path):
    """The options both digits models train with; each script gives its own defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def train(args: argparse.Namespace, loss_of: LossOf) -> Trained:
    """Train the digits UNet on batches of the 16×16 digits with `loss_of(unet, x0, generator)` — the only
    part the diffusion objective changes: AdamW with warm-up and cosine decay, gradient clipping, a warm-up
    EMA, and a checkpoint in `args.work` every `args.checkpoint_every` steps that a rerun resumes from."""
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
        loss = loss_of(unet, images[idx], generator)
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
    return Trained(ema.to("cpu"), step, losses, time.time() - started)


def save_model(args: argparse.Namespace, trained: Trained, scheduler, **record: Any) -> None:
    """The diffusers directory (unet/, scheduler/) and its training record (training.json)."""
    args.out.mkdir(parents=True, exist_ok=True)
    trained.ema.save_pretrained(args.out / "unet", safe_serialization=True)
    scheduler.save_pretrained(args.out / "scheduler")
    device = torch.device(args.device)
    record = {
        **record,
        "steps": trained.steps,
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "final_loss_last_500": sum(trained.losses[-500:]) / min(500, len(trained.losses)),
        "training_seconds": round(trained.seconds, 1),
        "hardware": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in trained.ema.parameters()),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(record, indent=2, ensure_ascii=False))


def main() -> None:
    args = training_arguments(
        __doc__.splitlines()[0], 8000, 1e-3, "runs/digits_unet", 500, PACKAGE_WEIGHTS
    ).parse_args()
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(args.device)

    def epsilon_loss(unet: UNet2DModel, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, 1000, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        return F.mse_loss(unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t).sample, noise)

    save_model(args, train(args, epsilon_loss), scheduler)


if __name__ == "__main__":
    main()
