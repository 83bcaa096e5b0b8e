"""Tests of the per-image stage loop: each process's share, resuming without recomputing, atomic outputs."""

import os
import signal

import jax
import pytest

from puzzle_jax import fileio, per_image, sharding


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
        # No other process here to sum the counts with (tests/test_multiprocess.py runs real ones).
        monkeypatch.setattr(sharding, "gather_texts", lambda name, text: [text])
        computed = []
        counts = _stage(tmp_path / str(process_index), source, computed)
        assert counts["written"] == len(computed) == len(range(process_index, 8, process_count))
        seen += computed
    assert sorted(seen) == sorted(record["id"] for record in source)


# Worker functions of the process-pool tests: module-level, so the spawned workers can import them.
def square_of(job):
    image_id, value, fault = job
    if fault == "kill" and image_id == "img3":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "exit" and image_id == "img3":
        os._exit(3)
    if fault == "raise" and image_id == "img3":
        raise ValueError(f"{image_id}: bad input")
    return {"square": value**2, "worker": os.getpid()}


def _pool_stage(tmp_path, source, *, fault=None, workers=2):
    return per_image.write_per_image(
        source,
        output_path=lambda image_id: str(tmp_path / f"{image_id}.json"),
        compute=per_image.compute_in_processes(
            square_of, prepare=lambda record: (record["id"], record["value"], fault), workers=workers
        ),
        write=fileio.write_json,
        description="test",
    )


def test_process_pool_writes_every_image_from_several_workers(tmp_path):
    source = _records(9)
    assert _pool_stage(tmp_path, source) == {"written": 9, "skipped_existing": 0}
    results = [fileio.read_json(str(tmp_path / f"img{i}.json")) for i in range(9)]
    assert [result["square"] for result in results] == [i * i for i in range(9)]
    assert os.getpid() not in {result["worker"] for result in results}


@pytest.mark.parametrize("fault", ["kill", "exit"])
def test_a_dying_worker_names_the_images_in_flight_and_a_rerun_finishes_the_rest(tmp_path, fault):
    source = _records(12)
    with pytest.raises(per_image.WorkerDiedError, match="rerun the stage") as raised:
        _pool_stage(tmp_path, source, fault=fault)
    assert "img3" in raised.value.image_ids and "'img3'" in str(raised.value)
    # In flight: at most two jobs per worker.
    assert len(raised.value.image_ids) <= 4
    written = sorted(os.listdir(tmp_path))
    # Only complete files, none of the images in flight, no temporary file.
    assert all(name.endswith(".json") and not name.startswith(".") for name in written)
    assert not {f"{image_id}.json" for image_id in raised.value.image_ids} & set(written)
    for name in written:
        index = int(name[3:-5])
        assert fileio.read_json(str(tmp_path / name))["square"] == index * index
    before = {name: os.stat(tmp_path / name).st_mtime_ns for name in written}
    assert _pool_stage(tmp_path, source) == {"written": 12 - len(written), "skipped_existing": len(written)}
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in written} == before
    assert sorted(os.listdir(tmp_path)) == sorted(f"img{i}.json" for i in range(12))


def test_an_error_in_a_worker_is_raised_as_it_was_with_the_image_named(tmp_path):
    with pytest.raises(ValueError, match="img3: bad input") as raised:
        _pool_stage(tmp_path, _records(6), fault="raise", workers=1)
    assert any("img3" in note for note in raised.value.__notes__)
    assert "img3.json" not in os.listdir(tmp_path)


def test_workers_zero_means_the_cores():
    assert per_image.resolve_workers(0) == len(os.sched_getaffinity(0))
    assert per_image.resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers must be >= 0"):
        per_image.resolve_workers(-1)


class _CountingSource(list):
    """Records that list their ids without decoding and count the records decoded (as datasets.DecodedRecords)."""

    decoded = 0

    def ids(self):
        return [record["id"] for record in list.__iter__(self)]

    def __getitem__(self, index):
        self.decoded += 1
        return list.__getitem__(self, index)


def test_a_source_with_ids_is_not_decoded_for_finished_images(tmp_path):
    source = _CountingSource(_records(6))
    for index in (1, 4):
        fileio.write_json(str(tmp_path / f"img{index}.json"), {"square": "old"})
    computed = []
    assert _stage(tmp_path, source, computed) == {"written": 4, "skipped_existing": 2}
    assert source.decoded == 4 and computed == ["img0", "img2", "img3", "img5"]
    assert fileio.read_json(str(tmp_path / "img1.json")) == {"square": "old"}


def test_a_run_removes_the_temporaries_a_killed_run_left_even_of_finished_images(tmp_path):
    source, computed = _records(3), []
    _stage(tmp_path, source, computed)
    leftovers = [".img1.json.tmp-somehost-1", f".img2.json.tmp-{__import__('socket').gethostname()}-999999999"]
    for name in leftovers:
        (tmp_path / name).write_text("{")
    assert _stage(tmp_path, source, computed) == {"written": 0, "skipped_existing": 3}
    # This host's dead writer's leftover goes; another host's is left to that host.
    assert sorted(os.listdir(tmp_path)) == [leftovers[0], "img0.json", "img1.json", "img2.json"]


def test_a_failed_write_names_the_image_and_its_file(tmp_path):
    def failing_write(path, payload):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space") as error:
        per_image.write_per_image(
            _records(2), output_path=lambda image_id: str(tmp_path / f"{image_id}.json"),
            compute=lambda records: ((record["id"], 1) for record in records), write=failing_write, description="t",
        )
    assert f"image 'img0' to {tmp_path / 'img0.json'}" in "\n".join(error.value.__notes__)
