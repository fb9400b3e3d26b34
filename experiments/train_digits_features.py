"""Train the proxy-FID feature network: a small CNN classifying 16×16 digits under noise, blur and shifts.

The augmentations are the ways an imperfect sampler fails (residual noise, blur, misplaced strokes),
so the features stay meaningful on such samples; the 64-d feature layer ends in tanh, so they stay
bounded. Writes model.safetensors + config.json (with the held-out accuracy) to --out.

    python experiments/train_digits_features.py
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from solversearch.datasets import digits, split_indices
from solversearch.metrics.features import DigitsFeatureNet

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights" / "digits_features"


def blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur with standard deviations `sigma` (pixels, 0 = none), 5×5 kernel."""
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    s = sigma.clamp(min=1e-3)[:, None]
    kernel_1d = torch.exp(-0.5 * (offsets[None] / s) ** 2)
    kernel_1d = kernel_1d / kernel_1d.sum(1, keepdim=True)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :])[:, None]  # (n, 1, 5, 5)
    n = images.shape[0]
    out = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate").reshape(1, n, 20, 20), kernel, groups=n)
    return out.reshape(n, 1, 16, 16)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    shifts = torch.randint(-2, 3, (2,), generator=generator)
    out = torch.roll(images, shifts=(int(shifts[0]), int(shifts[1])), dims=(2, 3))
    out = blur(out, torch.rand(n, generator=generator) * 1.5 * (torch.rand(n, generator=generator) < 0.5))
    noise_level = torch.rand(n, 1, 1, 1, generator=generator) * 0.4 * (torch.rand(n, 1, 1, 1, generator=generator) < 0.6)
    return (out + noise_level * torch.randn(out.shape, generator=generator)).clamp(-1.5, 1.5)


def accuracy(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(images).argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = digits(16)
    labels = torch.from_numpy(labels)
    train, test = (torch.from_numpy(i) for i in split_indices(len(labels)))
    net = DigitsFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    started = time.time()
    for step in range(1, args.steps + 1):
        idx = train[torch.randint(0, len(train), (args.batch,), generator=generator)]
        loss = F.cross_entropy(net(augment(images[idx], generator)), labels[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step:5d}  loss {float(loss):.3f}  test acc {accuracy(net.eval(), images[test], labels[test]):.4f}")
            net.train()
    net.eval()
    eval_generator = torch.Generator().manual_seed(12345)
    record = {
        "architecture": net.config,
        "test_accuracy_clean": accuracy(net, images[test], labels[test]),
        "test_accuracy_augmented": accuracy(net, augment(images[test], eval_generator), labels[test]),
        "train_images": len(train),
        "test_images": len(test),
        "steps": args.steps,
        "training_seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
