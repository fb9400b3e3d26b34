"""Loading diffusers models from local directories, fingerprints, guidance and model specs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from solversearch import RectifiedFlow, presets, solve
from solversearch.errors import SolversearchError
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models import UNetDenoiser
from solversearch.models.spec import ModelHandle, load_model

from .conftest import make_tiny_conditional_unet, make_tiny_unet


def save_model(directory, unet, prediction_type="epsilon"):
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(prediction_type=prediction_type).save_pretrained(directory / "scheduler")
    return directory


def test_a_saved_model_loads_and_denoises_like_the_original(tmp_path):
    unet = make_tiny_unet().float()
    loaded = UNetDenoiser.from_pretrained(save_model(tmp_path, unet, "v_prediction"))
    direct = UNetDenoiser(unet, loaded.noise_schedule, "v_prediction")
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([0.3, 0.9])
    torch.testing.assert_close(loaded(x, t), direct(x, t))
    assert loaded.prediction_type == "v_prediction" and loaded.sample_shape == (2, 8, 8)


def test_a_pipeline_directory_loads(tmp_path):
    DDPMPipeline(
        unet=make_tiny_unet().float(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ).save_pretrained(tmp_path)
    loaded = UNetDenoiser.from_pretrained(tmp_path)
    assert loaded.noise_schedule.to_dict()["beta_schedule"] == "squaredcos_cap_v2"


def test_fingerprint_survives_save_and_load_and_tracks_weights(tmp_path):
    unet = make_tiny_unet().float()
    first = UNetDenoiser.from_pretrained(save_model(tmp_path / "a", unet))
    again = UNetDenoiser.from_pretrained(tmp_path / "a")
    assert first.fingerprint == again.fingerprint
    with torch.no_grad():
        next(unet.parameters()).add_(1e-3)
    changed = UNetDenoiser.from_pretrained(save_model(tmp_path / "b", unet))
    assert changed.fingerprint != first.fingerprint


def test_missing_files_are_user_errors(tmp_path):
    with pytest.raises(SolversearchError, match="config.json"):
        UNetDenoiser.from_pretrained(tmp_path)
    make_tiny_unet().float().save_pretrained(tmp_path / "unet")
    with pytest.raises(SolversearchError, match="scheduler_config.json"):
        UNetDenoiser.from_pretrained(tmp_path)
    (tmp_path / "scheduler").mkdir()
    for content in (b"{not json", b"\xff\xfe{}", b"[" * 100_000, b"[1, 2]"):
        (tmp_path / "scheduler" / "scheduler_config.json").write_bytes(content)
        with pytest.raises(SolversearchError, match="malformed|must be a JSON object"):
            UNetDenoiser.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"sample_size": "big"}, "sample_size"),
        ({"in_channels": -1}, "cannot load the UNet"),
        ({"_class_name": "Nope"}, "unsupported UNet class"),
    ],
)
def test_bad_values_in_a_model_config_are_user_errors(change, words, tmp_path):
    import json

    save_model(tmp_path, make_tiny_unet().float())
    config = tmp_path / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(SolversearchError, match=words):
        load_model(str(tmp_path))


def test_pickled_weights_are_never_loaded(tmp_path):
    """A model folder is often handed over: unpickling its .bin would run whatever code it holds."""
    unet = make_tiny_unet().float()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)
    DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    assert list((tmp_path / "unet").glob("*.bin"))
    with pytest.raises(SolversearchError, match="no .safetensors weights"):
        UNetDenoiser.from_pretrained(tmp_path)


def test_model_specs(tmp_path):
    with pytest.raises(SolversearchError, match="unknown model spec"):
        load_model("hub:stabilityai/sd")
    with pytest.raises(SolversearchError, match="does not exist"):
        load_model(str(tmp_path / "nothing"))
    handle = load_model(str(save_model(tmp_path / "m", make_tiny_unet().float())))
    assert handle.default_features == "inception" and handle.sample_shape == (2, 8, 8)
    with pytest.raises(SolversearchError, match="Inception"):
        Evaluator(handle, EvaluationSettings(n=4))


def test_bundled_digits_model_loads_from_the_package():
    handle = load_model("bundled:digits")
    assert handle.sample_shape == (1, 16, 16) and handle.default_features == "digits"
    assert handle.noise_schedule.to_dict() == {
        "kind": "discrete_vp",
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
    }
    assert handle.denoiser.prediction_type == "epsilon"
    assert load_model("bundled:digits").fingerprint == handle.fingerprint


def test_the_bundled_flow_model_loads_from_the_package_as_a_rectified_flow_with_velocity_prediction():
    handle = load_model("bundled:digits-flow")
    assert handle.spec == "bundled:digits-flow" and handle.sample_shape == (1, 16, 16)
    assert handle.default_features == "digits" and handle.reference_data is not None
    assert handle.noise_schedule == RectifiedFlow(num_train_timesteps=1000, shift=1.0)
    assert handle.denoiser.prediction_type == "flow_prediction"
    assert handle.fingerprint != load_model("bundled:digits").fingerprint


def test_a_missing_bundled_model_names_its_training_script(monkeypatch, tmp_path):
    from solversearch.models import spec

    monkeypatch.setitem(
        spec.BUNDLED, "bundled:digits-flow", (str(tmp_path / "gone"), "experiments/train_digits_flow_model.py")
    )
    monkeypatch.setattr(spec.resources, "files", lambda package: tmp_path)
    with pytest.raises(SolversearchError, match="bundled:digits-flow.*missing.*train_digits_flow_model.py"):
        load_model("bundled:digits-flow")


def test_classifier_free_guidance_combines_conditional_and_unconditional_eps(ddpm_noise):
    unet = make_tiny_conditional_unet()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.2, 0.5, 0.9])
    prompt, empty = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
    guided = UNetDenoiser(unet, ddpm_noise, guidance_scale=7.5).bind(
        encoder_hidden_states=prompt, negative_encoder_hidden_states=empty
    )
    plain = UNetDenoiser(unet, ddpm_noise)
    cond = plain(x, t, encoder_hidden_states=prompt)
    uncond = plain(x, t, encoder_hidden_states=empty)
    torch.testing.assert_close(guided(x, t), uncond + 7.5 * (cond - uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(SolversearchError, match="negative"):
        UNetDenoiser(unet, ddpm_noise, guidance_scale=3.0)(x, t, encoder_hidden_states=prompt)


def test_evaluator_gives_every_schedule_the_same_prompts(ddpm_noise, tmp_path):
    """Common random numbers include the conditioning: two evaluations of one schedule agree exactly,
    and the conditional model sees the prompts drawn by the seed."""
    from solversearch.metrics.reference import ArrayCache

    unet = make_tiny_conditional_unet()
    bank = torch.randn(6, 5, 12)
    handle = ModelHandle(
        spec="tiny-sd",
        denoiser=UNetDenoiser(unet, ddpm_noise, guidance_scale=2.0),
        sample_shape=(4, 8, 8),
        fingerprint="tiny",
        default_features="identity",
        reference_data=lambda: torch.randn(64, 4, 8, 8),
        conditions={"encoder_hidden_states": bank, "negative_encoder_hidden_states": torch.zeros(6, 5, 12)},
    )
    settings = EvaluationSettings(n=12, batch_size=5, kid_subset_size=10, kid_subsets=2, error_to_reference=False)
    evaluator = Evaluator(handle, settings, ArrayCache(tmp_path))
    schedule = presets.build("dpmpp_2m", ddpm_noise, 4, "trailing")
    a, b = evaluator.sample(schedule), evaluator.sample(schedule)
    assert torch.equal(a, b)
    index = evaluator.condition_index["encoder_hidden_states"]
    first = UNetDenoiser(unet, ddpm_noise, guidance_scale=2.0).bind(
        encoder_hidden_states=bank[index[:5]], negative_encoder_hidden_states=torch.zeros(5, 5, 12)
    )
    torch.testing.assert_close(solve(first, schedule, evaluator.x_T[:5]).sample, a[:5])
