"""Tests of the CAM file format: what is written reads back, and every bad file is named with its problem."""

import numpy as np
import pytest

from puzzle_jax import cam_files


def _payload(classes=(2, 5), size=(6, 7)):
    rng = np.random.default_rng(0)
    keys = np.array([0, *(c + 1 for c in classes)], np.int64)
    return {
        "keys": keys,
        "cam": rng.random((len(classes), 2, 2)).astype(np.float32),
        "hr_cam": rng.random((len(classes), *size)).astype(np.float32),
    }


def test_round_trip_and_score_maps(tmp_path):
    path = cam_files.path_of(str(tmp_path), "2007_000032")
    assert path == str(tmp_path / "2007_000032.npz")
    payload = _payload()
    cam_files.write_cam_file(path, **payload)
    read = cam_files.read_cam_file(path, ("cam", "hr_cam"))
    for field in ("keys", "cam", "hr_cam"):
        np.testing.assert_array_equal(read[field], payload[field])
    maps, keys = cam_files.read_score_maps(path)
    np.testing.assert_array_equal(maps, payload["hr_cam"])
    np.testing.assert_array_equal(keys, payload["keys"])
    # A random walk's file has no hr_cam: its rw maps are the ones scored.
    walk = str(tmp_path / "walk.npz")
    cam_files.write_cam_file(walk, keys=payload["keys"], rw=payload["hr_cam"] * 0.5)
    np.testing.assert_array_equal(cam_files.read_score_maps(walk)[0], payload["hr_cam"] * 0.5)
    # No class at all: (0, H, W) maps and keys [0].
    empty = str(tmp_path / "empty.npz")
    cam_files.write_cam_file(empty, keys=[0], hr_cam=np.zeros((0, 6, 7), np.float32))
    assert cam_files.read_score_maps(empty)[0].shape == (0, 6, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2007_000032.npz", "empty.npz", "walk.npz"]


def test_writer_rejects_unknown_fields_and_maps_that_do_not_match_the_keys(tmp_path):
    payload = _payload()
    with pytest.raises(ValueError, match="'hr_cam' has shape"):
        cam_files.write_cam_file(str(tmp_path / "a.npz"), keys=[0, 1], hr_cam=payload["hr_cam"])
    with pytest.raises(ValueError, match="got \\['logits'\\]"):
        cam_files.write_cam_file(str(tmp_path / "a.npz"), keys=payload["keys"], logits=payload["hr_cam"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "corruption,message",
    [
        ("empty", "not a readable CAM file"),
        ("truncated", "not a readable CAM file"),
        ("no_keys", "expected \\['keys', 'hr_cam'\\]"),
        ("bad_keys", "'keys' must be"),
        ("mismatched", "'hr_cam' has shape"),
        ("nan", "NaN or infinite"),
    ],
)
def test_bad_files_are_named_with_their_problem(tmp_path, corruption, message):
    path = tmp_path / f"{corruption}.npz"
    payload = _payload()
    if corruption == "empty":
        path.write_bytes(b"")
    elif corruption == "truncated":
        cam_files.write_cam_file(str(path), **payload)
        path.write_bytes(path.read_bytes()[:40])
    elif corruption == "no_keys":
        np.savez(path, hr_cam=payload["hr_cam"])
    elif corruption == "bad_keys":
        np.savez(path, keys=np.array([3, 6]), hr_cam=payload["hr_cam"])
    elif corruption == "mismatched":
        np.savez(path, keys=np.array([0, 3]), hr_cam=payload["hr_cam"])
    else:
        hr_cam = payload["hr_cam"].copy()
        hr_cam[0, 1, 1] = np.nan
        np.savez(path, keys=payload["keys"], hr_cam=hr_cam)
    for reader in (cam_files.read_cam_file, cam_files.read_score_maps):
        with pytest.raises(ValueError, match=message) as error:
            reader(str(path))
        assert str(path) in str(error.value)


def test_every_damaged_byte_gives_a_named_value_error(tmp_path):
    """Issue 17: a damaged .npz raised zlib.error, BadZipFile, tokenize errors ... unnamed. Flip each byte in turn
    (and truncate at every length): the reader either returns the intact maps or raises ValueError naming the file."""
    path = tmp_path / "img.npz"
    payload = _payload()
    cam_files.write_cam_file(str(path), **payload)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.npz"
    variants = [data[:length] for length in range(0, len(data), 3)]
    variants += [data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :] for index in range(len(data))]
    for variant in variants:
        damaged.write_bytes(variant)
        try:
            maps, keys = cam_files.read_score_maps(str(damaged))
        except ValueError as error:
            assert str(damaged) in str(error)
        else:  # a flipped byte the format does not check (a timestamp, padding): the maps are intact
            np.testing.assert_array_equal(maps, payload["hr_cam"])
            np.testing.assert_array_equal(keys, payload["keys"])
