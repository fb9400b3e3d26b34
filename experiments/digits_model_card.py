"""Write a bundled digits model's card: architecture, training record, the floor and a few solvers on
every metric (mean over fresh seeds), the feature networks' accuracy, and a PNG of samples at NFE 4 / 10
and of the converged solution from the same noise. The flow model's card scores the flow baselines
(Euler on the shifted sigmas, DPM-Solver++ and UniPC on the flow sigmas, DPM-Solver++(2M) λ-uniform) at NFE 4–10.

Run after the model's training script, train_digits_features.py and train_digits_classifier.py:
    python experiments/digits_model_card.py [--model bundled:digits-flow]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from solversearch import presets
from solversearch.baselines import save_sample_grid
from solversearch.evaluator import EvaluationSettings, Evaluator, teacher_schedule
from solversearch.models.spec import BUNDLED, load_model

PACKAGE = Path(__file__).resolve().parents[1] / "solversearch"
WEIGHTS = PACKAGE / "weights"
SEEDS = (11, 12, 13)  # seeds no search, selection or validation uses
METRICS = ("fid", "kid", "teacher_distance", "error_to_reference")
METRIC_NAMES = {
    "fid": "FID",
    "kid": "KID",
    "teacher_distance": "teacher distance",
    "error_to_reference": "teacher RMSE (pixels)",
}
FLOW_NFES = (4, 5, 6, 8, 10)
# The flow baselines: what diffusers' flow schedulers do (Euler on FlowMatchEulerDiscreteScheduler's
# sigmas; the multistep schedulers with use_flow_sigmas), plus DPM-Solver++(2M) λ-uniform.
FLOW_SOLVERS = (
    ("Euler (DDIM)", "ddim", "shifted"),
    ("DPM-Solver++(2M)", "dpmpp_2m", "flow_sigmas"),
    ("DPM-Solver++(3M)", "dpmpp_3m", "flow_sigmas"),
    ("UniPC-2 (bh2)", "unipc_2_bh2", "flow_sigmas"),
    ("DPM-Solver++(2M)", "dpmpp_2m", "logsnr"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", choices=sorted(BUNDLED), default="bundled:digits")
    args = parser.parse_args()
    if args.model == "bundled:digits-flow":
        flow_card(args.n)
    else:
        vp_card(args.n)


def mean_scores(model, solvers: dict, n: int) -> dict[str, dict[str, float]]:
    """label → metric → mean over SEEDS; the floor (the teacher's own samples) first."""
    scores: dict[str, list[dict]] = {}
    for seed in SEEDS:
        evaluator = Evaluator(model, EvaluationSettings(n=n, seed=seed))
        floor_label = f"floor: the teacher, UniPC-3 with {evaluator.settings.reference_steps} λ-uniform steps"
        scores.setdefault(floor_label, []).append(evaluator.floor().metrics())
        for label, schedule in solvers.items():
            scores.setdefault(label, []).append(evaluator.evaluate(schedule).metrics())
            print(f"seed {seed}: {label} done", flush=True)
    return {label: {m: float(np.mean([s[m] for s in per_seed])) for m in METRICS} for label, per_seed in scores.items()}


def flow_card(n: int) -> None:
    model = load_model("bundled:digits-flow")
    noise = model.noise_schedule
    directory = PACKAGE / BUNDLED["bundled:digits-flow"][0]
    training = json.loads((directory / "training.json").read_text())
    config = json.loads((directory / "unet" / "config.json").read_text())
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())

    solvers = {
        (name, grid, nfe): presets.build(preset, noise, nfe, grid)
        for name, preset, grid in FLOW_SOLVERS
        for nfe in FLOW_NFES
    }
    means = mean_scores(model, solvers, n)
    floor_label, floor = next(iter(means.items()))
    tables = []
    for metric in METRICS:
        header = "| sampler | grid | " + " | ".join(f"NFE {nfe}" for nfe in FLOW_NFES) + " |"
        lines = [header, "| --- | --- | " + " | ".join("---" for _ in FLOW_NFES) + " |"]
        for name, _, grid in FLOW_SOLVERS:
            values = [means[(name, grid, nfe)][metric] for nfe in FLOW_NFES]
            lines.append(f"| {name} | `{grid}` | " + " | ".join(f"{v:.4g}" for v in values) + " |")
        tables.append(f"**{METRIC_NAMES[metric]}** (floor {floor[metric]:.4g})\n\n" + "\n".join(lines))
    solver_fid = {label: v["fid"] for label, v in means.items() if label != floor_label}
    best_label = min(solver_fid, key=solver_fid.get)
    floor_best = all(floor["fid"] < v for v in solver_fid.values())
    floor_check = (
        f"The converged samples score best on FID: {floor['fid']:.4g} against the best solver's {solver_fid[best_label]:.4g} "
        f"({best_label[0]} on `{best_label[1]}`, NFE {best_label[2]})."
        if floor_best
        else f"**The converged samples do not score best on FID**: {floor['fid']:.4g}, but {best_label[0]} on `{best_label[1]}` "
        f"at NFE {best_label[2]} scores {solver_fid[best_label]:.4g}."
    )
    print(floor_check)

    pictures = Evaluator(model, EvaluationSettings(n=16, seed=0, error_to_reference=False))
    images = [
        pictures.sample(presets.build("dpmpp_2m", noise, 4, "flow_sigmas")),
        pictures.sample(presets.build("dpmpp_2m", noise, 10, "flow_sigmas")),
        pictures.sample(teacher_schedule(noise, 200)),
    ]
    save_sample_grid(
        images,
        [
            "DPM-Solver++(2M), flow sigmas, NFE 4",
            "DPM-Solver++(2M), flow sigmas, NFE 10",
            "UniPC-3, 200 steps (converged)",
        ],
        directory / "samples.png",
    )

    params = training["parameters"]
    newline = "\n\n"
    card = f"""# Bundled model: digits flow UNet (`bundled:digits-flow`)

The UNet of `bundled:digits` (same configuration, same data: all 1,797 images of scikit-learn's 8×8
digits, upsampled (bilinear) to 16×16 and scaled to [−1, 1]) trained by flow matching
(`experiments/train_digits_flow_model.py`), so that the searches can be run on a rectified-flow model
with no download: `solversearch search experiments/digits_flow.yaml`.

| | |
| --- | --- |
| architecture | UNet2DModel, {params / 1e6:.2f}M parameters, channels {tuple(config["block_out_channels"])}, {config["layers_per_block"]} resnet per block, attention at 4×4 ({", ".join(config["down_block_types"])}) |
| diffusion | rectified flow x_σ = (1 − σ) x₀ + σ ε, velocity prediction ε − x₀, network time σ·{scheduler["num_train_timesteps"]}, σ ~ U(0, 1) in training; `FlowMatchEulerDiscreteScheduler`, shift {scheduler["shift"]:g} (`scheduler/`) |
| training | {training["steps"]} steps, batch {training["batch"]}, AdamW lr {training["lr"]} (warm-up, cosine decay), EMA {training["ema"]} with warm-up |
| final loss | {training["final_loss_last_500"]:.4f} (mean of the last 500 steps; velocity MSE, not comparable with the ε loss of `bundled:digits`) |
| training time | {training["training_seconds"] / 60:.0f} min on {training["hardware"]} (torch {training["torch"]}) |
| weights | `unet/diffusion_pytorch_model.safetensors` (float32) |

## Metrics (mean over seeds {", ".join(map(str, SEEDS))}, n = {n} each, FID and KID against the 1,797 digits)

FID and KID use the bundled proxy feature network (`../digits_features/`, see `../digits_unet/README.md`);
the teacher distance is the perceptual (LPIPS-style) distance in its layers to the converged solution from
the same noise ({floor_label[len("floor: ") :]}, its first step a first-order step from
σ = 1 to σ = {noise.t_start:g}), the pixel RMSE the plain one. The grids: `shifted` is
FlowMatchEulerDiscreteScheduler's (from σ = 1, to 0), `flow_sigmas` the multistep schedulers' with
`use_flow_sigmas` (from σ = {noise.t_start:g}, to 0), `logsnr` λ-uniform from σ = {noise.t_start:g} to {noise.default_t_end(10):g}.

{newline.join(tables)}

{floor_check}

![samples at NFE 4, 10 and 200 from the same noise](samples.png)
"""
    (directory / "README.md").write_text(card)
    print(card)


