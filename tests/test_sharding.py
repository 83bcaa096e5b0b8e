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
