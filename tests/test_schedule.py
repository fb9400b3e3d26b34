"""The schedule format: validation that names the field and step, JSON Schema, lossless round trip."""

from __future__ import annotations

import copy
import json
import math
import pickle

import jsonschema
import pytest
from hypothesis import given, settings

from solversearch import FORMAT, KarrasVE, RectifiedFlow, ScheduleError, SolverSchedule, Step, load_schedule, presets
from solversearch.noise import noise_schedule_from_dict
from solversearch.schedule import json_schema

from .strategies import schedules


def valid_doc() -> dict:
    """A 3-step UniPC-2-like schedule document."""
    schedule = SolverSchedule(
        timesteps=(1.0, 0.5, 0.1, 0.0),
        steps=(
            Step(prediction="data", order=1, scaling="bh2", corrector="unic"),
            Step.multistep(2, "data", scaling="bh2", corrector="unic"),
            Step(prediction="data", order=1),
        ),
        name="example",
    )
    return schedule.to_dict()


def test_the_example_document_is_valid_against_code_and_schema():
    doc = valid_doc()
    jsonschema.Draft202012Validator(json_schema()).validate(doc)
    assert SolverSchedule.from_dict(doc).nfe == 3


def mutate(path, value):
    doc = valid_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def without(path):
    doc = valid_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


@pytest.mark.parametrize(
    "doc, names",
    [
        (mutate(["timesteps"], [1.0, 0.5, 0.5, 0.0]), "timesteps[2]"),
        (mutate(["timesteps"], [1.0, 0.1, 0.5, 0.0]), "timesteps[2]"),
        (mutate(["timesteps"], [1.5, 0.5, 0.1, 0.0]), "timesteps[0]"),
        (mutate(["timesteps"], [1.0, 0.5, 0.1, -0.1]), "timesteps[3]"),
        (mutate(["timesteps"], [1.0, 0.5, 0.0, 0.0]), "timesteps[3]"),
        (mutate(["timesteps"], [1.0, math.nan, 0.1, 0.0]), "timesteps[1]"),
        (mutate(["timesteps"], [1.0, 0.5, 0.1]), "steps"),
        (mutate(["steps", 1, "order"], 3), "steps[1].order"),
        (mutate(["steps", 2, "order"], 2), "steps[2]"),
        (mutate(["steps", 0, "prediction"], "velocity"), "steps[0].prediction"),
        (mutate(["steps", 1, "scaling"], "bh3"), "steps[1].scaling"),
        (mutate(["steps", 1, "corrector"], "unipc"), "steps[1].corrector"),
        (mutate(["steps", 2, "corrector"], "unic"), "steps[2].corrector"),
        (mutate(["steps", 1, "derivative_points"], [[2]]), "steps[1].derivative_points[0]"),
        (mutate(["steps", 1, "derivative_points"], []), "steps[1].derivative_points"),
        (mutate(["steps", 1, "scaling"], "linear"), "steps[1]"),
        (without(["steps", 1, "scaling"]), "steps[1]: 'scaling' is a required property"),
        (mutate(["steps", 1, "linear_coefficient"], 0.3), "steps[1]"),
        (mutate(["steps", 1, "second_derivative_factor"], math.nan), "steps[1].second_derivative_factor"),
        (mutate(["steps", 0, "skip"], ["a", "a"]), "steps[0].skip"),
        (mutate(["steps", 0, "colour"], "red"), "steps[0]"),
        (mutate(["first_step"], "guess"), "first_step"),
        (mutate(["format"], "solversearch.schedule/v0"), "format"),
        (mutate(["nfe"], 2), "nfe"),
        (mutate(["metrics"], {"fid": "low"}), "metrics.fid"),
    ],
)
def test_invalid_documents_name_the_field(doc, names):
    with pytest.raises(ScheduleError) as info:
        SolverSchedule.from_dict(doc)
    assert names in str(info.value)


def test_python_construction_validates_too():
    with pytest.raises(ScheduleError, match=r"steps\[0\].order"):
        SolverSchedule(timesteps=(1.0, 0.5), steps=(Step(order=2, derivative_points=((1,),)),))
    with pytest.raises(ScheduleError, match=r"steps\[1\].linear_coefficient"):
        SolverSchedule(timesteps=(1.0, 0.5, 0.2), steps=(Step(), Step(linear_coefficient=0.5)))
    with pytest.raises(ScheduleError, match="steps: 3 timesteps need 2 steps"):
        SolverSchedule(timesteps=(1.0, 0.5, 0.2), steps=(Step(),))


def test_analytic_first_step_saves_one_evaluation():
    doc = valid_doc()
    doc["first_step"] = "analytic"
    with pytest.raises(ScheduleError, match="nfe"):
        SolverSchedule.from_dict(doc)
    doc["nfe"] = 2
    assert SolverSchedule.from_dict(doc).nfe == 2


def test_load_schedule_reports_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ScheduleError, match="cannot read"):
        load_schedule(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": ')
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ScheduleError, match="JSON object"):
        load_schedule(bad)


def test_save_then_load_is_lossless(tmp_path):
    schedule = SolverSchedule.from_dict(valid_doc()).with_metadata(metrics={"fid": 3.25}, provenance={"seed": 1})
    path = schedule.save(tmp_path / "s.json")
    assert load_schedule(path) == schedule
    assert json.loads(path.read_text())["format"] == FORMAT


@settings(max_examples=200, deadline=None)
@given(schedules())
def test_json_round_trip_is_lossless_and_schema_valid(schedule):
    doc = schedule.to_dict()
    jsonschema.Draft202012Validator(json_schema()).validate(doc)
    again = SolverSchedule.from_json(schedule.to_json())
    assert again == schedule
    assert again.to_dict() == doc
    assert again.decisions_key() == schedule.decisions_key()


@pytest.mark.parametrize(
    "noise",
    [RectifiedFlow(shift=3.0), RectifiedFlow(use_dynamic_shifting=True, mu=0.8), KarrasVE()],
    ids=["flow", "flow-dynamic", "edm"],
)
def test_a_schedule_for_a_flow_or_edm_path_round_trips_with_its_noise_schedule(noise, tmp_path):
    schedule = presets.build("dpmpp_2m", noise, 5, "logsnr").with_metadata(noise_schedule=noise.to_dict())
    again = load_schedule(schedule.save(tmp_path / "s.json"))
    assert again == schedule and noise_schedule_from_dict(again.noise_schedule) == noise


def test_schedules_are_immutable():
    schedule = SolverSchedule.from_dict(valid_doc())
    with pytest.raises(AttributeError):
        schedule.first_step = "analytic"  # type: ignore[misc]
    with pytest.raises(TypeError):
        schedule.metrics["fid"] = 1.0  # type: ignore[index]
    assert hash(schedule) == hash(copy.deepcopy(schedule))
    assert pickle.loads(pickle.dumps(schedule)) == schedule
