"""Noise paths: α(t), σ(t), the half log-SNR λ(t) = log(α/σ), its inverse t(λ) and the network's time input.

Every path is x_t = α(t) x_0 + σ(t) ε, and every solver is the same exponential integrator in λ, so
solvers, schedules and searches never special-case a path. Three families: variance preserving (VP:
`DiscreteVP`, `LinearVP`, α² + σ² = 1, t ∈ [0, 1]), rectified flow (`RectifiedFlow`: α = 1 − t,
σ = t) and EDM / variance exploding (`KarrasVE`: α = 1, σ = σ_max·t). t ∈ [0, 1]; t = 0 is clean data.
Host-side functions work on float64 NumPy arrays (the sampler computes its coefficients once, before
its loop); the `torch_*` modules give the same functions on the device, differentiable in t or λ.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import NoiseScheduleError

ArrayLike = float | np.ndarray
FAMILIES = ("vp", "flow", "edm")


class NoiseSchedule(abc.ABC):
    """A forward process x_t = α(t) x_0 + σ(t) ε with λ = log(α/σ) decreasing in t."""

    t_max: float = 1.0
    family: str = "vp"

    @abc.abstractmethod
    def alpha(self, t: ArrayLike) -> np.ndarray:
        """α(t) in float64."""

    @abc.abstractmethod
    def sigma(self, t: ArrayLike) -> np.ndarray:
        """σ(t) in float64."""

    @abc.abstractmethod
    def lambda_(self, t: ArrayLike) -> np.ndarray:
        """Half log-SNR λ = log(α/σ); +inf at σ = 0, −inf at α = 0."""

    @abc.abstractmethod
    def t_of_lambda(self, lam: ArrayLike) -> np.ndarray:
        """The inverse of `lambda_`."""

    @abc.abstractmethod
    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with, for continuous t (e.g. 1000·t − 1, σ·1000, ¼ ln σ)."""

    @abc.abstractmethod
    def torch_alpha_sigma(self) -> torch.nn.Module:
        """A module mapping t (batch,) to (α, σ) on the device of its input (move it with `.to(device)`)."""

    @abc.abstractmethod
    def torch_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) in torch, differentiable in t."""

    @abc.abstractmethod
    def torch_t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """t(λ) in torch, differentiable in λ, so a sampler's times can be learned in log-SNR (`refine.py`)."""

    @abc.abstractmethod
    def torch_alpha_sigma_of_lambda(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, σ) as functions of λ in torch, in a form that keeps precision at both ends."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description from which `noise_schedule_from_dict` rebuilds the schedule."""

    @abc.abstractmethod
    def default_t_end(self, n_steps: int) -> float:
        """The usual final time of a continuous sampling grid with `n_steps` steps."""

    @property
    def t_start(self) -> float:
        """The usual first time of a grid uniform in λ, t or σ: the largest time with finite λ."""
        return self.t_max

    def prior_std(self, t: float) -> float:
        """The standard deviation of x_T drawn at time t: σ(t) where data are negligible beside the noise
        (EDM), 1 for VP and flow paths (the standard normal every diffusers pipeline starts from)."""
        return 1.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))


