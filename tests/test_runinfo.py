"""The output guard every verb writes through: checked, locked and staged before the work."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from llmlite.errors import LlmliteError
from llmlite.runinfo import staged_output


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(path, *needles, **kwargs) -> None:
    with pytest.raises(LlmliteError) as e, staged_output(path, **kwargs):
        pytest.fail("the guard let the work start")
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_folder_is_staged_beside_the_target_and_moved_on_success(tmp_path):
    target = tmp_path / "new" / "deep" / "out"
    with staged_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.partial-") and tmp.is_dir()
        assert (tmp.parent / ".out.lock").exists()
        (tmp / "weights").write_text("w")
    assert tree(tmp_path) == ["new", "new/deep", "new/deep/out", "new/deep/out/weights"]


def test_failure_removes_the_stage_and_the_folders_it_created(tmp_path):
    (tmp_path / "keep").mkdir()
    before = tree(tmp_path)
    with pytest.raises(RuntimeError), staged_output(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the work failed")
    assert tree(tmp_path) == before


def test_interrupt_removes_the_stage(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged_output(tmp_path / "out"):
        raise KeyboardInterrupt
    assert tree(tmp_path) == []


def test_existing_target_needs_overwrite_and_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    refused(target, "--output", "already exists", "--overwrite")
    with staged_output(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert tree(tmp_path) == ["out", "out/new"]


def test_file_and_folder_never_stand_in_for_each_other(tmp_path):
    file, folder = tmp_path / "f.json", tmp_path / "d"
    file.write_text("{}")
    folder.mkdir()
    refused(file, "is an existing file, not a folder", overwrite=True)
    refused(folder, "--json", "is an existing folder", overwrite=True, option="--json", kind="file")
    with staged_output(file, overwrite=True, option="--json", kind="file") as tmp:
        tmp.write_text('{"new": 1}')
    assert file.read_text() == '{"new": 1}'
    assert tree(tmp_path) == ["d", "f.json"]


def test_current_folder_its_parents_home_and_root_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    refused(".", "is the current folder", overwrite=True)
    refused("", "is empty", overwrite=True)
    refused("..", "a parent of the current folder", overwrite=True)
    refused("sub/../..", "a parent of the current folder", overwrite=True)
    refused(str(tmp_path), "a parent of the current folder", overwrite=True)
    refused("~", "home folder", overwrite=True)
    refused("/", "root folder", overwrite=True)
    assert tree(tmp_path) == ["a", "a/b"]


@pytest.mark.parametrize(
    "output,needle",
    [
        ("model", "is --model"),  # the checkpoint being read
        ("model/report", "lies inside --model"),
        ("", "contains --model"),  # the folder holding the inputs
        ("data.txt", "is --data"),
        ("model/../model", "is --model"),
        ("link", "is --model"),  # a symlink to an input
    ],
)
def test_inputs_are_never_replaced_or_written_into(tmp_path, monkeypatch, output, needle):
    project = tmp_path / "project"
    model, data = project / "model", project / "data.txt"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    data.write_text("text")
    (project / "link").symlink_to(model)
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    path = f"../project/{output}"
    inputs = [
        ("--model", str(model)),
        ("--data", "../project/data.txt"),
        ("--ppl", "wikitext2"),
        ("--base", None),
    ]
    before = tree(tmp_path)
    refused(path, needle, "an input of this run", overwrite=True, inputs=inputs)
    assert tree(tmp_path) == before


def test_unwritable_places_fail_before_the_work(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    refused(file / "out", "--output", "lies under", "which is a file")
    refused("/proc/llmlite-out", "--output", "choose a writable place")
    assert tree(tmp_path) == ["file"]


def test_a_second_run_on_the_same_target_stops_at_once(tmp_path):
    target = tmp_path / "out"
    with staged_output(target):
        refused(target, "another llmlite run", f"process {os.getpid()}", "--output")
        refused(target, "another llmlite run", overwrite=True)
    assert tree(tmp_path) == ["out"]


def test_stale_stages_of_killed_runs_are_removed_and_reported(tmp_path, caplog):
    target = tmp_path / "out"
    (tmp_path / ".out.partial-4000000").mkdir()  # beyond any pid: its process is gone
    (tmp_path / ".out.partial-4000000" / "half").write_text("x")
    (tmp_path / ".out.old-4000001").mkdir()
    (tmp_path / ".out.partial").mkdir()  # finetune's resumable checkpoints: not a stage
    (tmp_path / ".other.partial-4000000").mkdir()  # another target's: not ours to judge
    (tmp_path / ".out.lock").write_text("4000000")  # left by kill -9: its flock is gone
    with caplog.at_level(logging.WARNING, logger="llmlite"), staged_output(target):
        pass
    assert tree(tmp_path) == [".other.partial-4000000", ".out.partial", "out"]
    assert "left by an interrupted run (process 4000000)" in caplog.text
    assert "process 4000001" in caplog.text


def test_no_output_is_no_work(tmp_path):
    with staged_output(None) as tmp:
        assert tmp is None
