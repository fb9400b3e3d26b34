"""AutoDiffusion-style block skipping for diffusers UNets, and a multiply-accumulate (MAC) cost model.

A UNet's prunable units are the resnet and attention/transformer blocks of its down, mid and up blocks.
`with skipping(unet, names):` makes the named units return their shortcut path for the calls made in
the current thread/context only; `unit_costs` says how many MACs skipping each unit saves.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SolversearchError

__all__ = [
    "UnitCosts",
    "count_macs",
    "install",
    "measure_latency",
    "prunable_units",
    "skipping",
    "uninstall",
    "unit_costs",
]

# Module state is two ContextVars. This one holds the units skipped by the calls of the current
# context. A ContextVar is the thread-safe choice because every thread (and asyncio task) sees its own
# value: concurrent callers of the same model each get their own skip set without locks, a set activated
# in one thread can never leak into another, and the model object itself is never switched between modes.
_SKIPPED: ContextVar[frozenset[nn.Module]] = ContextVar("solversearch_skipped_units", default=frozenset())

# The MAC tally of a `count_macs`/`unit_costs` forward in progress. A ContextVar for the same reason:
# the counting hooks sit on a shared model, and forwards that other threads run meanwhile must not be
# counted.
_TALLY: ContextVar[_Tally | None] = ContextVar("solversearch_mac_tally", default=None)


# --- prunable units ----------------------------------------------------------------------------------


def prunable_units(unet: nn.Module) -> tuple[str, ...]:
    """Module paths of the prunable units of a diffusers UNet2DModel / UNet2DConditionModel, in forward order.

    Units are the `ResnetBlock2D`/`ResnetBlockCondNorm2D`, residual `Attention` and continuous-input
    `Transformer2DModel` entries of the `resnets`/`attentions` lists of `down_blocks`, `mid_block` and
    `up_blocks`. Up/downsamplers (resnet downsamplers included), conv_in/out and the time embedding are
    not units, nor are blocks whose skip is not an identity on a residual stream (`DualTransformer2DModel`,
    `KAttentionBlock`, a non-residual `Attention`).
    """
    return tuple(_unit_modules(unet))


def _unit_modules(unet: nn.Module) -> dict[str, nn.Module]:
    down = getattr(unet, "down_blocks", None)
    up = getattr(unet, "up_blocks", None)
    if down is None or up is None:
        raise SolversearchError(
            f"{type(unet).__name__} has no down_blocks/up_blocks: prunable units are defined for diffusers "
            "UNet2DModel and UNet2DConditionModel"
        )
    blocks: list[tuple[str, nn.Module, bool]] = [(f"down_blocks.{i}", b, False) for i, b in enumerate(down)]
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        blocks.append(("mid_block", mid, True))
    blocks += [(f"up_blocks.{i}", b, False) for i, b in enumerate(up)]

    units: dict[str, nn.Module] = {}
    for prefix, block, is_mid in blocks:
        resnets = list(getattr(block, "resnets", None) or ())
        attentions = list(getattr(block, "attentions", None) or ())
        # Order follows the blocks' forward loops: down/up blocks run resnet i then attention i; mid blocks
        # run resnet 0, then attention i and resnet i + 1.
        if is_mid:
            order = [("resnets", 0)] + [
                pair
                for i in range(max(len(attentions), len(resnets) - 1))
                for pair in (("attentions", i), ("resnets", i + 1))
            ]
        else:
            order = [
                pair for i in range(max(len(resnets), len(attentions))) for pair in (("resnets", i), ("attentions", i))
            ]
        for kind, i in order:
            members = resnets if kind == "resnets" else attentions
            if i < len(members) and _unit_kind(members[i]) is not None:
                units[f"{prefix}.{kind}.{i}"] = members[i]
    return units


def _unit_kind(module: nn.Module | None) -> str | None:
    """ "resnet", "attention", "transformer", or None when the module is not a prunable unit."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    if isinstance(module, ResnetBlock2D | ResnetBlockCondNorm2D):
        return "resnet"
    # Added-KV processors (SimpleCrossAttn blocks) always add the residual; otherwise only an Attention
    # with residual_connection has a residual stream to fall back on.
    if isinstance(module, Attention) and (module.residual_connection or module.added_kv_proj_dim is not None):
        return "attention"
    if isinstance(module, Transformer2DModel) and module.is_input_continuous:
        return "transformer"
    return None


# --- skipping ------------------------------------------------------------------------------------------


def _skip_output(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `module(*args, **kwargs)` returns with the unit's residual branch removed."""
    kind = _unit_kind(module)
    if kind == "resnet":
        # Mirrors ResnetBlock2D.forward's shortcut: the internal up/downsample (none in the resnets of
        # diffusers' standard blocks, but applied consistently if present), conv_shortcut, then the same
        # division by output_scale_factor the full block applies to shortcut + residual.
        x = args[0] if args else kwargs["input_tensor"]
        if module.upsample is not None:
            x = module.upsample(x)
        elif module.downsample is not None:
            x = module.downsample(x)
        if module.conv_shortcut is not None:
            x = module.conv_shortcut(x)
        return x / module.output_scale_factor
    if kind == "attention":
        x = args[0] if args else kwargs["hidden_states"]
        # The standard processors return (attention + residual) / rescale_output_factor, so the skip keeps
        # the rescaling (a no-op at diffusers' default of 1); the added-KV processors never rescale.
        return x / module.rescale_output_factor if module.residual_connection else x
    if kind == "transformer":
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        x = bound.arguments["hidden_states"]
        if not bound.arguments.get("return_dict", True):
            return (x,)  # the Cross-attention blocks call it with return_dict=False and take [0]
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=x)
    raise SolversearchError(f"{type(module).__name__} is not a prunable unit")


