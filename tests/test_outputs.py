"""Output paths are checked before any work, and every file is written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from solversearch.cli import main
from solversearch.errors import SolversearchError
from solversearch.outputs import atomic_output, output_file, output_folder, write_text


def test_an_output_file_needs_an_existing_folder_a_file_name_and_the_right_suffix(tmp_path):
    assert output_file(tmp_path / "a.png", suffixes=(".png",)) == tmp_path / "a.png"
    assert output_file(tmp_path / "A.PNG", suffixes=(".png",)) == tmp_path / "A.PNG"
    for path, words in (
        (tmp_path / "missing" / "a.json", "does not exist"),
        (tmp_path, "is a folder"),
        (tmp_path / "a.jpg", "must end in .png"),
    ):
        with pytest.raises(SolversearchError, match=words):
            output_file(path, suffixes=(".png",) if path.suffix == ".jpg" else ())


def test_an_output_folder_may_be_made_but_not_inside_a_file(tmp_path):
    assert output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SolversearchError, match="is a file"):
            output_folder(path)


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = write_text(tmp_path / "result.json", "old\n")
    with pytest.raises(ZeroDivisionError), atomic_output(target) as tmp:
        tmp.write_text("half")
        1 / 0  # noqa: B018 — the writer fails midway
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_write_the_system_refuses_is_a_user_error_naming_the_file(tmp_path):
    target = tmp_path / "out.json"
    with (
        pytest.raises(SolversearchError, match="cannot write .*out.json.: No space left"),
        atomic_output(target) as tmp,
    ):
        tmp.write_text("the first half")
        raise OSError(28, "No space left on device")  # what a full disk does to the writer
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "out, npz, words",
    [
        ("missing/s.png", None, "--out: the folder"),
        ("s.jpg", None, "must end in .png"),
        (".", None, "is a folder"),
        ("s.png", "missing/s.npz", "--npz: the folder"),
        ("s.png", "s.npy", "must end in .npz"),
    ],
)
def test_sample_refuses_a_bad_output_path_before_sampling(out, npz, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["presets", "ddim", "--nfe", "4", "--out", "s.json"]) == 0
    argv = [
        "sample",
        "--model",
        "gmm:digits",
        "--schedule",
        "s.json",
        "--n",
        "4",
        "--out",
        out,
        *(["--npz", npz] if npz else []),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # nothing written, no temporary file


def test_sample_writes_the_picture_and_the_raw_samples_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["presets", "ddim", "--nfe", "4", "--out", "s.json"]) == 0
    assert (
        main(
            ["sample", "--model", "gmm:digits", "--schedule", "s.json", "--n", "4", "--out", "s.png", "--npz", "s.npz"]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.npz", "s.png"]


def test_search_refuses_an_output_folder_it_cannot_make_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    experiment = Path(__file__).resolve().parents[1] / "experiments" / "gmm_digits.yaml"
    assert main(["search", str(experiment), "--storage", "sqlite:///s.db", "--out", "taken"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no database, no study
