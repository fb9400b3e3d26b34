"""The command line: the README's main job runs, and user errors are one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from solversearch import load_schedule
from solversearch.cli import main


def test_presets_lists_and_exports(tmp_path, capsys):
    assert main(["presets"]) == 0
    assert "dpmpp_3m" in capsys.readouterr().out
    out = tmp_path / "s.json"
    assert main(["presets", "unipc_2_bh2", "--nfe", "5", "--grid", "trailing", "--out", str(out)]) == 0
    schedule = load_schedule(out)
    assert schedule.nfe == 5 and schedule.ends_at_zero and schedule.name == "unipc_2_bh2/trailing/nfe5"


def test_baselines_ranks_presets_and_writes_the_report(capsys, tmp_path):
    argv = [
        "baselines",
        "--model",
        "gmm:digits",
        "--nfe",
        "4,6",
        "--n",
        "64",
        "--top",
        "3",
        "--out",
        str(tmp_path),
        "--solvers",
        "ddim,dpmpp_2m,unipc_3_bh2",
        "--grids",
        "logsnr,trailing",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NFE 4" in out and "NFE 6" in out and "FID" in out and "teacher" in out
    rows = json.loads((tmp_path / "baselines.json").read_text())
    assert len(rows) == 2 * 2 * 3
    assert set(rows[0]) == {
        "solver",
        "grid",
        "nfe",
        "fid",
        "kid",
        "kid_std",
        "error_to_reference",
        "teacher_distance",
        "diverged",
        "seconds",
    }
    assert (tmp_path / "metric_vs_nfe.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0


def test_evaluate_prints_json_for_a_schedule_file(capsys, tmp_path):
    schedule = tmp_path / "s.json"
    main(["presets", "dpmpp_2m", "--nfe", "5", "--out", str(schedule)])
    capsys.readouterr()
    assert main(["evaluate", "--model", "gmm:digits", "--schedule", str(schedule), "--n", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] == 5 and result["fid"] > 0 and result["diverged"] is False


def test_evaluate_refuses_a_schedule_made_for_another_noise_schedule_as_sample_does(capsys, tmp_path):
    schedule = tmp_path / "s.json"
    main(["presets", "dpmpp_2m", "--nfe", "5", "--out", str(schedule)])
    doc = json.loads(schedule.read_text())
    doc["noise_schedule"] = {"kind": "linear_vp", "beta_0": 0.1, "beta_1": 19.0}
    schedule.write_text(json.dumps(doc))
    capsys.readouterr()
    for command in (["evaluate", "--n", "64"], ["sample", "--n", "4", "--out", str(tmp_path / "s.png")]):
        assert main([command[0], "--model", "gmm:digits", "--schedule", str(schedule), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "noise schedule" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"format": "solversearch.schedule/v1", "nfe": 3', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_evaluate_rejects_a_malformed_schedule_with_exit_2(content, words, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    assert main(["evaluate", "--model", "gmm:digits", "--schedule", str(bad)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["presets", "euler", "--nfe", "5"], "unknown solver preset 'euler'"),
        (["presets", "ddim", "--grid", "cosine"], "unknown grid 'cosine'"),
        (["presets", "ddim", "--model", "bundled:cats"], "unknown model spec"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, words, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("device, words", [("bogus", "unknown device 'bogus'"), ("cuda:7", "CUDA device")])
def test_a_device_this_machine_lacks_is_refused_before_anything_runs(device, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--model", "gmm:digits", "--schedule", "never-read.json", "--device", device])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    out = tmp_path / "never.json"
    result = subprocess.run(  # noqa: PLW1510 - the exit status is the assertion
        [
            sys.executable,
            "-m",
            "solversearch.cli",
            "presets",
            "ddim",
            "--nfe",
            "2000",
            "--grid",
            "leading",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.startswith("solversearch: error:")
    assert not out.exists()


def test_exported_json_is_the_documented_format(tmp_path):
    out = tmp_path / "s.json"
    main(["presets", "dpmpp_3m", "--nfe", "6", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["format"] == "solversearch.schedule/v1" and doc["nfe"] == 6 and len(doc["steps"]) == 6


def test_export_gives_the_search_s_winner_by_default_and_the_k_th_search_seed_value_on_request(tmp_path):
    """The search picks its winner on the selection seed, so it need not be the best value on the search
    seed: `export STUDY` writes what the search wrote, `--rank K` the K-th best search-seed value."""
    from solversearch import presets
    from solversearch.noise import LinearVP
    from solversearch.search import StudyStore, TrialRecord

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = StudyStore(url, "picked")
    for i, (name, value) in enumerate([("ddim", 0.5), ("dpmpp_2m", 0.3), ("unipc_2_bh2", 0.4)]):
        schedule = presets.build(name, LinearVP(), 4, "logsnr")
        store.record(
            TrialRecord(
                schedule, key=f"k{i}", stage=1, algorithm="s3", metrics={"fid": value}, cost={"nfe": 4.0}, n=10
            ),
            [value],
        )
    numbers = {e.schedule.name.split("/")[0]: e.number for e in store.history()}
    store.set_attr("validation", {"rows": {"searched": {"trial": numbers["unipc_2_bh2"]}}})
    assert main(["export", "picked", "--storage", url, "--out", str(tmp_path / "winner.json")]) == 0
    assert main(["export", "picked", "--storage", url, "--out", str(tmp_path / "first.json"), "--rank", "1"]) == 0
    winner, first = (json.loads((tmp_path / f).read_text()) for f in ("winner.json", "first.json"))
    assert winner["name"].startswith("unipc_2_bh2") and winner["provenance"]["winner"] is True
    assert first["name"].startswith("dpmpp_2m") and first["provenance"]["rank"] == 1


def test_show_prints_the_search_and_report_wall_times_and_the_report_s_share(tmp_path, capsys):
    """The times a study recorded (summed over its runs), and their ratio: 300 s of report for 1500 s of search."""
    from solversearch.search.storage import StudyStore

    url = f"sqlite:///{tmp_path / 'cost.db'}"
    store = StudyStore(url, "cost")
    store.set_attr("wall_seconds", 1500.0)
    store.set_attr("report_seconds", 300.0)
    assert main(["show", "cost", "--storage", url]) == 0
    out = capsys.readouterr().out
    assert "search 25m00s, report 5m00s = 20 % of the search" in out
