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


def test_a_kill_9_mid_write_leaves_a_hidden_temporary_that_no_reader_lists_and_the_next_run_removes(tmp_path):
    """Issue 17: kill -9 of infer_cam mid-write left '.<id>.tmp-<pid>.npz', which the evaluator counted as a
    prediction. The temporary is hidden and does not end in '.npz', and a stage's next run removes it."""
    import signal
    import subprocess
    import sys

    output = tmp_path / "img_7.npz"
    writer = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from puzzle_jax import fileio\n"
            f"with fileio.atomic_path({str(output)!r}) as temporary, open(temporary, 'wb') as handle:\n"
            "    handle.write(b'PK\\x03\\x04 half an npz'); handle.flush(); print(temporary, flush=True)\n"
            "    time.sleep(600)\n"
        )],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    temporary = writer.stdout.readline().strip()
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    name = os.path.basename(temporary)
    assert os.listdir(tmp_path) == [name]
    assert name.startswith(".") and not name.endswith(".npz") and fileio.is_temporary(name)
    # A run of the stage (another output's write does not touch it; the stage's start does).
    fileio.write_npz(str(tmp_path / "img_8.npz"), rw=np.ones((1, 1, 1), np.float32))
    assert sorted(os.listdir(tmp_path)) == [name, "img_8.npz"]
    assert fileio.remove_leftover_temporaries(str(tmp_path)) == [temporary]
    assert os.listdir(tmp_path) == ["img_8.npz"]


def test_only_temporaries_of_dead_writers_of_this_host_are_removed(tmp_path):
    import socket

    host = socket.gethostname()
    live = os.getppid()  # the test runner's parent: alive
    names = {
        f".a.npz.tmp-{host}-{live}": True,  # a live writer's (another process of the same run): kept
        f".b.npz.tmp-{host}-{os.getpid()}": False,  # this process writes nothing there yet: a leftover
        f".c.png.tmp-{host}-999999999": False,  # no such process
        f".d.npz.tmp-other-host-1-{os.getpid()}": True,  # another host's: left to it
        ".e.tmp-999999999.npz": False,  # the older naming
        "f.npz": True,
        ".hidden": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    fileio.remove_leftover_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(name for name, kept in names.items() if kept)
    assert fileio.remove_leftover_temporaries(str(tmp_path / "absent")) == []


def test_write_rgb_png_round_trips_without_an_extension_to_infer_the_format_from(tmp_path):
    # The temporary has no '.png' ending: an encoder that infers the format from the name (cv2.imwrite) fails on it.
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    path = tmp_path / "picture.png"
    fileio.write_rgb_png(str(path), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
    assert os.listdir(tmp_path) == ["picture.png"]
