"""Block skipping and the MAC cost model on tiny random diffusers UNets (both model classes)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from solversearch import DiscreteVP
from solversearch.errors import SolversearchError
from solversearch.models import UNetDenoiser, UnitCosts, count_macs, prunable_units, skipping, unit_costs
from solversearch.models.pruning import install, measure_latency, uninstall
from tests.conftest import make_tiny_unet

CROSS_DIM = 12


def make_tiny_cond_unet(seed: int = 0):
    """A small random UNet2DConditionModel with cross-attention down, mid and up blocks, float64."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=2,  # diffusers reads this as the number of heads in UNet2DConditionModel
        norm_num_groups=4,
    )
    return unet.double().eval()


class Case:
    """A tiny UNet with fixed inputs: `run()` is one forward in the calling context."""

    def __init__(self, unet: nn.Module, conditional: bool):
        self.unet = unet
        self.shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn((3, *self.shape), generator=generator, dtype=torch.float64)
        self.t = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64)
        self.kwargs = {}
        if conditional:
            context = torch.randn(3, 5, CROSS_DIM, generator=generator, dtype=torch.float64)
            self.kwargs["encoder_hidden_states"] = context

    def run(self, model: nn.Module | None = None) -> torch.Tensor:
        with torch.no_grad():
            return (model or self.unet)(self.x, self.t, **self.kwargs).sample

    def dummy_kwargs(self) -> dict:
        """Batch-1 conditioning for the cost model (two encoder tokens, so cross-attention is L×2)."""
        return {k: v[:1, :2] for k, v in self.kwargs.items()}


@pytest.fixture(params=["UNet2DModel", "UNet2DConditionModel"])
def case(request) -> Case:
    conditional = request.param == "UNet2DConditionModel"
    return Case(make_tiny_cond_unet() if conditional else make_tiny_unet(), conditional)


def expected_units(config) -> list[str]:
    """Units derived from the config: layers_per_block resnets per down block (+1 per up block), an
    attention after each where the block type has attention, and the mid block's resnet–attention–resnet."""
    names = []
    for prefix, types, layers in (
        ("down_blocks", config.down_block_types, config.layers_per_block),
        ("up_blocks", config.up_block_types, config.layers_per_block + 1),
    ):
        if prefix == "up_blocks":
            names += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
        for i, block_type in enumerate(types):
            for j in range(layers):
                names.append(f"{prefix}.{i}.resnets.{j}")
                if "Attn" in block_type:
                    names.append(f"{prefix}.{i}.attentions.{j}")
    return names


# --- 1. unit enumeration --------------------------------------------------------------------------------


def test_units_of_the_tiny_unet2dmodel_in_forward_order():
    assert prunable_units(make_tiny_unet()) == (
        "down_blocks.0.resnets.0",
        "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",
        "mid_block.resnets.1",
        "up_blocks.0.resnets.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
    )


def test_units_follow_the_config_and_survive_save_and_load(case, tmp_path):
    units = prunable_units(case.unet)
    assert list(units) == expected_units(case.unet.config)
    assert all(case.unet.get_submodule(name) is not None for name in units)
    install(case.unet)  # installed wrappers are not part of the saved model
    case.unet.save_pretrained(tmp_path)
    reloaded = type(case.unet).from_pretrained(tmp_path, low_cpu_mem_usage=False)
    assert prunable_units(reloaded) == units


def test_samplers_and_conv_io_are_not_units(case):
    units = prunable_units(case.unet)
    assert not any("samplers" in u or "conv_in" in u or "conv_out" in u or "time_embedding" in u for u in units)


def test_a_model_without_unet_structure_has_no_units():
    with pytest.raises(SolversearchError, match="UNet2DModel and UNet2DConditionModel"):
        prunable_units(nn.Linear(2, 2))


# --- 2. skipping nothing is the unpruned network --------------------------------------------------------


def test_installed_wrappers_with_an_empty_skip_set_are_bit_for_bit_the_model(case):
    reference = case.run()
    install(case.unet)
    install(case.unet)  # idempotent
    assert torch.equal(case.run(), reference)
    with skipping(case.unet, ()):
        assert torch.equal(case.run(), reference)
    uninstall(case.unet)
    assert not any("forward" in module.__dict__ for module in case.unet.modules())
    assert torch.equal(case.run(), reference)


# --- 3. skip semantics -----------------------------------------------------------------------------------


