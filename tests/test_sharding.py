"""Tests of the data-parallel mesh helpers."""

import collections

import jax
import numpy as np
import pytest

from puzzle_jax import sharding


def test_mesh_sizes_and_errors():
    assert sharding.create_mesh(0).devices.size == jax.device_count() == 8
    assert sharding.create_mesh(2).axis_names == ("data",)
    with pytest.raises(ValueError, match="mesh.num_devices=9"):
        sharding.create_mesh(9)


def test_batch_is_split_along_the_data_axis():
    mesh = sharding.create_mesh(8)
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    placed = sharding.host_batch_to_global(batch, mesh)["image"]
    assert placed.shape == (16, 3)
    shards = sorted(placed.addressable_shards, key=lambda shard: shard.index[0].start)
    assert [shard.data.shape for shard in shards] == [(2, 3)] * 8
    np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), batch["image"])


def test_batch_size_must_divide_over_devices():
    mesh = sharding.create_mesh(8)
    sharding.check_batch_size(16, mesh, "train.batch_size")
    with pytest.raises(ValueError, match="train.batch_size=12"):
        sharding.check_batch_size(12, mesh, "train.batch_size")


class _FakeCoordinationClient:
    """The key-value store and barriers of JAX's coordination service, in this process (tests/test_multiprocess.py
    runs the real one between processes)."""

    def __init__(self):
        self.values, self.barriers = {}, []

    def wait_at_barrier(self, key, timeout_in_ms):
        self.barriers.append((key, timeout_in_ms))

    def key_value_set(self, key, value):
        assert key not in self.values, f"{key} set twice"
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.values:
            raise RuntimeError(f"DEADLINE_EXCEEDED: {key} after {timeout_in_ms} ms")
        return self.values[key]


@pytest.fixture
def fake_client(monkeypatch):
    client = _FakeCoordinationClient()
    monkeypatch.setattr(sharding, "_coordination_client", lambda: client)
    monkeypatch.setattr(sharding, "_USES", collections.Counter())
    yield client
    sharding.configure_barriers(3600)


def test_process_barrier_waits_only_when_there_are_several_processes(monkeypatch, fake_client):
    sharding.wait_for_all_processes("alone")
    assert fake_client.barriers == []  # one process: nothing to wait for
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    sharding.configure_barriers(90)
    sharding.wait_for_all_processes("stage done")
    sharding.wait_for_all_processes("stage done")
    # Each use of a name is a barrier of its own, with the configured timeout.
    assert fake_client.barriers == [("puzzle_jax/stage done/1", 90000), ("puzzle_jax/stage done/2", 90000)]


def test_process_zero_goes_first_and_its_failure_is_every_process_s(monkeypatch, fake_client):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    calls = []
    # Process 1 asks before process 0 has answered: it fails after the timeout, naming the place.
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(sharding.ProcessesOutOfStepError, match="waited 3600 s at 'prepare' for process 0"):
        sharding.first_on_process_zero("prepare", lambda: calls.append(1))
    assert calls == []
    # Process 0 succeeds, then process 1 runs the function too.
    monkeypatch.setattr(sharding, "_USES", collections.Counter())
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert sharding.first_on_process_zero("prepare", lambda: "zero") == "zero"
    monkeypatch.setattr(sharding, "_USES", collections.Counter())
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert sharding.first_on_process_zero("prepare", lambda: "one") == "one"
    # Process 0 fails: it raises its error, process 1 the same message without running the function.

    def broken():
        raise FileNotFoundError("root /data is not a directory")

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(FileNotFoundError):
        sharding.first_on_process_zero("prepare val", broken)
    monkeypatch.setattr(sharding, "_USES", collections.Counter())
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(sharding.ProcessesOutOfStepError) as raised:
        sharding.first_on_process_zero("prepare val", lambda: calls.append(1))
    assert str(raised.value) == "process 0 failed at 'prepare val': FileNotFoundError: root /data is not a directory"
    assert calls == []


def test_local_mesh_holds_only_this_processs_devices(monkeypatch):
    everything = jax.devices()
    assert sharding.create_local_mesh().devices.tolist() == sharding.create_mesh().devices.tolist() == everything
    # As on one host of a pod: 8 devices in the run, 4 of them this process's.
    monkeypatch.setattr(jax, "local_devices", lambda: everything[4:])
    assert sharding.create_local_mesh().devices.tolist() == everything[4:]
    assert sharding.create_local_mesh(2).devices.tolist() == everything[4:6]
    with pytest.raises(ValueError, match="4 device"):
        sharding.create_local_mesh(5)


def test_same_on_all_processes_is_process_zero_s_flag(monkeypatch, fake_client):
    assert sharding.same_on_all_processes(True) is True  # one process: its own flag, no meeting
    assert fake_client.values == {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    fake_client.values["puzzle_jax/same on all processes/1/0"] = "1"  # process 0 decided True
    assert sharding.same_on_all_processes(False) is True
    assert fake_client.values["puzzle_jax/same on all processes/1/1"] == ""