class VariancePreserving(NoiseSchedule):
    """A VP path (α² + σ² = 1), defined by log α(t) and its inverse."""

    @abc.abstractmethod
    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        """log α(t) in float64."""

    @abc.abstractmethod
    def t_of_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        """The inverse of `log_alpha`."""

    @abc.abstractmethod
    def torch_log_alpha(self) -> torch.nn.Module:
        """A module computing log α(t) on the device of its input."""

    @abc.abstractmethod
    def torch_t_of_log_alpha(self) -> torch.nn.Module:
        """The inverse of `torch_log_alpha` as a module."""

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        log_alpha = self.log_alpha(t)
        with np.errstate(divide="ignore"):
            return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def t_of_lambda(self, lam: ArrayLike) -> np.ndarray:
        """log α = −½ log(1 + e^{−2λ})."""
        lam = np.asarray(lam, dtype=np.float64)
        return self.t_of_log_alpha(-0.5 * np.logaddexp(0.0, -2.0 * lam))

    def torch_alpha_sigma(self) -> torch.nn.Module:
        return _VPAlphaSigma(self.torch_log_alpha())

    def torch_lambda(self, t: torch.Tensor) -> torch.Tensor:
        log_alpha = self.torch_log_alpha().to(t.device)(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def torch_t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return self.torch_t_of_log_alpha().to(lam.device)(-0.5 * torch.nn.functional.softplus(-2.0 * lam))

    def torch_alpha_sigma_of_lambda(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α = √sigmoid(2λ), σ = √sigmoid(−2λ), in log form."""
        softplus = torch.nn.functional.softplus
        return torch.exp(-0.5 * softplus(-2.0 * lam)), torch.exp(-0.5 * softplus(2.0 * lam))


class _VPAlphaSigma(torch.nn.Module):
    def __init__(self, log_alpha: torch.nn.Module):
        super().__init__()
        self.log_alpha = log_alpha

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_alpha = self.log_alpha(t)
        return log_alpha.exp(), torch.sqrt(-torch.expm1(2.0 * log_alpha))


class PiecewiseLinear(torch.nn.Module):
    """y(x) linear between increasing knots, extrapolated linearly beyond them; no host sync."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray):
        super().__init__()
        self.register_buffer("xs", torch.as_tensor(xs, dtype=torch.float64))
        self.register_buffer("ys", torch.as_tensor(ys, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, ys = self.xs.to(x.dtype), self.ys.to(x.dtype)
        hi = torch.searchsorted(xs, x.contiguous()).clamp(1, xs.numel() - 1)
        lo = hi - 1
        slope = (ys[hi] - ys[lo]) / (xs[hi] - xs[lo])
        return ys[lo] + slope * (x - xs[lo])


class DiscreteVP(VariancePreserving):
    """A discrete DDPM schedule made continuous the way DPM-Solver does it.

    Knots t_n = (n + 1)/N carry log α(t_n) = ½ log ᾱ_n; log α is linear in t between knots. One more knot,
    (t = 0, log α = 0), is the clean data (ᾱ_{−1} = 1), so t = 0 means σ = 0 exactly; above t = 1 the last
    segment is extended. The network's time input is N·t − 1, a float in [0, N − 1].
    """

    def __init__(self, alphas_cumprod: np.ndarray, description: Mapping[str, Any]):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2 or not np.all(np.isfinite(ac)):
            raise NoiseScheduleError("alphas_cumprod must be a finite 1-D array with at least 2 entries")
        if not (np.all(ac > 0) and np.all(ac <= 1) and np.all(np.diff(ac) < 0)):
            raise NoiseScheduleError(
                "alphas_cumprod must decrease strictly and stay in (0, 1]; a zero terminal SNR "
                "(rescale_betas_zero_snr) is not supported"
            )
        self.num_train_timesteps = ac.size
        self.alphas_cumprod = ac
        self._knots_t = np.concatenate([[0.0], np.arange(1, ac.size + 1) / ac.size])
        self._knots_log_alpha = np.concatenate([[0.0], 0.5 * np.log(ac)])
        self._description = dict(description)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> DiscreteVP:
        """Build from a diffusers scheduler config (any scheduler of the DDPM family).

        By default ᾱ is computed as the training code computed it (float32 betas and cumulative product,
        as diffusers does), so the noise levels are the ones the network saw. `precision: "float64"` in
        the config computes betas and ᾱ in float64 instead (DPM-Solver's construction).
        """
        n = _config_number(config, "num_train_timesteps", 1000, integer=True, low=2)
        if config.get("rescale_betas_zero_snr", False):
            raise NoiseScheduleError("rescale_betas_zero_snr=True (zero terminal SNR) is not supported")
        precision = config.get("precision", "float32")
        if precision not in ("float32", "float64"):
            raise NoiseScheduleError(f"precision must be 'float32' or 'float64', got {precision!r}")
        dtype = torch.float32 if precision == "float32" else torch.float64
        trained = config.get("trained_betas")
        schedule = config.get("beta_schedule", "linear")
        start, end = (
            _config_number(config, "beta_start", 1e-4, below=1.0),
            _config_number(config, "beta_end", 0.02, below=1.0),
        )
        if trained is not None:
            if not isinstance(trained, (list, tuple)) or len(trained) < 2:
                raise NoiseScheduleError(f"trained_betas must be a list of at least 2 numbers, got {trained!r}")
            betas = torch.tensor([_number(b, "trained_betas", below=1.0) for b in trained], dtype=dtype)
            description: dict[str, Any] = {"trained_betas": betas.tolist()}
            n = betas.numel()
        elif schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=dtype)
            description = {"beta_schedule": schedule, "beta_start": start, "beta_end": end}
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=dtype) ** 2
            description = {"beta_schedule": schedule, "beta_start": start, "beta_end": end}
        elif schedule == "squaredcos_cap_v2":
            betas = torch.tensor(_cosine_betas(n), dtype=dtype)
            description = {"beta_schedule": schedule}
        else:
            raise NoiseScheduleError(
                f"beta_schedule {schedule!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
            )
        if precision == "float64":
            description["precision"] = "float64"
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).double().numpy()
        return cls(alphas_cumprod, {"kind": "discrete_vp", "num_train_timesteps": n, **description})

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return _interp_extrapolate(t, self._knots_t, self._knots_log_alpha)

    def t_of_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        log_alpha = np.asarray(log_alpha, dtype=np.float64)
        # log α decreases in t: interpolate on the reversed knots.
        return _interp_extrapolate(log_alpha, self._knots_log_alpha[::-1], self._knots_t[::-1])

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps - 1.0

    def timestep_to_t(self, timestep: ArrayLike) -> np.ndarray:
        """Integer (or float) training timestep n → continuous t = (n + 1)/N."""
        return (np.asarray(timestep, dtype=np.float64) + 1.0) / self.num_train_timesteps

    def torch_log_alpha(self) -> torch.nn.Module:
        return PiecewiseLinear(self._knots_t, self._knots_log_alpha)

    def torch_t_of_log_alpha(self) -> torch.nn.Module:
        return PiecewiseLinear(self._knots_log_alpha[::-1].copy(), self._knots_t[::-1].copy())

    def default_t_end(self, n_steps: int) -> float:
        return 1.0 / self.num_train_timesteps

    def to_dict(self) -> dict[str, Any]:
        return dict(self._description)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._description.items() if k != "trained_betas"}
        return f"DiscreteVP({shown})"


