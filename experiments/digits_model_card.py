"""Write the bundled digits model's card: architecture, training record, the floor and a few solvers on
every metric (mean over fresh seeds), the feature networks' accuracy, and a PNG of samples at NFE 4 / 10
and of the converged solution from the same noise.

Run after train_digits_model.py, train_digits_features.py and train_digits_classifier.py:
    python experiments/digits_model_card.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from solversearch import presets
from solversearch.baselines import save_sample_grid
from solversearch.evaluator import EvaluationSettings, Evaluator, teacher_schedule
from solversearch.models.spec import load_model

WEIGHTS = Path(__file__).resolve().parents[1] / "solversearch" / "weights"
SEEDS = (11, 12, 13)  # seeds no search, selection or validation uses
METRICS = ("fid", "kid", "teacher_distance", "error_to_reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()

    model = load_model("bundled:digits")
    noise = model.noise_schedule
    unet_dir = WEIGHTS / "digits_unet"
    training = json.loads((unet_dir / "training.json").read_text())
    features = json.loads((WEIGHTS / "digits_features" / "config.json").read_text())
    classifier = json.loads((WEIGHTS / "digits_classifier" / "config.json").read_text())
    config = json.loads((unet_dir / "unet" / "config.json").read_text())

    solvers = {"DDIM, NFE 50": presets.build("ddim", noise, 50, "logsnr"),
               "DPM-Solver++(2M), NFE 10": presets.build("dpmpp_2m", noise, 10, "logsnr"),
               "DPM-Solver++(2M), NFE 5": presets.build("dpmpp_2m", noise, 5, "logsnr"),
               "DPM-Solver++(2M), NFE 4": presets.build("dpmpp_2m", noise, 4, "logsnr")}
    scores: dict[str, list[dict]] = {}
    for seed in SEEDS:
        evaluator = Evaluator(model, EvaluationSettings(n=args.n, seed=seed))
        floor_label = f"floor: the teacher, UniPC-3 with {evaluator.settings.reference_steps} λ-uniform steps"
        scores.setdefault(floor_label, []).append(evaluator.floor().metrics())
        for label, schedule in solvers.items():
            scores.setdefault(label, []).append(evaluator.evaluate(schedule).metrics())
    rows = "\n".join(
        f"| {label} | " + " | ".join(f"{np.mean([s[m] for s in per_seed]):.4g}" for m in METRICS) + " |"
        for label, per_seed in scores.items()
    )

    pictures = Evaluator(model, EvaluationSettings(n=16, seed=0, error_to_reference=False))
    images = [
        pictures.sample(presets.build("dpmpp_2m", noise, 4, "logsnr")),
        pictures.sample(presets.build("dpmpp_2m", noise, 10, "logsnr")),
        pictures.sample(teacher_schedule(noise, 200)),
    ]
    save_sample_grid(images, ["DPM-Solver++(2M), NFE 4", "DPM-Solver++(2M), NFE 10", "UniPC-3, 200 steps (converged)"],
                     unet_dir / "samples.png")

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

## Metrics (mean over seeds {", ".join(map(str, SEEDS))}, n = {args.n} each, FID and KID against the 1,797 digits)

FID and KID use the bundled proxy feature network; the teacher distance is the perceptual (LPIPS-style)
distance in its layers to the converged solution from the same noise, the pixel RMSE the plain one.

| sampler | FID | KID | teacher distance | teacher RMSE (pixels) |
| --- | --- | --- | --- | --- |
{rows}

The proxy network (`../digits_features/`, `experiments/train_digits_features.py`, {features["parameters"]:,}
parameters) classifies held-out digits with {features["test_accuracy_clean"]:.1%} accuracy ({features["test_accuracy_augmented"]:.1%}
degraded) and regresses the blur, noise, stroke thickness, contrast and displacement applied to them from its
{features["architecture"]["feature_dim"]}-d tanh feature layer, so its features see what a few-step sampler gets wrong.
An independently trained classifier (`../digits_classifier/`, {classifier["parameters"]:,} parameters,
{classifier["test_accuracy_clean"]:.1%} held-out accuracy) is a second view, never an objective
(`benchmarks/proxy_agreement.py`).

![samples at NFE 4, 10 and 200 from the same noise](samples.png)
"""
    (unet_dir / "README.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