def test_skipping_any_unit_changes_the_output_and_leaving_restores_it(case):
    reference = case.run()
    for unit in prunable_units(case.unet):
        with skipping(case.unet, [unit]):
            skipped = case.run()
        assert not torch.allclose(skipped, reference, rtol=0, atol=1e-9), unit
        assert torch.equal(case.run(), reference), unit


def shortcut_forward(block):
    """A resnet replaced by its shortcut path, written out by hand."""
    return lambda input_tensor, temb, *args, **kwargs: block.conv_shortcut(input_tensor) / block.output_scale_factor


def test_skipped_units_equal_hand_written_shortcuts_and_identities(case):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    reference_model = copy.deepcopy(case.unet)
    resnet, attention = "down_blocks.1.resnets.0", "down_blocks.1.attentions.0"
    block = reference_model.get_submodule(resnet)
    assert block.conv_shortcut is not None  # 8 → 16 channels
    block.forward = shortcut_forward(block)
    attn = reference_model.get_submodule(attention)
    if case.kwargs:  # Transformer2DModel, called with return_dict=False by CrossAttn blocks

        def identity(hidden_states, *args, return_dict=True, **kwargs):
            return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)

        attn.forward = identity
    else:  # Attention with residual_connection and the default rescale_output_factor 1
        assert attn.rescale_output_factor == 1.0
        attn.forward = lambda hidden_states, *args, **kwargs: hidden_states
    with skipping(case.unet, [resnet, attention]):
        assert torch.equal(case.run(), case.run(reference_model))


class OneBlock(nn.Module):
    """The smallest module with UNet structure: one down block holding one unit."""

    def __init__(self, unit: nn.Module, kind: str):
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module()])
        self.up_blocks = nn.ModuleList()
        setattr(self.down_blocks[0], kind, nn.ModuleList([unit]))


def resnet_variants():
    from diffusers.models.resnet import ResnetBlock2D

    common = {"temb_channels": 6, "groups": 2}
    return {
        "shortcut": ResnetBlock2D(in_channels=4, out_channels=8, **common),
        "identity": ResnetBlock2D(in_channels=4, out_channels=4, **common),
        "scaled": ResnetBlock2D(in_channels=4, out_channels=8, output_scale_factor=2.0, **common),
        "down": ResnetBlock2D(in_channels=4, out_channels=8, down=True, **common),
        "up": ResnetBlock2D(in_channels=4, out_channels=4, up=True, output_scale_factor=2.0, **common),
        "fir-down": ResnetBlock2D(in_channels=4, out_channels=8, down=True, kernel="fir", **common),
        "sde_vp-up": ResnetBlock2D(in_channels=4, out_channels=8, up=True, kernel="sde_vp", **common),
    }


@pytest.mark.parametrize("variant", list(resnet_variants()))
def test_a_skipped_resnet_is_the_block_with_its_residual_branch_zeroed(variant):
    torch.manual_seed(0)
    block = resnet_variants()[variant].double().eval()
    holder = OneBlock(block, "resnets")
    x, temb = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    with torch.no_grad():
        full = block(x, temb)
        nn.init.zeros_(block.conv2.weight)
        nn.init.zeros_(block.conv2.bias)
        zeroed = block(x, temb)
        with skipping(holder, ["down_blocks.0.resnets.0"]):
            skipped = block(x, temb)
    assert torch.equal(skipped, zeroed)
    assert not torch.allclose(full, zeroed)


def attention_variants():
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    context = {"encoder_hidden_states": torch.randn(2, 3, CROSS_DIM)}
    # as in UNet2DModel's blocks, with the rescaling a mid_block_scale_factor of 2 gives
    unet2d = Attention(
        8,
        heads=2,
        dim_head=4,
        norm_num_groups=2,
        residual_connection=True,
        bias=True,
        rescale_output_factor=2.0,
        _from_deprecated_attn_block=True,
    )
    # as in SimpleCrossAttn blocks: the processor adds the residual itself
    added_kv = Attention(
        query_dim=8,
        cross_attention_dim=8,
        heads=2,
        dim_head=4,
        added_kv_proj_dim=CROSS_DIM,
        norm_num_groups=2,
        bias=True,
        processor=AttnAddedKVProcessor2_0(),
    )
    # as in CrossAttn blocks, which call it with return_dict=False
    transformer = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2, cross_attention_dim=CROSS_DIM
    )
    return {
        "unet2d": (unet2d, {}, lambda m: m.to_out[0]),
        "added_kv": (added_kv, context, lambda m: m.to_out[0]),
        "transformer": (transformer, dict(context, return_dict=False), lambda m: m.proj_out),
    }