class LinearVP(VariancePreserving):
    """The continuous linear VP SDE: log α(t) = −¼ t² (β₁ − β₀) − ½ t β₀.

    `time_scale` maps t to the network input (ScoreSDE's continuous VP models take 999·t).
    """

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, time_scale: float = 999.0):
        if not (0 < beta_0 < beta_1):
            raise NoiseScheduleError(f"need 0 < beta_0 < beta_1, got beta_0={beta_0}, beta_1={beta_1}")
        self.beta_0, self.beta_1, self.time_scale = float(beta_0), float(beta_1), float(time_scale)

    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def t_of_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        # a t² + b t − c = 0 with c = −log α ≥ 0; this root form has no cancellation for small c.
        c = -np.asarray(log_alpha, dtype=np.float64)
        a, b = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0
        return 2.0 * c / (b + np.sqrt(b * b + 4.0 * a * c))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.time_scale

    def torch_log_alpha(self) -> torch.nn.Module:
        return _LinearVPLogAlpha(self.beta_0, self.beta_1)

    def torch_t_of_log_alpha(self) -> torch.nn.Module:
        return _LinearVPTime(self.beta_0, self.beta_1)

    def default_t_end(self, n_steps: int) -> float:
        return 1e-3 if n_steps <= 15 else 1e-4

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "linear_vp", "beta_0": self.beta_0, "beta_1": self.beta_1, "time_scale": self.time_scale}

    def __repr__(self) -> str:
        return f"LinearVP(beta_0={self.beta_0}, beta_1={self.beta_1})"


class _LinearVPLogAlpha(torch.nn.Module):
    def __init__(self, beta_0: float, beta_1: float):
        super().__init__()
        self.beta_0, self.beta_1 = beta_0, beta_1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0


class _LinearVPTime(torch.nn.Module):
    def __init__(self, beta_0: float, beta_1: float):
        super().__init__()
        self.beta_0, self.beta_1 = beta_0, beta_1

    def forward(self, log_alpha: torch.Tensor) -> torch.Tensor:
        c = -log_alpha
        a, b = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0
        return 2.0 * c / (b + torch.sqrt(b * b + 4.0 * a * c))


