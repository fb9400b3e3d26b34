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
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS)
    parser.add_argument("--work", type=Path, default=Path("runs/digits_unet"))
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

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
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

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
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = ema_decay(step, args.ema)
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        losses.append(float(loss))
        step += 1
        if step % 100 == 0:
            recent = sum(losses[-100:]) / 100
            print(
                f"step {step:6d}  loss {recent:.4f}  lr {schedule.get_last_lr()[0]:.2e}  {time.time() - started:.0f}s",
                flush=True,
            )
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
    scheduler.save_pretrained(args.out / "scheduler")
    record = {
        "steps": step,
        "batch": args.batch,
        "lr": args.lr,
        "ema": args.ema,
        "final_loss_last_500": sum(losses[-500:]) / min(500, len(losses)),
        "training_seconds": round(time.time() - started, 1),
        "hardware": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
