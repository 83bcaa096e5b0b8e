"""Tests of the atomic writers: complete or absent, and a killed writer's temporary removed by the next write."""

import os

import numpy as np
import pytest

from puzzle_jax import fileio


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    path = str(tmp_path / "out.json")
    with pytest.raises(TypeError):
        fileio.write_json(path, {"not json": object()})
    assert os.listdir(tmp_path) == []
    fileio.write_json(path, {"a": 1})
    assert fileio.read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["out.json"]


def test_the_next_write_removes_a_temporary_that_a_killed_writer_left(tmp_path):
    # What SIGKILL leaves mid-write: a truncated temporary named after the output and the dead writer's pid.
    (tmp_path / ".img_3.tmp-99999.npz").write_bytes(b"PK\x03")
    (tmp_path / ".img_30.tmp-99999.npz").write_bytes(b"PK\x03")  # another output's: left alone
    fileio.write_npz(str(tmp_path / "img_3.npz"), rw=np.ones((1, 2, 2), np.float32))
    assert sorted(os.listdir(tmp_path)) == [".img_30.tmp-99999.npz", "img_3.npz"]
    with np.load(tmp_path / "img_3.npz") as payload:
        assert payload["rw"].sum() == 4
