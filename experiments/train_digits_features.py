"""Train the proxy-FID feature network: a CNN that classifies 16×16 digits AND measures their degradation.

A pure classifier learns to ignore blur and noise, exactly what an inaccurate sampler gets wrong. This one
also regresses, linearly from its feature layer, the level of each `DEGRADATIONS` entry (clean images: the
zero target), so its features must encode them. Writes model.safetensors + config.json to --out.

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
from solversearch.metrics.features import DEGRADATIONS, DigitsFeatureNet, degrade

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights" / "digits_features"


def draw_levels(n: int, generator: torch.Generator, probability: float = 0.5) -> dict[str, torch.Tensor]:
    """Each degradation independently present with `probability`, at a level uniform over its range;
    so a quarter-ish of the batch is near-clean and every level is seen alone and in combination."""
    levels = {}
    for name, (low, high) in DEGRADATIONS.items():
        value = low + (high - low) * torch.rand(n, generator=generator)
        levels[name] = value * (torch.rand(n, generator=generator) < probability)
    return levels


def targets(levels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Levels divided by the largest |level| of their range, so every regression target is in [−1, 1]."""
    return torch.stack([levels[name] / max(abs(low), abs(high)) for name, (low, high) in DEGRADATIONS.items()], 1)


def evaluate(net: DigitsFeatureNet, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """Clean and degraded accuracy, and the R² of every degradation level on a fixed degraded copy."""
    generator = torch.Generator().manual_seed(seed)
    levels = draw_levels(len(labels), generator)
    degraded = degrade(images, levels, generator)
    with torch.no_grad():
        predicted = net.degradation(degraded)
        result = {
            "accuracy_clean": float((net(images).argmax(1) == labels).float().mean()),
            "accuracy_degraded": float((net(degraded).argmax(1) == labels).float().mean()),
        }
    truth = targets(levels)
    for i, name in enumerate(DEGRADATIONS):
        residual = ((predicted[:, i] - truth[:, i]) ** 2).sum()
        result[f"r2_{name}"] = float(1 - residual / ((truth[:, i] - truth[:, i].mean()) ** 2).sum())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--degradation-weight", type=float, default=8.0, help="weight of the regression loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = digits(16)
    labels = torch.from_numpy(labels)
    train, test = (torch.from_numpy(i) for i in split_indices(len(labels)))
    net = DigitsFeatureNet(width=args.width, feature_dim=args.feature_dim)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    started = time.time()
    for step in range(1, args.steps + 1):
        idx = train[torch.randint(0, len(train), (args.batch,), generator=generator)]
        levels = draw_levels(args.batch, generator)
        x = degrade(images[idx], levels, generator)
        features = net.features(x)
        classification = F.cross_entropy(net.head(features), labels[idx], label_smoothing=0.05)
        regression = F.mse_loss(net.degradation_head(features), targets(levels))
        loss = classification + args.degradation_weight * regression
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            net.eval()
            held_out = evaluate(net, images[test], labels[test], seed=12345)
            net.train()
            summary = "  ".join(f"{k} {v:.3f}" for k, v in held_out.items())
            print(
                f"step {step:5d}  {time.time() - started:6.0f} s  class {classification.item():.3f}  "
                f"regression {regression.item():.4f}  {summary}",
                flush=True,
            )
    net.eval()
    held_out = evaluate(net, images[test], labels[test], seed=12345)
    record = {
        "architecture": net.config,
        "degradations": list(DEGRADATIONS),
        "degradation_ranges": {name: list(r) for name, r in DEGRADATIONS.items()},
        "parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy_clean": held_out["accuracy_clean"],
        "test_accuracy_augmented": held_out["accuracy_degraded"],
        "test_degradation_r2": {name: held_out[f"r2_{name}"] for name in DEGRADATIONS},
        "train_images": len(train),
        "test_images": len(test),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "degradation_weight": args.degradation_weight,
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "training_seconds": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
