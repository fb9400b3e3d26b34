"""Train the independent digits classifier: a second view that checks the proxy network, never a search objective.

Deliberately unlike the proxy (experiments/train_digits_features.py): another architecture
(`DigitsClassifierNet`: 5×5 convolutions, GELU, average pooling, an MLP layer), another seed, its own
training loop, and a plain classification loss on clean and shifted digits only — no degradations.
Writes model.safetensors + config.json (architecture, held-out accuracy, steps, seconds) to --out.

    python experiments/train_digits_classifier.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from solversearch.datasets import digits, split_indices
from solversearch.metrics.features import DigitsClassifierNet

PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights" / "digits_classifier"


def shifted(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Every image moved by its own whole-pixel offset in [−max_shift, max_shift]², background filled in
    (pad with the background value, then crop), and half of the batch left clean."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    keep = torch.rand(n, generator=generator) < 0.5
    dy, dx = torch.where(keep, max_shift, dy), torch.where(keep, max_shift, dx)
    rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--channels", type=int, nargs=2, default=(16, 32))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=20240611)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=PACKAGE_WEIGHTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = digits(16)
    labels = torch.from_numpy(labels)
    train, test = (torch.from_numpy(i) for i in split_indices(len(labels)))
    net = DigitsClassifierNet(channels=tuple(args.channels), hidden=args.hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    # Step decay rather than the proxy's cosine: nothing in the two training paths is shared.
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.steps // 3), gamma=0.3)

    def accuracy(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((net(x).argmax(1) == labels[test]).float().mean())

    started = time.time()
    for step in range(1, args.steps + 1):
        idx = train[torch.randperm(len(train), generator=generator)[: args.batch]]
        loss = F.cross_entropy(net(shifted(images[idx], generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.steps:
            net.eval()
            print(
                f"step {step:5d}  {time.time() - started:5.0f} s  loss {loss.item():.3f}  "
                f"held-out accuracy {accuracy(images[test]):.4f}",
                flush=True,
            )
            net.train()
    net.eval()
    record = {
        "architecture": net.config,
        "parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy_clean": accuracy(images[test]),
        "test_accuracy_shifted": accuracy(shifted(images[test], torch.Generator().manual_seed(999))),
        "train_images": len(train),
        "test_images": len(test),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
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