class RectifiedFlow(NoiseSchedule):
    """Rectified flow / flow matching: α = 1 − t, σ = t (t is diffusers' flow σ ∈ [0, 1]).

    The network takes σ·N (`num_train_timesteps`, SD3 / FLUX convention) and predicts the velocity
    ε − x₀. The shift belongs to the model's sampling grids, not to the path: diffusers shifts every
    grid by σ' = s·σ/(1 + (s − 1)σ), or, with dynamic shifting, by σ' = e^μ/(e^μ + 1/σ − 1) with a
    resolution-dependent μ (`mu_for`). At t = 1 (σ = 1, α = 0) λ = −∞: only a first-order step may
    start there, so the λ-uniform grids start at `t_start` = 1 − 1/N, where DPMSolverMultistepScheduler
    starts its flow sigmas.
    """

    family = "flow"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        mu: float | None = None,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
    ):
        self.num_train_timesteps = _number(num_train_timesteps, "num_train_timesteps", integer=True, low=2)
        self.shift = _number(shift, "shift")
        if time_shift_type not in ("exponential", "linear"):
            raise NoiseScheduleError(f"time_shift_type: must be 'exponential' or 'linear', got {time_shift_type!r}")
        if not isinstance(use_dynamic_shifting, bool):
            raise NoiseScheduleError(f"use_dynamic_shifting: must be true or false, got {use_dynamic_shifting!r}")
        self.use_dynamic_shifting, self.time_shift_type = use_dynamic_shifting, time_shift_type
        self.mu = None if mu is None else _number(mu, "mu", low=-math.inf)
        if self.mu is not None and time_shift_type == "linear" and self.mu <= 0:
            raise NoiseScheduleError(f"mu: a linear time shift needs mu > 0, got {mu!r}")
        self.dynamic = {
            "base_shift": _number(base_shift, "base_shift", low=-math.inf),
            "max_shift": _number(max_shift, "max_shift", low=-math.inf),
            "base_image_seq_len": _number(base_image_seq_len, "base_image_seq_len", integer=True, low=1),
            "max_image_seq_len": _number(max_image_seq_len, "max_image_seq_len", integer=True, low=2),
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], mu: float | None = None) -> RectifiedFlow:
        """From a `FlowMatchEulerDiscreteScheduler` config (or a multistep scheduler's `use_flow_sigmas` /
        `flow_shift` config); `mu` is the dynamic shift of one resolution (see `mu_for`)."""
        unsupported = [
            k
            for k in (
                "invert_sigmas",
                "shift_terminal",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            )
            if config.get(k)
        ]
        if unsupported:
            raise NoiseScheduleError(f"flow scheduler options not supported: {', '.join(unsupported)}")
        shift = config.get("shift", config.get("flow_shift", 1.0))
        keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            shift=shift,
            use_dynamic_shifting=config.get("use_dynamic_shifting", False),
            time_shift_type=config.get("time_shift_type", "exponential"),
            mu=config.get("mu", mu),
            **{k: config[k] for k in keys if config.get(k) is not None},
        )

    def mu_for(self, image_seq_len: int) -> float:
        """FLUX's resolution-dependent μ: linear in the number of image tokens between the base and max shift."""
        d = self.dynamic
        slope = (d["max_shift"] - d["base_shift"]) / (d["max_image_seq_len"] - d["base_image_seq_len"])
        return float(image_seq_len * slope + d["base_shift"] - slope * d["base_image_seq_len"])

    def with_mu(self, mu: float) -> RectifiedFlow:
        return RectifiedFlow(**{**self._arguments(), "mu": mu})

    def shifted(self, s: ArrayLike) -> np.ndarray:
        """diffusers' time shift of unshifted sigmas s (static shift, or dynamic with this path's μ)."""
        s = np.asarray(s, dtype=np.float64)
        if not self.use_dynamic_shifting:
            return self.shift * s / (1.0 + (self.shift - 1.0) * s)
        scale = self._dynamic_scale()
        with np.errstate(divide="ignore"):
            return np.where(s > 0, scale / (scale + (1.0 / np.where(s > 0, s, 1.0) - 1.0)), 0.0)

    def unshifted(self, sigma: ArrayLike) -> np.ndarray:
        """The inverse of `shifted`: the sigmas to hand diffusers so that its shift lands on `sigma`."""
        sigma = np.asarray(sigma, dtype=np.float64)
        scale = self._dynamic_scale() if self.use_dynamic_shifting else self.shift
        with np.errstate(divide="ignore"):
            return np.where(sigma > 0, 1.0 / (1.0 + scale * (1.0 / np.where(sigma > 0, sigma, 1.0) - 1.0)), 0.0)

    def _dynamic_scale(self) -> float:
        if self.mu is None:
            raise NoiseScheduleError(
                "this flow model shifts its sigmas dynamically: give mu (e.g. noise.with_mu(noise.mu_for(image_seq_len)))"
            )
        return math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return 1.0 - np.asarray(t, dtype=np.float64)

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return np.asarray(t, dtype=np.float64).copy()

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.log1p(-t) - np.log(t)

    def t_of_lambda(self, lam: ArrayLike) -> np.ndarray:
        """t = 1/(1 + e^λ), the logistic of −λ."""
        lam = np.asarray(lam, dtype=np.float64)
        return np.exp(-np.logaddexp(0.0, lam))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps

    def torch_alpha_sigma(self) -> torch.nn.Module:
        return _FlowAlphaSigma()

    def torch_lambda(self, t: torch.Tensor) -> torch.Tensor:
        return torch.log1p(-t) - torch.log(t)

    def torch_t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-lam)

    def torch_alpha_sigma_of_lambda(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(lam), torch.sigmoid(-lam)

    @property
    def t_start(self) -> float:
        return 1.0 - 1.0 / self.num_train_timesteps

    def default_t_end(self, n_steps: int) -> float:
        return 1.0 / self.num_train_timesteps

    def _arguments(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "shift": self.shift,
            "use_dynamic_shifting": self.use_dynamic_shifting,
            "time_shift_type": self.time_shift_type,
            "mu": self.mu,
            **self.dynamic,
        }

    def to_dict(self) -> dict[str, Any]:
        described = {k: v for k, v in self._arguments().items() if v is not None}
        if not self.use_dynamic_shifting:
            for key in ("time_shift_type", *self.dynamic):
                described.pop(key)
        return {"kind": "rectified_flow", **described}

    def __repr__(self) -> str:
        shift = f"mu={self.mu}" if self.use_dynamic_shifting else f"shift={self.shift}"
        return f"RectifiedFlow({shift})"


class _FlowAlphaSigma(torch.nn.Module):
    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 - t, t


class KarrasVE(NoiseSchedule):
    """EDM (Karras et al. 2022) / variance exploding: α = 1, σ = σ_max·t, so t ∈ [0, 1] as on every path
    and λ = −ln σ.

    The network is preconditioned: it sees c_in·x with c_in = 1/√(σ² + σ_d²) and c_noise = ¼ ln σ, and
    the denoised sample is c_skip·x + c_out·F (`preconditioning`). x_T is drawn with standard
    deviation σ(t_start).
    """

    family = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0):
        self.sigma_min = _number(sigma_min, "sigma_min")
        self.sigma_max = _number(sigma_max, "sigma_max")
        if self.sigma_min >= self.sigma_max:
            raise NoiseScheduleError(f"need sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_data = _number(sigma_data, "sigma_data")
        self.rho = _number(rho, "rho")

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> KarrasVE:
        """From an `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` config."""
        if config.get("sigma_schedule", "karras") != "karras":
            raise NoiseScheduleError(f"sigma_schedule: only 'karras' is supported, got {config['sigma_schedule']!r}")
        return cls(
            _config_number(config, "sigma_min", 0.002),
            _config_number(config, "sigma_max", 80.0),
            _config_number(config, "sigma_data", 0.5),
            _config_number(config, "rho", 7.0),
        )

    def t_of_sigma(self, sigma: ArrayLike) -> np.ndarray:
        return np.asarray(sigma, dtype=np.float64) / self.sigma_max

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.ones_like(np.asarray(t, dtype=np.float64))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return self.sigma_max * np.asarray(t, dtype=np.float64)

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return -np.log(self.sigma(t))

    def t_of_lambda(self, lam: ArrayLike) -> np.ndarray:
        return np.exp(-np.asarray(lam, dtype=np.float64)) / self.sigma_max

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return 0.25 * torch.log(self.sigma_max * t)

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_in, c_skip, c_out) of EDM's ε-parameterised network at σ."""
        total = sigma**2 + self.sigma_data**2
        return total.rsqrt(), self.sigma_data**2 / total, sigma * self.sigma_data * total.rsqrt()

    def torch_alpha_sigma(self) -> torch.nn.Module:
        return _EDMAlphaSigma(self.sigma_max)

    def torch_lambda(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(self.sigma_max * t)

    def torch_t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.exp(-lam) / self.sigma_max

    def torch_alpha_sigma_of_lambda(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(lam), torch.exp(-lam)

    def prior_std(self, t: float) -> float:
        return float(self.sigma(t))

    def default_t_end(self, n_steps: int) -> float:
        return self.sigma_min / self.sigma_max

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "edm",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "rho": self.rho,
        }

    def __repr__(self) -> str:
        return f"KarrasVE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class _EDMAlphaSigma(torch.nn.Module):
    def __init__(self, sigma_max: float):
        super().__init__()
        self.sigma_max = sigma_max

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), self.sigma_max * t