class _SkippableForward:
    """The forward installed on a unit: its skip path when the current context skips it, else the original.

    An object rather than a closure so that `copy.deepcopy` and pickling of the model rebind it to the
    copied module.
    """

    __slots__ = ("inner", "module")

    def __init__(self, module: nn.Module, inner: Any):
        self.module = module
        self.inner = inner  # a forward set on the instance before ours (e.g. by accelerate), else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if module in _SKIPPED.get():
            return _skip_output(module, args, kwargs)
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)


def install(unet: nn.Module) -> None:
    """Install the skip-aware forward on every unit of `unet`; idempotent, outputs unchanged.

    Without a lock: two threads installing at once can at worst wrap a unit twice, which behaves the
    same (the outer wrapper defers to the inner one), and `uninstall` removes every layer.
    """
    for module in _unit_modules(unet).values():
        current = module.__dict__.get("forward")
        if not isinstance(current, _SkippableForward):
            module.__dict__["forward"] = _SkippableForward(module, current)


def uninstall(unet: nn.Module) -> None:
    """Restore the original forwards of every module of `unet` (not while other threads are skipping)."""
    for module in unet.modules():
        while isinstance(current := module.__dict__.get("forward"), _SkippableForward):
            if current.inner is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = current.inner


def _resolve(unet: nn.Module, names: Iterable[str]) -> tuple[dict[str, nn.Module], frozenset[nn.Module]]:
    if isinstance(names, str):
        raise SolversearchError(f"skip must be a collection of unit names, not the string {names!r}")
    units = _unit_modules(unet)
    names = list(names)
    unknown = [name for name in names if name not in units]
    if unknown:
        valid = list(units)
        examples = ", ".join(valid[:4]) + (f", … ({len(valid)} in all)" if len(valid) > 4 else "")
        raise SolversearchError(
            f"unknown prunable unit{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
            f"{type(unet).__name__}; valid units include {examples or 'none'}"
        )
    return units, frozenset(units[name] for name in names)


