"""Smoke test of benchmarks/random_walk.py at a tiny size: both walks run, agree, and the table comes out."""

import json

import numpy as np

from benchmarks import random_walk as benchmark


def test_tiny_benchmark_rows_agree_and_print(tmp_path, capsys):
    output = tmp_path / "random_walk.json"
    benchmark.main(["--sizes", "24x32,17x30", "--batches", "1,2", "--repeats", "1", "--json", str(output)])
    rows = json.loads(output.read_text())["results"]
    assert [(row["image"], row["framework"], row["batch"]) for row in rows] == [
        ("24x32", "jax stencil", 1),
        ("24x32", "jax stencil", 2),
        ("24x32", "torch dense", 1),
        ("17x30", "jax stencil", 1),
        ("17x30", "jax stencil", 2),
        ("17x30", "torch dense", 1),
    ]
    for row in rows:
        assert row["images_per_second"] > 0 and row["peak_bytes"] > 0
    dense_rows = [row for row in rows if row["framework"] == "torch dense"]
    # The dense float32 walk of PyTorch and ours agree to the dense walk's own float32 rounding.
    assert all(row["mode"] == "measured" and row["relative_difference_to_stencil"] < 1e-4 for row in dense_rows)
    assert rows[3]["grid"] == "5x8" and rows[3]["dense_matrix_bytes"] == 4 * 40**2
    table = capsys.readouterr().out
    assert "jax stencil" in table and "torch dense" in table and "speedup" in table


def test_dense_walk_too_long_is_extrapolated(tmp_path):
    output = tmp_path / "random_walk.json"
    benchmark.main(["--sizes", "24x32", "--repeats", "1", "--dense-max-seconds", "0", "--json", str(output)])
    _, dense = json.loads(output.read_text())["results"]
    assert dense["mode"].startswith("extrapolated: matmul rate") and "relative_difference_to_stencil" not in dense
    np.testing.assert_allclose(dense["seconds_per_image"], 8 * dense["probe_seconds_per_squaring"])


def test_dense_squarings_to_run():
    assert benchmark.dense_squarings_to_run(1.0, 8.0) == 8
    assert benchmark.dense_squarings_to_run(1.0, 7.9) == 1
    assert benchmark.dense_squarings_to_run(1.0, 0.9) == 0