def vp_card(n: int) -> None:
    model = load_model("bundled:digits")
    noise = model.noise_schedule
    unet_dir = WEIGHTS / "digits_unet"
    training = json.loads((unet_dir / "training.json").read_text())
    features = json.loads((WEIGHTS / "digits_features" / "config.json").read_text())
    classifier = json.loads((WEIGHTS / "digits_classifier" / "config.json").read_text())
    config = json.loads((unet_dir / "unet" / "config.json").read_text())

    solvers = {
        "DDIM, NFE 50": presets.build("ddim", noise, 50, "logsnr"),
        "DPM-Solver++(2M), NFE 10": presets.build("dpmpp_2m", noise, 10, "logsnr"),
        "DPM-Solver++(2M), NFE 5": presets.build("dpmpp_2m", noise, 5, "logsnr"),
        "DPM-Solver++(2M), NFE 4": presets.build("dpmpp_2m", noise, 4, "logsnr"),
    }
    rows = "\n".join(
        f"| {label} | " + " | ".join(f"{values[m]:.4g}" for m in METRICS) + " |"
        for label, values in mean_scores(model, solvers, n).items()
    )

    pictures = Evaluator(model, EvaluationSettings(n=16, seed=0, error_to_reference=False))
    images = [
        pictures.sample(presets.build("dpmpp_2m", noise, 4, "logsnr")),
        pictures.sample(presets.build("dpmpp_2m", noise, 10, "logsnr")),
        pictures.sample(teacher_schedule(noise, 200)),
    ]
    save_sample_grid(
        images,
        ["DPM-Solver++(2M), NFE 4", "DPM-Solver++(2M), NFE 10", "UniPC-3, 200 steps (converged)"],
        unet_dir / "samples.png",
    )

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

## Metrics (mean over seeds {", ".join(map(str, SEEDS))}, n = {n} each, FID and KID against the 1,797 digits)

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
