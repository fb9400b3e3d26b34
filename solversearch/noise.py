"""VP noise schedules: α(t), σ(t), the half log-SNR λ(t), its inverse t(λ) and the network's time input.

Time is continuous, t ∈ [0, 1]: t = 1 is pure noise, t = 0 is clean data (α = 1, σ = 0 exactly). Host-side
functions work on float64 NumPy arrays (the sampler computes its coefficients with them once, before
its loop); `torch_log_alpha()` gives the same log α(t) as a torch module for denoisers that need α(t)
on the device inside the loop.
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


class NoiseSchedule(abc.ABC):
    """A variance-preserving forward process x_t = α(t) x_0 + σ(t) ε with α² + σ² = 1."""

    t_max: float = 1.0

    @abc.abstractmethod
    def log_alpha(self, t: ArrayLike) -> np.ndarray:
        """log α(t) in float64."""

    @abc.abstractmethod
    def t_of_log_alpha(self, log_alpha: ArrayLike) -> np.ndarray:
        """The inverse of `log_alpha`."""

    @abc.abstractmethod
    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network was trained with, for continuous t (e.g. 1000·t − 1)."""

    @abc.abstractmethod
    def torch_log_alpha(self) -> torch.nn.Module:
        """A module computing log α(t) on the device of its input (move it with `.to(device)`)."""

    @abc.abstractmethod
    def torch_t_of_log_alpha(self) -> torch.nn.Module:
        """The inverse of `torch_log_alpha` as a module: differentiable, so a sampler's times can be learned
        in log-SNR (see `refine.py`)."""

    def torch_t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """t(λ) in torch, differentiable in λ: log α = −½ log(1 + e^{−2λ})."""
        return self.torch_t_of_log_alpha()(-0.5 * torch.nn.functional.softplus(-2.0 * lam))

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description from which `noise_schedule_from_dict` rebuilds the schedule."""

    @abc.abstractmethod
    def default_t_end(self, n_steps: int) -> float:
        """The usual final time of a sampling grid with `n_steps` steps."""

    def alpha(self, t: ArrayLike) -> np.ndarray:
        return np.exp(self.log_alpha(t))

    def sigma(self, t: ArrayLike) -> np.ndarray:
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: ArrayLike) -> np.ndarray:
        """Half log-SNR λ = log(α/σ); +inf at t = 0."""
        log_alpha = self.log_alpha(t)
        with np.errstate(divide="ignore"):
            return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))

    def t_of_lambda(self, lam: ArrayLike) -> np.ndarray:
        """Inverse of λ(t): log α = −½ log(1 + e^{−2λ})."""
        lam = np.asarray(lam, dtype=np.float64)
        return self.t_of_log_alpha(-0.5 * np.logaddexp(0.0, -2.0 * lam))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(sorted(self.to_dict().items())))


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


class DiscreteVP(NoiseSchedule):
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
        start, end = _config_number(config, "beta_start", 1e-4, below=1.0), _config_number(config, "beta_end", 0.02, below=1.0)
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


class LinearVP(NoiseSchedule):
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


def noise_schedule_from_dict(description: Mapping[str, Any]) -> NoiseSchedule:
    """Rebuild a noise schedule from `NoiseSchedule.to_dict()` output."""
    if not isinstance(description, Mapping):
        raise NoiseScheduleError(f"a noise schedule must be a mapping, got {type(description).__name__}")
    kind = description.get("kind")
    if kind == "discrete_vp":
        return DiscreteVP.from_diffusers_config(description)
    if kind == "linear_vp":
        return LinearVP(_config_number(description, "beta_0", None), _config_number(description, "beta_1", None),
                        _config_number(description, "time_scale", 999.0))
    raise NoiseScheduleError(f"unknown noise schedule kind {kind!r}; expected 'discrete_vp' or 'linear_vp'")


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
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not (
        (low <= value if integer else low < value) and value < below
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