@contextmanager
def skipping(unet: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Skip the named units of `unet` in the calls made inside the block, in this thread/context only.

    Replaces any skip set an enclosing `skipping` gave the same UNet (other models keep theirs); an
    empty set runs the full network bit for bit. Wrappers are installed on first use with a non-empty
    set. Gradient-checkpointed recomputation in backward runs outside the context: inference only.
    """
    units, selected = _resolve(unet, names)
    if any(not isinstance(m.__dict__.get("forward"), _SkippableForward) for m in selected):
        install(unet)
    outer = _SKIPPED.get()
    token = _SKIPPED.set(outer.difference(units.values()) | selected)
    try:
        yield
    finally:
        _SKIPPED.reset(token)


# --- cost model ------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, macs: int) -> None:
        self.total += macs
        self.by_module[path] = self.by_module.get(path, 0) + macs


@dataclass(frozen=True)
class UnitCosts:
    """MACs of one forward for one sample: `full` unpruned, `units[u]` saved by skipping unit u."""

    full: int
    units: dict[str, int]

    def cost(self, skip: Iterable[str] = ()) -> int:
        """MACs of a forward that skips `skip` (units' savings are additive: skips keep all shapes)."""
        skip = set(skip)
        unknown = sorted(skip.difference(self.units))
        if unknown:
            raise SolversearchError(f"unknown prunable units {unknown}; valid units include {list(self.units)[:4]}")
        return self.full - sum(self.units[u] for u in skip)

    def schedule_cost(self, schedule: Any) -> int:
        """MACs per sample of a whole schedule: its model evaluations, each with its step's skip set."""
        evaluated = schedule.steps[1:] if schedule.first_step == "analytic" else schedule.steps
        return sum(self.cost(step.skip) for step in evaluated)


def _tokens(x: torch.Tensor) -> int:
    return x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]


def _conv_hook(path: str):
    def hook(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        if (tally := _TALLY.get()) is not None:
            kh, kw = module.kernel_size
            tally.add(path, output.numel() * (module.in_channels // module.groups) * kh * kw)

    return hook


def _linear_hook(path: str):
    def hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        if (tally := _TALLY.get()) is not None:
            tally.add(path, output.numel() * module.in_features)

    return hook


def _attention_hook(path: str):
    """QKᵀ and AV: each L·L_kv·inner_dim MACs per sample, L query tokens and L_kv key/value tokens.

    The projections are Linear modules counted by their own hooks. L_kv is L for self-attention, the
    encoder's token count for cross-attention, and their sum for the added-KV processors (which
    concatenate encoder and self keys) unless only_cross_attention.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # The hook fires after a skipped forward too; a skipped attention ran no matmul.
        if (tally := _TALLY.get()) is None or module in _SKIPPED.get():
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        encoder = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        tokens = _tokens(hidden)
        if encoder is None:
            kv_tokens = tokens
        elif module.added_kv_proj_dim is not None and not module.only_cross_attention:
            kv_tokens = _tokens(encoder) + tokens
        else:
            kv_tokens = _tokens(encoder)
        tally.add(path, hidden.shape[0] * 2 * tokens * kv_tokens * module.inner_dim)

    return hook


def _forward_inputs(model: nn.Module, sample_shape: tuple[int, ...], batch: int, forward_kwargs: dict[str, Any]):
    parameter = next(model.parameters())
    x = torch.zeros((batch, *sample_shape), dtype=parameter.dtype, device=parameter.device)
    kwargs = dict(forward_kwargs)
    signature = inspect.signature(model.forward)
    required = [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if "timestep" in required and "timestep" not in kwargs:
        kwargs["timestep"] = torch.zeros(batch, device=parameter.device)  # MACs do not depend on its value
    missing = [name for name in required if name not in kwargs]
    if missing:
        raise SolversearchError(f"{type(model).__name__} needs {missing} to run; pass them as keyword arguments")
    return x, kwargs


def _counted_forward(
    model: nn.Module, sample_shape: tuple[int, ...], skip: Iterable[str], forward_kwargs: dict[str, Any]
) -> _Tally:
    from diffusers.models.attention_processor import Attention

    x, kwargs = _forward_inputs(model, tuple(sample_shape), 1, forward_kwargs)
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(_conv_hook(path)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(_linear_hook(path)))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_hook(_attention_hook(path), with_kwargs=True))
    skip = list(skip) if not isinstance(skip, str) else skip
    tally = _Tally()
    token = _TALLY.set(tally)
    try:
        with torch.no_grad(), skipping(model, skip) if skip else nullcontext():
            model(x, **kwargs)
    finally:
        _TALLY.reset(token)
        for handle in handles:
            handle.remove()
    return tally


def count_macs(model: nn.Module, sample_shape: tuple[int, ...], skip: Iterable[str] = (), **forward_kwargs: Any) -> int:
    """MACs of one forward of `model` on one sample of `sample_shape`, skipping the units `skip`.

    Counted with hooks on a dummy batch-1 forward: Conv2d out_elements·(in_channels/groups)·kh·kw,
    Linear out_elements·in_features, and per diffusers `Attention` call 2·L·L_kv·inner_dim for QKᵀ and
    AV (inner_dim = heads·dim_head; L_kv = L for self-attention). Norms, activations and elementwise
    ops are not counted. A `timestep` argument the forward requires is supplied; anything else the
    forward needs (e.g. encoder_hidden_states) goes in `forward_kwargs`.
    """
    return _counted_forward(model, sample_shape, skip, forward_kwargs).total


def unit_costs(unet: nn.Module, sample_shape: tuple[int, ...], **forward_kwargs: Any) -> UnitCosts:
    """The unpruned MACs and, per unit, the MACs its skip removes, from one counted forward.

    A unit's share is every MAC counted inside it minus what its skip path still runs (conv_shortcut;
    a resnet's internal up/downsample has no MACs), so `count_macs(skip={u}) == full - units[u]` is an
    independent check rather than a definition.
    """
    units = _unit_modules(unet)
    tally = _counted_forward(unet, sample_shape, (), forward_kwargs)

    def inside(path: str, prefix: str) -> bool:
        return path == prefix or path.startswith(prefix + ".")

    shares = {}
    for name in units:
        kept = [f"{name}.{part}" for part in ("conv_shortcut", "upsample", "downsample")]
        shares[name] = sum(
            macs
            for path, macs in tally.by_module.items()
            if inside(path, name) and not any(inside(path, k) for k in kept)
        )
    return UnitCosts(full=tally.total, units=shares)


def measure_latency(
    unet: nn.Module,
    sample_shape: tuple[int, ...],
    skip: Iterable[str] = (),
    batch: int = 8,
    repeats: int = 10,
    device: str | torch.device | None = None,
    **forward_kwargs: Any,
) -> float:
    """Seconds per sample of a forward at `batch`, median over `repeats` timed calls after one warm-up.

    For benchmarks. `device` moves the model there in place (as `nn.Module.to` does); tensors in
    `forward_kwargs` with batch 1 are repeated to `batch`.
    """
    if device is not None:
        unet.to(device)
    device = next(unet.parameters()).device
    forward_kwargs = {
        k: v.to(device).expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 1 else v
        for k, v in forward_kwargs.items()
    }
    x, kwargs = _forward_inputs(unet, tuple(sample_shape), batch, forward_kwargs)
    x = torch.randn_like(x)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    skip = list(skip)
    times = []
    with torch.no_grad(), skipping(unet, skip) if skip else nullcontext():
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            unet(x, **kwargs)
            sync()
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times) / batch
