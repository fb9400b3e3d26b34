"""Train the bundled flow model: the digits UNet of `train_digits_model.py`, trained by flow matching.

Rectified flow: x_σ = (1 − σ) x₀ + σ ε, the network predicts the velocity ε − x₀ from x_σ and σ·1000
(the SD3 convention). Writes a diffusers directory (unet/ + scheduler/ from FlowMatchEulerDiscreteScheduler,
safetensors) to --out, which `solversearch` loads as `bundled:digits-flow`. Resumable: a checkpoint is
kept in --work every --checkpoint-every steps.

    python experiments/train_digits_flow_model.py --steps 3000
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from train_digits_model import save_model, train, training_arguments

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
    parser = training_arguments(__doc__.splitlines()[0], 3000, 5e-4, "runs/digits_flow", 100, PACKAGE_WEIGHTS)
    # One thread: on the shared 2-core machine a 2-thread step cost 4.5 CPU-s against 0.56 for one
    # (the threads wait on each other whenever another job holds a core).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def velocity_loss(unet: UNet2DModel, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sigma = training_sigmas(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        s = sigma.view(-1, 1, 1, 1)
        return F.mse_loss(unet((1 - s) * x0 + s * noise, sigma * NUM_TRAIN_TIMESTEPS).sample, noise - x0)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SHIFT)
    objective = "flow matching (rectified flow), velocity ε − x₀, σ ~ U(0, 1)"
    save_model(args, train(args, velocity_loss), scheduler, objective=objective)


if __name__ == "__main__":
    main()
