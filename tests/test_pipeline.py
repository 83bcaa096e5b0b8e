"""Tests of the stage registry, the workdir layout and the command-line entry point's defaults."""

import pytest

from puzzle_jax import fileio, main, pipeline


def test_stage_names_are_checked():
    assert pipeline.check_stages("train_cam, eval_cam") == ["train_cam", "eval_cam"]
    assert pipeline.check_stages(("train_cam,infer_cam",)) == ["train_cam", "infer_cam"]
    with pytest.raises(ValueError, match="allowed stage names"):
        pipeline.check_stages(["train_cam", "train_everything"])
    with pytest.raises(ValueError, match="unknown or empty"):
        pipeline.check_stages([])


def test_workdir_layout(tmp_path):
    layout = pipeline.Workdir(str(tmp_path))
    assert layout.summary_path("eval_cam") == str(tmp_path / "eval_cam" / "summary.json")
    assert layout.exported_model("train_cam") == str(tmp_path / "train_cam" / "model")
    assert layout.cam_dir() == str(tmp_path / "infer_cam" / "cams")


def test_default_workdir_is_named_after_the_config():
    assert main.default_workdir("configs/resnest101.py") == "runs/resnest101"
    assert main.default_workdir("/abs/configs/demo.py") == "runs/demo"


def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = str(tmp_path / "out.json")
    fileio.write_json(path, {"a": 1})
    assert fileio.read_json(path) == {"a": 1}
    with pytest.raises(TypeError):
        fileio.write_json(path, {"a": object()})  # not serialisable: fails half-way
    assert fileio.read_json(path) == {"a": 1}  # the earlier result is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(ValueError, match="must end in '.npz'"):
        fileio.write_npz(str(tmp_path / "cams.npy"), cam=None)
