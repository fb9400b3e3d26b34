"""Experiment files: the committed ones load; invalid ones name the key; command-line overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from solversearch.search.experiment import ExperimentError, experiment_from_dict, load_experiment

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["digits", "gmm_digits", "local_diffusers"])
def test_committed_experiments_load(name):
    experiment = load_experiment(REPO / "experiments" / f"{name}.yaml")
    assert experiment.space.name == "usf" and experiment.nfe == 5
    assert Path(experiment.space_path).is_file()


def test_the_main_job_is_the_bundled_model_with_s3_and_refinement():
    experiment = load_experiment(REPO / "experiments" / "digits.yaml")
    assert experiment.model == "bundled:digits" and experiment.algorithm == "s3_refine"
    assert experiment.study_name == "digits-nfe5"


def base_doc():
    return yaml.safe_load((REPO / "experiments" / "gmm_digits.yaml").read_text())


@pytest.mark.parametrize(
    "change, words",
    [
        ({"metric": {"name": "ssim"}}, "metric.name"),
        ({"metric": {"n": 0}}, "metric.n"),
        ({"metric": {"samples": 10}}, "metric.samples"),
        ({"algorithm": {"name": "annealing"}}, "algorithm.name"),
        ({"budget": {"evaluations": -1}}, "budget.evaluations"),
        ({"resources": {"cpu": 0}}, "resources"),
        ({"nfe": "five"}, "nfe"),
        ({"nfe": None}, "nfe"),
        ({"colour": "red"}, "colour"),
        ({"storage": {"path": "x"}}, "storage.path"),
        ({"objectives": ["fid", "beauty"]}, "objectives"),
        ({"metric": {"seed": "zero"}}, "metric.seed"),
        ({"metric": {"mixed_precision": "yes"}}, "metric.mixed_precision"),
        ({"algorithm": {"name": "s3", "seed": 1.5}}, "algorithm.seed"),
        ({"algorithm": {"name": "s3", "settings": [8]}}, "algorithm.settings"),
        ({"budget": {"evaluations": 10, "wall_time_s": -1}}, "budget.wall_time_s"),
        ({"budget": {"evaluations": 10, "wall_time_s": "1h"}}, "budget.wall_time_s"),
        ({"resources": {"cpu": "two"}}, "resources.cpu"),
        ({"resources": {"gpu": float("nan")}}, "resources.gpu"),
        ({"resources": {"concurrent": 1.5}}, "resources.concurrent"),
        ({"resources": {"batch": 0}}, "resources.batch"),
        ({"resources": {"custom": {"tpu": -1}}}, "resources.custom.tpu"),
        ({"nfe": 1000}, "not a few-step schedule"),
        ({"nfe": [4, 1000]}, "not a few-step schedule"),
    ],
)
def test_invalid_experiments_name_the_key(change, words):
    doc = base_doc()
    doc.update(change)
    with pytest.raises(ExperimentError, match=words):
        experiment_from_dict(doc, base=REPO / "experiments")


def test_missing_required_keys_and_bad_files(tmp_path):
    doc = base_doc()
    del doc["model"]
    with pytest.raises(ExperimentError, match="model: required"):
        experiment_from_dict(doc, base=REPO / "experiments")
    (tmp_path / "e.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(tmp_path / "e.yaml")
    with pytest.raises(ExperimentError, match="cannot read"):
        load_experiment(tmp_path / "absent.yaml")
    (tmp_path / "e.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ExperimentError, match="not UTF-8 text"):
        load_experiment(tmp_path / "e.yaml")
    (tmp_path / "e.yaml").write_text("name: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ExperimentError, match="nested too deeply"):
        load_experiment(tmp_path / "e.yaml")


def test_command_line_overrides():
    experiment = load_experiment(REPO / "experiments" / "gmm_digits.yaml").override(
        nfe=7, budget=12, algorithm="tpe", storage_url="sqlite:///x.db", study=None
    )
    assert (experiment.nfe, experiment.budget.evaluations, experiment.algorithm) == (7, 12, "tpe")
    assert experiment.storage_url == "sqlite:///x.db" and experiment.study_name == "gmm_digits-nfe7"
    with pytest.raises(ExperimentError, match="budget"):
        load_experiment(REPO / "experiments" / "gmm_digits.yaml").override(budget=0)


def warm_started(tmp_path, warm_start):
    """An experiment file in its own folder that warm-starts the bundled model's S³ search."""
    doc = {
        **base_doc(),
        "model": "bundled:digits",
        "space": str(REPO / "search_spaces" / "usf.yaml"),
        "algorithm": {"name": "s3", "settings": {"warm_start": warm_start}},
    }
    folder = tmp_path / "experiments"
    folder.mkdir(exist_ok=True)
    (folder / "warm.yaml").write_text(yaml.safe_dump(doc))
    return folder / "warm.yaml"


def test_a_warm_start_path_is_resolved_against_the_experiment_folder(tmp_path):
    experiment = load_experiment(warm_started(tmp_path, "elsewhere.json"))
    assert experiment.algorithm_settings["warm_start"] == str((tmp_path / "experiments" / "elsewhere.json").resolve())
    experiment = load_experiment(warm_started(tmp_path, ["a.json", "../b.json"]))
    assert experiment.algorithm_settings["warm_start"] == [
        str((tmp_path / "experiments" / "a.json").resolve()),
        str((tmp_path / "b.json").resolve()),
    ]


@pytest.mark.parametrize("content, words", [(None, "cannot read schedule file"), ("{", "not valid JSON")])
def test_a_search_with_a_bad_warm_start_fails_before_any_study_exists(content, words, tmp_path, capsys, monkeypatch):
    from solversearch.cli import main

    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "experiments" / "elsewhere.json").parent.mkdir()
        (tmp_path / "experiments" / "elsewhere.json").write_text(content)
    experiment = warm_started(tmp_path, "elsewhere.json")
    assert main(["search", str(experiment), "--storage", "sqlite:///s.db", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "warm_start" in err and words in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiments"]  # no database, no study, no output
