"""Sigma-list exports on every noise path: diffusers' schedulers take them and land on the schedule's times,
the ComfyUI list is every time in ComfyUI's units (with the final 0), and the warning names what a list of
times cannot carry. Bad combinations are one-line errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from solversearch import DiscreteVP, KarrasVE, RectifiedFlow, SolverSchedule, Step, presets
from solversearch.cli import main
from solversearch.errors import SolversearchError
from solversearch.exports import dropped_decisions, export_comfyui, export_diffusers
from solversearch.search import StudyStore, TrialRecord

VP = DiscreteVP.from_diffusers_config({})
FLOW = RectifiedFlow(shift=3.0)
DYNAMIC = RectifiedFlow(use_dynamic_shifting=True, mu=0.8)
EDM = KarrasVE()
PATHS = {"vp": VP, "flow": FLOW, "dynamic": DYNAMIC, "edm": EDM}


def searched(noise, first_step: str = "model", end: float = 0.0) -> SolverSchedule:
    """A searched-looking schedule on `noise` that starts below σ = 1 (so every path accepts every step)."""
    top = noise.t_start * 0.98
    steps = (
        Step(prediction="noise", skip=("mid_block",)),
        Step.multistep(2, "data", scaling="bh2", corrector="unic"),
        Step.multistep(3, "noise"),
        Step(),
    )
    times = (top, top * 0.6, top * 0.3, top * 0.1, end)
    return SolverSchedule(timesteps=times, steps=steps, first_step=first_step, noise_schedule=noise.to_dict(), name="s")


def test_comfyui_sigmas_are_the_schedulers_sigmas_with_the_final_zero_on_every_path():
    """Independent oracles: diffusers' own schedulers' sigma tables on the grids that reproduce them."""
    vp = presets.build("dpmpp_2m", VP, 5, "trailing")
    reference = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    reference.set_timesteps(5)
    np.testing.assert_allclose(export_comfyui(vp, VP)["sigmas"], reference.sigmas.double().numpy(), rtol=1e-6)

    flow = presets.build("ddim", FLOW, 5, "shifted")
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(5)
    np.testing.assert_allclose(export_comfyui(flow, FLOW)["sigmas"], reference.sigmas.double().numpy(), rtol=1e-6)

    edm = presets.build("ddim", EDM, 5, "edm")
    reference = EDMEulerScheduler()
    reference.set_timesteps(5)
    np.testing.assert_allclose(export_comfyui(edm, EDM)["sigmas"], reference.sigmas.double().numpy(), rtol=1e-6)
    for schedule, noise in ((vp, VP), (flow, FLOW), (edm, EDM)):
        assert export_comfyui(schedule, noise)["sigmas"][-1] == 0.0


@pytest.mark.parametrize("path", sorted(PATHS))
def test_diffusers_sigmas_are_in_the_units_of_the_paths_scheduler(path):
    noise = PATHS[path]
    schedule = searched(noise)
    doc = export_diffusers(schedule, noise, "sigmas")
    times = np.array(schedule.timesteps[:-1])
    if path == "vp":
        np.testing.assert_allclose(doc["sigmas"], noise.sigma(times) / noise.alpha(times), rtol=1e-12)
    elif path == "edm":
        np.testing.assert_allclose(doc["sigmas"], 80.0 * times, rtol=1e-12)
        reference = EDMEulerScheduler()
        reference.set_timesteps(sigmas=torch.tensor(doc["edm_euler_ramp"]))
        np.testing.assert_allclose(reference.sigmas[:-1].double().numpy(), 80.0 * times, rtol=1e-5)
    else:  # FlowMatchEulerDiscreteScheduler shifts custom sigmas: it lands on the schedule's σ from the unshifted ones
        config = {"shift": 3.0} if path == "flow" else {"use_dynamic_shifting": True}
        reference = FlowMatchEulerDiscreteScheduler(**config)
        reference.set_timesteps(sigmas=doc["sigmas"], mu=noise.mu)
        np.testing.assert_allclose(reference.sigmas.double().numpy(), schedule.timesteps, rtol=1e-6)
        assert "unshifted" in doc["units"] and ("mu=0.8" in doc["units"]) == (path == "dynamic")


def test_the_warning_lists_what_this_schedule_loses_in_a_list():
    schedule = searched(VP, first_step="analytic", end=0.002)
    dropped = export_diffusers(schedule, VP, "sigmas")["dropped"]
    text = " | ".join(dropped)
    assert "orders [1, 2, 3, 1]" in text and "noise (ε) prediction at steps [2]" in text  # step 0 is first order
    assert "UniC corrector after steps [1]" in text and "skipped network blocks at steps [0]" in text
    assert "analytic first step" in text and "4 evaluations instead of 3" in text
    assert "end time t = 0.002" in text
    # A ComfyUI list carries the end time itself; nothing is lost from a plain first-order schedule.
    assert not any("end time" in d for d in export_comfyui(schedule, VP)["dropped"])
    assert export_comfyui(schedule, VP)["sigmas"][-1] == pytest.approx(float(np.exp(-VP.lambda_(0.002))))
    assert dropped_decisions(presets.build("ddim", FLOW, 4, "shifted"), FLOW, final_point=False) == []


def test_what_a_path_cannot_export_is_a_clear_error():
    for noise in (FLOW, EDM):
        with pytest.raises(SolversearchError, match="export kind 'sigmas' instead"):
            export_diffusers(searched(noise), noise, "timesteps")
    unknown_mu = RectifiedFlow(use_dynamic_shifting=True)
    with pytest.raises(SolversearchError, match="give mu"):
        export_diffusers(searched(unknown_mu), unknown_mu)
    assert set(export_diffusers(searched(VP), VP)) >= {"timesteps", "units", "note", "dropped"}  # VP's default
    assert "sigmas" in export_diffusers(searched(EDM), EDM)  # the only kind of the other paths


# --- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def study(tmp_path):
    """A storage with one study per path, each holding one searched schedule."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    for path, noise in PATHS.items():
        StudyStore(url, path).record(
            TrialRecord(
                searched(noise), key="k", stage=1, algorithm="s3", metrics={"fid": 1.0}, cost={"nfe": 4.0}, n=10
            ),
            [1.0],
        )
    return url


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(
    "options",
    [["--format", "diffusers"], ["--format", "diffusers", "--diffusers-kind", "sigmas"], ["--format", "comfyui"]],
)
def test_export_writes_each_paths_times_and_warns_what_was_dropped(path, options, study, tmp_path, capsys):
    out = tmp_path / "times.json"
    assert main(["export", path, "--storage", study, "--out", str(out), *options]) == 0
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())
    noise, schedule = PATHS[path], searched(PATHS[path])
    if options[1] == "comfyui":
        np.testing.assert_allclose(doc, export_comfyui(schedule, noise)["sigmas"], rtol=1e-12)
        assert doc[-1] == 0.0 and len(doc) == len(schedule.timesteps)
    else:
        kind = "timesteps" if path == "vp" and len(options) == 2 else "sigmas"
        assert doc[kind] == export_diffusers(schedule, noise, kind)[kind] and doc["dropped"]
    assert "orders [1, 2, 3, 1]" in captured.err and "UniC corrector after steps [1]" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "path, options, words",
    [
        ("flow", ["--format", "diffusers", "--diffusers-kind", "timesteps"], "export kind 'sigmas' instead"),
        ("edm", ["--format", "diffusers", "--diffusers-kind", "timesteps"], "export kind 'sigmas' instead"),
        ("vp", ["--format", "comfyui", "--diffusers-kind", "sigmas"], "--diffusers-kind applies to --format diffusers"),
        ("vp", ["--diffusers-kind", "timesteps"], "--diffusers-kind applies to --format diffusers"),
    ],
)
def test_export_refuses_what_a_path_or_format_cannot_take_with_exit_2(path, options, words, study, tmp_path, capsys):
    out = tmp_path / "times.json"
    assert main(["export", path, "--storage", study, "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
