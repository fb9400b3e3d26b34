"""Adapter from a diffusers UNet (UNet2DModel or UNet2DConditionModel) to the Denoiser contract.

The adapter maps continuous t to the network's time input (via the noise path), converts the output
(ε, v, x₀, flow velocity, or EDM's preconditioned output) to ε (or to x̂₀ when asked), and applies
classifier-free guidance for conditional models. Conditioning (class labels,
prompt embeddings) is per sample: `bind(...)` returns a denoiser for one batch, so the sampler keeps
seeing `denoiser(x, t)`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import SolversearchError
from ..noise import KarrasVE, NoiseSchedule, noise_schedule_from_diffusers_config
from .base import alpha_sigma
from .pruning import UnitCosts, prunable_units, skipping, unit_costs

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


class UNetDenoiser(torch.nn.Module):
    """Wraps a diffusers UNet: time mapping, output → ε, optional classifier-free guidance."""

    def __init__(
        self,
        unet: torch.nn.Module,
        noise_schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise SolversearchError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if (prediction_type == "flow_prediction") != (noise_schedule.family == "flow"):
            raise SolversearchError(
                f"prediction_type {prediction_type!r} does not fit a {noise_schedule.family} noise path: flow models "
                "predict the velocity (flow_prediction), other models ε, v or x₀"
            )
        if noise_schedule.family == "edm" and prediction_type not in ("epsilon", "v_prediction"):
            raise SolversearchError(
                f"an EDM model's prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
            )
        self.unet = unet
        self.noise_schedule = noise_schedule
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        self.path_alpha_sigma = noise_schedule.torch_alpha_sigma()
        self._fingerprint: str | None = None
        self._unit_costs: UnitCosts | None = None

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, guidance_scale: float = 1.0) -> UNetDenoiser:
        """Load `unet/` + `scheduler/` as `save_pretrained` writes them (a pipeline directory works too)."""
        path = Path(path)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        scheduler_dir = path / "scheduler" if (path / "scheduler").is_dir() else unet_dir
        config_path, scheduler_path = unet_dir / "config.json", scheduler_dir / "scheduler_config.json"
        if not config_path.is_file():
            raise SolversearchError(f"{path}: no UNet config.json (expected {path}/unet/config.json)")
        if not scheduler_path.is_file():
            raise SolversearchError(
                f"{path}: no scheduler_config.json (expected {path}/scheduler/scheduler_config.json); "
                "the noise schedule comes from it"
            )
        config, scheduler_config = _json_object(config_path), _json_object(scheduler_path)
        if not any(unet_dir.glob("*.safetensors")):
            raise SolversearchError(
                f"{unet_dir}: no .safetensors weights; pickled weights (.bin, .pt) are not loaded, because loading "
                "them can run any code the file holds: convert them with safetensors first"
            )
        unet_class = _unet_class(config.get("_class_name", "UNet2DModel"))
        try:
            unet = unet_class.from_pretrained(str(unet_dir), low_cpu_mem_usage=False, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
            raise SolversearchError(f"{unet_dir}: cannot load the UNet weights: {str(exc).splitlines()[0]}") from None
        size = unet.config.sample_size
        sizes = [size] if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
        if len(sizes) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise SolversearchError(
                f"{config_path}: sample_size must be a positive integer or [height, width], got {size!r}"
            )
        noise = noise_schedule_from_diffusers_config(scheduler_config)
        default_prediction = "flow_prediction" if noise.family == "flow" else "epsilon"
        prediction_type = scheduler_config.get("prediction_type", default_prediction)
        return cls(unet.eval().requires_grad_(False), noise, prediction_type, guidance_scale)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, height, width)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the UNet config, its weights and how they are interpreted (noise, parameterisation)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
            meta = {"config": config, "noise": self.noise_schedule.to_dict(), "prediction_type": self.prediction_type}
            digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.unet.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    # --- block skipping ------------------------------------------------------------------------

    @property
    def units(self) -> tuple[str, ...]:
        """Names of the UNet blocks a schedule step may skip (`Step.skip`), in forward order."""
        return prunable_units(self.unet)

    def unit_costs(self) -> UnitCosts:
        """MACs of one UNet forward per sample and each unit's saving (cached). With guidance every
        sampler step runs two such forwards per sample."""
        if self._unit_costs is None:
            self._unit_costs = unit_costs(self.unet, self.sample_shape, **self._dummy_conditioning())
        return self._unit_costs

    def _dummy_conditioning(self) -> dict[str, torch.Tensor]:
        parameter = next(self.unet.parameters())
        config, dummy = self.unet.config, {}
        cross_attention_dim = getattr(config, "cross_attention_dim", None)
        if cross_attention_dim is not None:  # UNet2DConditionModel: one token of the encoder's width
            width = getattr(config, "encoder_hid_dim", None) or cross_attention_dim
            if not isinstance(width, int):
                raise SolversearchError(f"cannot build a dummy encoder_hidden_states of width {width!r}")
            dummy["encoder_hidden_states"] = torch.zeros(1, 1, width, dtype=parameter.dtype, device=parameter.device)
        if isinstance(getattr(self.unet, "class_embedding", None), torch.nn.Embedding):
            dummy["class_labels"] = torch.zeros(1, dtype=torch.long, device=parameter.device)
        return dummy

    # --- evaluation ---------------------------------------------------------------------------

    def bind(self, **conditioning: torch.Tensor) -> BoundDenoiser:
        """A denoiser for one batch with its per-sample conditioning (class_labels, encoder_hidden_states,
        negative_encoder_hidden_states for guidance)."""
        return BoundDenoiser(self, conditioning)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **conditioning: Any) -> torch.Tensor:
        """ε̂(x, t), or x̂₀ with `target="x0"`. No autograd graph unless x or t requires grad (a refinement
        learning the times): the network's weights never do."""
        skip = conditioning.pop("skip", None)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)):
            if skip:
                with skipping(self.unet, skip):
                    return self._guided(x, t, conditioning)
            return self._guided(x, t, conditioning)

    def _guided(self, x: torch.Tensor, t: torch.Tensor, conditioning: dict[str, Any]) -> torch.Tensor:
        """Guidance combines either target the same way: x̂₀ and ε are affine in each other at fixed (x, t)."""
        negative = conditioning.pop("negative_encoder_hidden_states", None)
        target = conditioning.pop("target", "eps")
        if self.guidance_scale == 1.0:
            return self._predict(x, t, conditioning, target)
        if negative is None:
            raise SolversearchError(
                "guidance_scale ≠ 1 needs negative_encoder_hidden_states (the unconditional embedding)"
            )
        positive = conditioning.pop("encoder_hidden_states")
        both = dict(conditioning, encoder_hidden_states=torch.cat([negative, positive]))
        uncond, cond = self._predict(torch.cat([x, x]), torch.cat([t, t]), both, target).chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: dict[str, Any], target: str) -> torch.Tensor:
        """The network's output at (x, t) converted to ε ("eps") or x̂₀ ("x0")."""
        weight = next(self.unet.parameters(), None)  # the network runs in its own dtype (e.g. float16 on a GPU)
        dtype = weight.dtype if weight is not None else x.dtype
        time = self.noise_schedule.network_time(t).to(dtype)
        if self.prediction_type == "epsilon" and target == "eps" and self.noise_schedule.family != "edm":
            return self.unet(x.to(dtype), time, **conditioning).sample.to(x.dtype)
        alpha, sigma = alpha_sigma(self.path_alpha_sigma, t, x.ndim)
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        if isinstance(self.noise_schedule, KarrasVE):  # EDM: D(x) = c_skip x + c_out F(c_in x, c_noise)
            c_in, c_skip, c_out = self.noise_schedule.preconditioning(sigma)
            out = self.unet((c_in * x).to(dtype), time, **conditioning).sample.to(x.dtype)
            x0 = c_skip * x + (c_out if self.prediction_type == "epsilon" else -c_out) * out
            return x0 if target == "x0" else (x - x0) / sigma
        out = self.unet(x.to(dtype), time, **conditioning).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            eps, x0 = out, None
        elif self.prediction_type == "v_prediction":  # VP: v = α ε − σ x₀
            eps, x0 = sigma * x + alpha * out, alpha * x - sigma * out
        elif self.prediction_type == "sample":
            eps, x0 = None, out
        else:  # flow velocity v = ε − x₀ with x = α x₀ + σ ε
            eps, x0 = (x + alpha * out) / (alpha + sigma), (x - sigma * out) / (alpha + sigma)
        if target == "x0":
            return x0 if x0 is not None else (x - sigma * eps) / alpha
        return eps if eps is not None else (x - alpha * x0) / sigma


class BoundDenoiser:
    """`denoiser(x, t)` with fixed per-sample conditioning."""

    def __init__(self, denoiser: UNetDenoiser, conditioning: dict[str, torch.Tensor]):
        self.denoiser = denoiser
        self.conditioning = conditioning
        self.noise_schedule = denoiser.noise_schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.denoiser(x, t, **self.conditioning, **kwargs)


def _unet_class(name: str):
    from diffusers import UNet2DConditionModel, UNet2DModel

    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if name not in classes:
        raise SolversearchError(f"unsupported UNet class {name!r}; expected one of {sorted(classes)}")
    return classes[name]


def _json_object(path: Path) -> dict:
    """A config file's JSON object; anything else is a user error naming the file."""
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SolversearchError(f"{path}: malformed JSON config ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise SolversearchError(f"{path}: a config must be a JSON object, got {type(document).__name__}")
    return document
