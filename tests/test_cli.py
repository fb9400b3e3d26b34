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


def test_baselines_ranks_presets(capsys):
    assert main(["baselines", "--nfe", "4", "--n", "16", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "NFE 4" in out and "error to reference" in out


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


def test_console_script_reports_errors_without_traceback(tmp_path):
    out = tmp_path / "never.json"
    result = subprocess.run(
        [sys.executable, "-m", "solversearch.cli", "presets", "ddim", "--nfe", "2000", "--grid", "leading", "--out", str(out)],
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