@pytest.mark.parametrize("variant", ["unet2d", "added_kv", "transformer"])
def test_a_skipped_attention_is_the_block_with_its_residual_branch_zeroed(variant):
    torch.manual_seed(0)
    block, kwargs, last_layer = attention_variants()[variant]
    block = block.double().eval()
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    holder = OneBlock(block, "attentions")
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        full = block(x, **kwargs)
        nn.init.zeros_(last_layer(block).weight)
        nn.init.zeros_(last_layer(block).bias)
        zeroed = block(x, **kwargs)
        with skipping(holder, ["down_blocks.0.attentions.0"]):
            skipped = block(x, **kwargs)
    assert type(skipped) is type(zeroed)
    if isinstance(zeroed, tuple):
        (full, zeroed, skipped) = (full[0], zeroed[0], skipped[0])
    assert torch.equal(skipped, zeroed)
    assert not torch.allclose(full, zeroed)


def test_nested_contexts_replace_the_set_per_model_and_restore_on_exit(case):
    units = prunable_units(case.unet)
    other = Case(copy.deepcopy(case.unet), bool(case.kwargs))
    reference = case.run()
    with skipping(case.unet, [units[0]]):
        outer = case.run()
        with skipping(other.unet, [units[1]]):  # another model: its own set, ours unchanged
            assert torch.equal(case.run(), outer)
            with skipping(case.unet, [units[2]]):
                inner = case.run()
            with skipping(case.unet, []):
                assert torch.equal(case.run(), reference)
        assert torch.equal(case.run(), outer)
    with skipping(case.unet, [units[2]]):
        assert torch.equal(case.run(), inner)
    assert torch.equal(case.run(), reference)


def test_a_deep_copy_of_an_installed_model_skips_independently(case):
    unit = prunable_units(case.unet)[0]
    reference = case.run()
    install(case.unet)
    twin = copy.deepcopy(case.unet)
    with skipping(case.unet, [unit]):
        skipped = case.run()
        assert torch.equal(case.run(twin), reference)
    with skipping(twin, [unit]):
        assert torch.equal(case.run(twin), skipped)
        assert torch.equal(case.run(), reference)


# --- 4. cost model -----------------------------------------------------------------------------------