def noise_schedule_from_dict(description: Mapping[str, Any]) -> NoiseSchedule:
    """Rebuild a noise schedule from `NoiseSchedule.to_dict()` output."""
    if not isinstance(description, Mapping):
        raise NoiseScheduleError(f"a noise schedule must be a mapping, got {type(description).__name__}")
    kind = description.get("kind")
    if kind == "discrete_vp":
        return DiscreteVP.from_diffusers_config(description)
    if kind == "linear_vp":
        return LinearVP(
            _config_number(description, "beta_0", None),
            _config_number(description, "beta_1", None),
            _config_number(description, "time_scale", 999.0),
        )
    if kind == "rectified_flow":
        return RectifiedFlow.from_diffusers_config(description)
    if kind == "edm":
        return KarrasVE.from_diffusers_config(description)
    raise NoiseScheduleError(
        f"unknown noise schedule kind {kind!r}; expected 'discrete_vp', 'linear_vp', 'rectified_flow' or 'edm'"
    )


def noise_schedule_from_diffusers_config(config: Mapping[str, Any], mu: float | None = None) -> NoiseSchedule:
    """The path a diffusers scheduler config describes: flow (FlowMatch*, `use_flow_sigmas`), EDM (EDM*)
    or a DDPM-family VP schedule."""
    name = str(config.get("_class_name", ""))
    # A scheduler's in-memory config (`pipe.scheduler.config`) has no _class_name: the keys only flow schedulers
    # (`shift`) and EDM-style ones (`sigma_data`) have tell the family.
    flow = name.startswith("FlowMatch") or (not name and "shift" in config)
    if flow or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return RectifiedFlow.from_diffusers_config(config, mu)
    if name.startswith("EDM") or (not name and "sigma_data" in config):
        return KarrasVE.from_diffusers_config(config)
    return DiscreteVP.from_diffusers_config(config)


