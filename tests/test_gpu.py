"""GPU paths: the sampler on CUDA, with no host–device synchronisation inside its loop; the evaluator's
batch probe and mixed precision. Skipped where no CUDA device is present (CI has none); run on a GPU
machine with `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import statistics
from dataclasses import replace

import pytest
import torch

from solversearch import presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model
from solversearch.plan import compile_plan
from solversearch.sampler import execute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# One preset of every mechanism: multistep data prediction, third order with its second derivative,
# UniC with bh2 scaling, noise prediction, and the analytic first step.
MECHANISMS = ["dpmpp_2m", "dpmpp_3m", "unipc_2_bh2", "unipc_2_bh1_noise", "deis_3", "ddim"]


@pytest.fixture(scope="module")
def digits_unet():
    return load_model("bundled:digits", "cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 convolutions would make CUDA differ from the CPU by ~1e-3; compare true float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("preset", MECHANISMS)
def test_the_step_loop_never_synchronises_with_the_host(digits_unet, preset):
    """torch raises on any implicit device→host copy (`.item()`, a Python branch on a tensor, …) in
    'error' sync-debug mode; the loop, the network included, must run start to end without one."""
    noise = digits_unet.noise_schedule
    plan = compile_plan(presets.build(preset, noise, 6, "logsnr"), noise)
    x_T = torch.randn(64, *digits_unet.sample_shape, device="cuda")
    execute(plan, digits_unet.denoiser, x_T)  # warm-up: cuDNN autotuning may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            sample = execute(plan, digits_unet.denoiser, x_T).sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sample.device.type == "cuda" and bool(torch.isfinite(sample).all())


@pytest.mark.parametrize("preset", MECHANISMS)
def test_cuda_and_cpu_give_the_same_samples(digits_unet, preset):
    """Same plan, same x_T: float32 on the GPU agrees with float32 on the CPU to rounding."""
    noise = digits_unet.noise_schedule
    plan = compile_plan(presets.build(preset, noise, 6, "logsnr"), noise)
    x_T = torch.randn(32, *digits_unet.sample_shape, generator=torch.Generator().manual_seed(1))
    cpu = load_model("bundled:digits", "cpu")
    with torch.no_grad():
        on_cpu = execute(plan, cpu.denoiser, x_T).sample
        on_gpu = execute(plan, digits_unet.denoiser, x_T.cuda()).sample.cpu()
    assert torch.allclose(on_gpu, on_cpu, rtol=0, atol=1e-4 * on_cpu.abs().max().item())


def test_the_batch_probe_finds_a_batch_that_runs_and_never_exceeds_n(digits_unet, tmp_path):
    evaluator = Evaluator(
        digits_unet,
        EvaluationSettings(n=3000, batch_size=0, device="cuda", error_to_reference=False),
        ArrayCache(tmp_path),
    )
    assert 64 <= evaluator.batch_size <= 3000
    small = Evaluator(
        digits_unet,
        EvaluationSettings(n=100, batch_size=0, device="cuda", error_to_reference=False),
        ArrayCache(tmp_path),
    )
    assert small.batch_size == 100
    noise = digits_unet.noise_schedule
    result = evaluator.evaluate(presets.build("dpmpp_2m", noise, 5, "logsnr"))
    assert result.n == 3000 and not result.diverged


def test_mixed_precision_changes_the_proxy_fid_less_than_the_seed_does(digits_unet, tmp_path):
    """bf16 autocast perturbs the samples; on the same x_T its effect on the proxy FID must be smaller
    than the seed-to-seed spread of the float32 proxy FID, so it cannot reorder what noise does not."""
    schedule = presets.build("dpmpp_2m", digits_unet.noise_schedule, 5, "logsnr")
    exact, shifts = [], []
    for seed in range(3):
        settings = EvaluationSettings(n=2000, seed=seed, device="cuda", error_to_reference=False)
        fid = Evaluator(digits_unet, settings, ArrayCache(tmp_path)).evaluate(schedule).fid
        mixed = Evaluator(digits_unet, replace(settings, mixed_precision=True), ArrayCache(tmp_path)).evaluate(schedule)
        assert not mixed.diverged
        exact.append(fid)
        shifts.append(abs(mixed.fid - fid))
    assert max(shifts) < statistics.stdev(exact)
