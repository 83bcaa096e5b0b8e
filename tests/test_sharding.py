"""Tests of the data-parallel mesh helpers."""

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


def test_process_barrier_waits_only_when_there_are_several_processes(monkeypatch):
    from jax.experimental import multihost_utils

    names = []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", names.append)
    sharding.wait_for_all_processes("alone")
    assert names == []  # one process: nothing to wait for (and no collective to compile)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    sharding.wait_for_all_processes("stage done")
    assert names == ["stage done"]


def test_local_mesh_holds_only_this_processs_devices(monkeypatch):
    everything = jax.devices()
    assert sharding.create_local_mesh().devices.tolist() == sharding.create_mesh().devices.tolist() == everything
    # As on one host of a pod: 8 devices in the run, 4 of them this process's.
    monkeypatch.setattr(jax, "local_devices", lambda: everything[4:])
    assert sharding.create_local_mesh().devices.tolist() == everything[4:]
    assert sharding.create_local_mesh(2).devices.tolist() == everything[4:6]
    with pytest.raises(ValueError, match="4 device"):
        sharding.create_local_mesh(5)
