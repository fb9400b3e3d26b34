"""Write the bundled digits model's card: architecture, training record, floor proxy FID, feature-network
accuracy, and a PNG of samples at NFE 4 / 10 / 200 from the same noise.

Run after train_digits_model.py and train_digits_features.py:
    python experiments/digits_model_card.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from solversearch import presets
from solversearch.baselines import save_sample_grid
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models.spec import load_model

WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()

    model = load_model("bundled:digits")
    noise = model.noise_schedule
    unet_dir = WEIGHTS / "digits_unet"
    training = json.loads((unet_dir / "training.json").read_text())
    features = json.loads((WEIGHTS / "digits_features" / "config.json").read_text())
    config = json.loads((unet_dir / "unet" / "config.json").read_text())

    evaluator = Evaluator(model, EvaluationSettings(n=args.n, seed=0, error_to_reference=False))
    floor = evaluator.floor()
    rows = {nfe: evaluator.evaluate(presets.build("dpmpp_2m", noise, nfe, "logsnr")).fid for nfe in (4, 10)}
    ddim50 = evaluator.evaluate(presets.build("ddim", noise, 50, "logsnr")).fid

    pictures = Evaluator(model, EvaluationSettings(n=16, seed=0, error_to_reference=False))  # same x_T as above
    images = [
        pictures.sample(presets.build("dpmpp_2m", noise, 4, "logsnr")),
        pictures.sample(presets.build("dpmpp_2m", noise, 10, "logsnr")),
        pictures.sample(pictures._high_accuracy_schedule(1.0, noise.default_t_end(200), 200)),
    ]
    save_sample_grid(images, ["DPM-Solver++(2M), NFE 4", "DPM-Solver++(2M), NFE 10", "UniPC-3, 200 steps (the floor)"], unet_dir / "samples.png")

    params = training["parameters"]
    card = f"""# Bundled model: digits UNet (`bundled:digits`)

A small diffusers `UNet2DModel` trained by `experiments/train_digits_model.py` on all 1,797 images of
scikit-learn's 8×8 digits, upsampled (bilinear) to 16×16 and scaled to [−1, 1]. It needs no download
and is the embedded default of `solversearch search experiments/digits.yaml`.

| | |
| --- | --- |
| architecture | UNet2DModel, {params / 1e6:.2f}M parameters, channels {tuple(config["block_out_channels"])}, {config["layers_per_block"]} resnet per block, attention at 4×4 ({", ".join(config["down_block_types"])}) |
| diffusion | ε-prediction, linear betas 1e-4 → 0.02, 1000 training steps (`scheduler/`) |
| training | {training["steps"]} steps, batch {training["batch"]}, AdamW lr {training["lr"]} (warm-up, cosine decay), EMA {training["ema"]} with warm-up |
| final loss | {training["final_loss_last_500"]:.4f} (mean of the last 500 steps) |
| training time | {training["training_seconds"] / 60:.0f} min on {training["hardware"]} (torch {training["torch"]}) |
| weights | `unet/diffusion_pytorch_model.safetensors` (float32) |

## Proxy FID (bundled feature network, n = {args.n}, seed 0, against the 1,797 digits)

| sampler | proxy FID |
| --- | --- |
| floor: UniPC-3, 200 steps (the model's own distribution) | {floor.fid:.3f} |
| DDIM, NFE 50 | {ddim50:.3f} |
| DPM-Solver++(2M), NFE 10 | {rows[10]:.3f} |
| DPM-Solver++(2M), NFE 4 | {rows[4]:.3f} |

The feature network (`../digits_features/`, `experiments/train_digits_features.py`) classifies
held-out digits with {features["test_accuracy_clean"]:.1%} accuracy ({features["test_accuracy_augmented"]:.1%} under its noise/blur/shift
augmentation; {features["train_images"]} training, {features["test_images"]} test images); its 64-d tanh layer is the feature space.

![samples at NFE 4, 10 and 200 from the same noise](samples.png)
"""
    (unet_dir / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
