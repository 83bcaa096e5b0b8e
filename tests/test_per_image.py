"""Tests of the per-image stage loop: each process's share, resuming without recomputing, atomic outputs."""

import os

import jax
import pytest

from puzzle_jax import fileio, per_image


def _records(count):
    return [{"id": f"img{index}", "value": index} for index in range(count)]


def _stage(tmp_path, source, computed, fail_at=None):
    def compute(records):
        for record in records:
            if record["id"] == fail_at:
                raise RuntimeError(f"killed at {fail_at}")
            computed.append(record["id"])
            yield record["id"], {"square": record["value"] ** 2}

    return per_image.write_per_image(
        source,
        output_path=lambda image_id: str(tmp_path / f"{image_id}.json"),
        compute=compute,
        write=fileio.write_json,
        description="test",
    )


def test_an_interrupted_run_resumes_without_recomputing_finished_images(tmp_path):
    source, computed = _records(7), []
    with pytest.raises(RuntimeError, match="killed at img4"):
        _stage(tmp_path, source, computed, fail_at="img4")
    assert computed == ["img0", "img1", "img2", "img3"]
    # Only complete files: the writer is atomic, nothing half-written is left behind.
    assert sorted(os.listdir(tmp_path)) == [f"img{index}.json" for index in range(4)]
    computed.clear()
    assert _stage(tmp_path, source, computed) == {"written": 3, "skipped_existing": 4}
    assert computed == ["img4", "img5", "img6"]
    assert [fileio.read_json(str(tmp_path / f"img{i}.json"))["square"] for i in range(7)] == [i * i for i in range(7)]


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_share_the_images_exactly_once(tmp_path, monkeypatch, process_count):
    source, seen = _records(8), []
    for process_index in range(process_count):
        monkeypatch.setattr(jax, "process_index", lambda index=process_index: index)
        monkeypatch.setattr(jax, "process_count", lambda: process_count)
        computed = []
        counts = _stage(tmp_path / str(process_index), source, computed)
        assert counts["written"] == len(computed) == len(range(process_index, 8, process_count))
        seen += computed
    assert sorted(seen) == sorted(record["id"] for record in source)