def _config_number(config: Mapping[str, Any], key: str, default: float | None, **bounds: Any) -> Any:
    """config[key], or `default` (None: the key is required), checked by `_number`."""
    value = config.get(key, default)
    if value is None:
        raise NoiseScheduleError(f"{key}: required")
    return _number(value, key, **bounds)


def _number(value: Any, key: str, *, integer: bool = False, low: float = 0.0, below: float = math.inf) -> Any:
    """`value` as a finite number with low < value < below (low ≤ for integers); anything else is a
    NoiseScheduleError naming `key`."""
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or not ((low <= value if integer else low < value) and value < below)
    ):
        wanted = f"an integer ≥ {low:g}" if integer else f"a number in ({low:g}, {below:g})"
        raise NoiseScheduleError(f"{key}: must be {wanted}, got {value!r}")
    return value if integer else float(value)


def _interp_extrapolate(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """np.interp with linear extrapolation beyond the end knots (xs increasing)."""
    y = np.interp(x, xs, ys)
    lo, hi = x < xs[0], x > xs[-1]
    if np.any(lo):
        y = np.where(lo, ys[0] + (x - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]), y)
    if np.any(hi):
        y = np.where(hi, ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), y)
    return y


def _cosine_betas(n: int, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal's squaredcos_cap_v2 betas, in float64 (cast by the caller, as diffusers does)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