def test_count_macs_of_convolutions_matches_the_formula():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, stride=2, padding=1, groups=2))
    first = (8 * 10 * 12) * 3 * 3 * 3  # out elements · in_channels · kh · kw
    second = (4 * 5 * 6) * (8 // 2) * 3 * 3  # stride 2 halves H and W; groups split the inputs
    assert count_macs(model, (3, 10, 12)) == first + second


def test_count_macs_of_attention_matches_the_formula():
    from diffusers.models.attention_processor import Attention

    self_attention = Attention(8, heads=2, dim_head=4, residual_connection=True, bias=True)
    tokens, inner = 4 * 5, 2 * 4
    projections = 3 * tokens * 8 * inner + tokens * inner * 8  # q, k, v in; out
    assert count_macs(self_attention, (8, 4, 5)) == projections + 2 * tokens * tokens * inner

    cross = Attention(8, cross_attention_dim=CROSS_DIM, heads=2, dim_head=4)
    context = torch.zeros(1, 3, CROSS_DIM)
    projections = tokens * 8 * inner + 2 * 3 * CROSS_DIM * inner + tokens * inner * 8
    assert count_macs(cross, (tokens, 8), encoder_hidden_states=context) == projections + 2 * tokens * 3 * inner


def test_each_units_share_is_what_skipping_it_saves(case):
    kwargs = case.dummy_kwargs()
    costs = unit_costs(case.unet, case.shape, **kwargs)
    assert isinstance(costs, UnitCosts)
    assert list(costs.units) == list(prunable_units(case.unet))
    assert costs.full == count_macs(case.unet, case.shape, **kwargs)
    for unit, share in costs.units.items():
        assert share > 0, unit
        assert count_macs(case.unet, case.shape, skip={unit}, **kwargs) == costs.full - share, unit
    everything = set(costs.units)
    assert costs.cost(everything) == count_macs(case.unet, case.shape, skip=everything, **kwargs) > 0
    assert costs.cost() == costs.full


def test_a_resnet_share_excludes_its_shortcut_convolution(case):
    costs = unit_costs(case.unet, case.shape, **case.dummy_kwargs())
    block = case.unet.get_submodule("down_blocks.1.resnets.0")
    side = case.shape[1] // 2  # after one downsampler
    conv1 = 16 * side * side * 8 * 9
    conv2 = 16 * side * side * 16 * 9
    time_projection = 16 * block.time_emb_proj.in_features
    assert costs.units["down_blocks.1.resnets.0"] == conv1 + conv2 + time_projection


def test_unit_costs_reject_unknown_units(case):
    costs = unit_costs(case.unet, case.shape, **case.dummy_kwargs())
    with pytest.raises(SolversearchError, match="no_such_block"):
        costs.cost(["no_such_block"])


def test_a_conditional_unet_needs_its_encoder_states_to_be_counted():
    unet = make_tiny_cond_unet()
    with pytest.raises(SolversearchError, match="encoder_hidden_states"):
        count_macs(unet, (2, 8, 8))


def test_measure_latency_returns_seconds_per_sample(case):
    seconds = measure_latency(
        case.unet, case.shape, skip=prunable_units(case.unet)[:2], batch=2, repeats=2, **case.dummy_kwargs()
    )
    assert 0 < seconds < 10


# --- 5. thread safety --------------------------------------------------------------------------------------


def test_concurrent_callers_each_get_their_own_skip_set(case):
    units = prunable_units(case.unet)
    skip_sets = [(units[1],), (units[4], units[-1]), ()]
    expected = []
    for skip in skip_sets:
        with skipping(case.unet, skip):
            expected.append(case.run())
    assert not torch.equal(expected[0], expected[1])
    barrier = threading.Barrier(len(skip_sets))
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            for repeat in range(20):
                if skip_sets[index]:
                    with skipping(case.unet, skip_sets[index]):
                        out = case.run()
                else:  # no context at all: the unpruned network
                    out = case.run()
                if not torch.equal(out, expected[index]):
                    failures.append(f"thread {index}, call {repeat}: wrong output")
            if not torch.equal(case.run(), expected[-1]):
                failures.append(f"thread {index}: still pruned after leaving the context")
        except Exception as exc:  # noqa: BLE001 — reported to the main thread
            failures.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(skip_sets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    assert torch.equal(case.run(), expected[-1])


# --- 6. errors ------------------------------------------------------------------------------------------


def test_unknown_unit_names_are_user_errors_naming_them_and_valid_units(case):
    message = r"'down_blocks\.9\.resnets\.0'.*valid units include down_blocks\.0\.resnets\.0"
    with (
        pytest.raises(SolversearchError, match=message),
        skipping(case.unet, ["down_blocks.1.resnets.0", "down_blocks.9.resnets.0"]),
    ):
        pass
    with pytest.raises(SolversearchError, match="not the string"), skipping(case.unet, "down_blocks.0.resnets.0"):
        pass
    assert torch.equal(case.run(), Case(copy.deepcopy(case.unet), bool(case.kwargs)).run())


# --- 7. the denoiser -------------------------------------------------------------------------------------


def test_the_denoiser_skips_the_units_a_step_names(case):
    noise = DiscreteVP.from_diffusers_config({})
    denoiser = UNetDenoiser(case.unet, noise)
    unit = "down_blocks.1.resnets.0"
    x = case.x
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert denoiser.units == prunable_units(case.unet)
    with skipping(case.unet, {unit}):
        expected = denoiser(x, t, **case.kwargs)
    skipped = denoiser(x, t, skip=(unit,), **case.kwargs)
    assert torch.equal(skipped, expected)
    full = denoiser(x, t, skip=(), **case.kwargs)
    assert torch.equal(full, denoiser(x, t, **case.kwargs))
    assert not torch.allclose(skipped, full)
    with pytest.raises(SolversearchError, match="no_such_block"):
        denoiser(x, t, skip=("no_such_block",), **case.kwargs)


def test_the_denoiser_caches_its_unit_costs(case):
    denoiser = UNetDenoiser(case.unet, DiscreteVP.from_diffusers_config({}))
    costs = denoiser.unit_costs()
    assert denoiser.unit_costs() is costs
    dummy = {"encoder_hidden_states": torch.zeros(1, 1, CROSS_DIM, dtype=torch.float64)} if case.kwargs else {}
    assert costs == unit_costs(case.unet, case.shape, **dummy)
