"""Random-walk benchmark: our stencil walk (``puzzle_jax.refine.random_walk``) against the authors' dense walk.

The authors' ``propagate_to_edge`` (IRN's, spec §8) builds the dense ``(hw, hw)`` transition matrix of the
stride-4 grid, squares it ``exp_times`` = 8 times and multiplies the CAMs by it; ours applies the equivalent
69-point stencil 256 times. This prints images/s and peak memory of both, on the same device in the same run:

    python -m benchmarks.random_walk                          # CPU: 375x500 and 640x640, K=2
    python -m benchmarks.random_walk --device cuda --json rw.json
    python -m benchmarks.random_walk --sizes 24x32 --dense-max-seconds 60   # smoke size

The dense side is PyTorch float32, as the authors: the sparse path affinities on the 1.0-padded edge (shifted slices
over the path geometry of ``puzzle_jax.refine.paths``), scattered with their transposes and the diagonal into a
dense matrix by ``torch.sparse_coo_tensor(...).to_dense()``, cropped, ``** beta``, column-normalised, squared 8
times, ``x @ T``. Full float32 in the matmuls on both sides (``torch.backends.cuda.matmul.allow_tf32 = False``; the
stencil has no matmul).

Where the dense walk is too long to run (268 TFLOP at 640x640), its time is extrapolated and marked so in the table:
a probe matmul first measures the device's float32 matmul rate; if the 8 squarings would take more than
``--dense-max-seconds``, only one of them is timed and counted 8 times ("extrapolated: 1 of 8 squarings"), and if
even one would, a 4096x4096 squaring is timed and scaled by ``(n / 4096) ** 3`` with the n² parts (construction,
power, normalisation) left out ("extrapolated: matmul rate", a lower bound). Peak memory: XLA's static analysis of
the compiled walk for ours (``memory_analysis()``: arguments + outputs + temporaries); ``torch.cuda``'s peak on a
GPU and, on a CPU, the dense matrices the authors' code holds at once (the padded matrix and its crop, then ``A``,
``T`` and ``T @ T``: a lower bound, "analytic") for theirs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

# The dense walk needs the device memory JAX would otherwise reserve up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from puzzle_jax.refine import paths, random_walk  # noqa: E402

RADIUS = 5
BETA = 10
EXP_TIMES = 8
PROBE_SIZE = 4096


def grid_of(image_size: tuple[int, int]) -> tuple[int, int]:
    """The stride-4 grid of an image, as the authors' edge crop ``(ceil(H/4), ceil(W/4))``."""
    return math.ceil(image_size[0] / 4), math.ceil(image_size[1] / 4)


def random_inputs(classes: int, grid: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CAMs in [0, 1] and edges mostly near 0 (values do not change the speed of either walk)."""
    rng = np.random.default_rng(seed)
    cams = rng.random((classes, *grid), dtype=np.float32)
    edge = (rng.random(grid, dtype=np.float32) ** 3).astype(np.float32)
    return cams, edge


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_sparse_affinity(padded_edge: torch.Tensor) -> torch.Tensor:
    """``(D, Hs, Ws)`` path affinities ``1 - max(edge along the path)`` of the padded edge, by shifted slices."""
    height, width = padded_edge.shape
    rows, cols = paths.source_window(height, width, RADIUS)
    per_direction = []
    for path in paths.path_offsets(RADIUS):
        maxima = None
        for dy, dx in path.tolist():
            shifted = padded_edge[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
            maxima = shifted if maxima is None else torch.maximum(maxima, shifted)
        per_direction.append(maxima)
    return 1 - torch.stack(per_direction)


def dense_transition(edge: torch.Tensor, squarings: int) -> torch.Tensor:
    """The authors' dense transition matrix after ``squarings`` squarings (the time of each is what matters)."""
    height, width = edge.shape
    padded_height, padded_width = height + RADIUS, width + 2 * RADIUS
    padded = torch.nn.functional.pad(edge, (RADIUS, RADIUS, 0, RADIUS), value=1.0)
    sparse = _torch_sparse_affinity(padded).reshape(-1)
    flat = np.arange(padded_height * padded_width).reshape(padded_height, padded_width)
    rows, cols = paths.source_window(padded_height, padded_width, RADIUS)
    sources = flat[rows, cols].reshape(-1)
    destinations = np.concatenate(
        [
            flat[rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx].reshape(-1)
            for dy, dx in paths.search_directions(RADIUS).tolist()
        ]
    )
    sources = np.tile(sources, len(paths.search_directions(RADIUS)))
    vertices = padded_height * padded_width
    diagonal = np.arange(vertices)
    indices = torch.from_numpy(
        np.stack([np.concatenate([sources, diagonal, destinations]), np.concatenate([destinations, diagonal, sources])])
    ).to(edge.device)
    values = torch.cat([sparse, torch.ones(vertices, device=edge.device), sparse])
    dense = torch.sparse_coo_tensor(indices, values, (vertices, vertices), check_invariants=False).to_dense()
    dense = dense.view(padded_height, padded_width, padded_height, padded_width)
    dense = dense[:-RADIUS, RADIUS:-RADIUS, :-RADIUS, RADIUS:-RADIUS].reshape(height * width, height * width)
    scaled = torch.pow(dense, BETA)
    transition = scaled / torch.sum(scaled, dim=0, keepdim=True)
    for _ in range(squarings):
        transition = torch.matmul(transition, transition)
    return transition


def _time_squaring(size: int, device: torch.device) -> float:
    matrix = torch.rand(size, size, device=device)
    torch.matmul(matrix, matrix)  # warm-up (cuBLAS handles, thread pools)
    _synchronize(device)
    start = time.perf_counter()
    torch.matmul(matrix, matrix)
    _synchronize(device)
    return time.perf_counter() - start


def dense_squarings_to_run(seconds_per_squaring: float, max_seconds: float) -> int:
    """How many squarings the dense row runs: all if they fit in ``max_seconds``, else one if it fits, else none."""
    if EXP_TIMES * seconds_per_squaring <= max_seconds:
        return EXP_TIMES
    return 1 if seconds_per_squaring <= max_seconds else 0


def dense_walk_row(cams: np.ndarray, edge: np.ndarray, device: torch.device, max_seconds: float) -> dict:
    """Times the authors' dense walk of one image (measured or extrapolated, see the module docstring)."""
    vertices = edge.size
    probe = min(PROBE_SIZE, vertices)
    seconds_per_squaring = _time_squaring(probe, device) * (vertices / probe) ** 3
    dense_bytes = 4 * vertices**2
    padded_vertices = (edge.shape[0] + RADIUS) * (edge.shape[1] + 2 * RADIUS)
    # The padded dense matrix and its cropped copy, then A, A ** beta (or T) and T @ T at once.
    analytic_peak = max(4 * padded_vertices**2 + dense_bytes, 3 * dense_bytes)
    row = {"framework": "torch dense", "probe_seconds_per_squaring": seconds_per_squaring}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    squarings = dense_squarings_to_run(seconds_per_squaring, max_seconds)
    if squarings:
        edge_tensor = torch.from_numpy(edge).to(device)
        cams_tensor = torch.from_numpy(cams).to(device)
        _synchronize(device)
        start = time.perf_counter()
        transition = dense_transition(edge_tensor, squarings=squarings - 1)
        _synchronize(device)
        built = time.perf_counter()
        transition = torch.matmul(transition, transition)
        _synchronize(device)
        squared = time.perf_counter()
        x = (cams_tensor * (1 - edge_tensor)).reshape(len(cams), -1)
        walked = torch.matmul(x, transition).reshape(cams.shape)
        _synchronize(device)
        finished = time.perf_counter()
        if squarings == EXP_TIMES:
            seconds, mode = finished - start, "measured"
            row["walked"] = walked.cpu().numpy()
        else:
            # Construction + one squaring + x @ T measured; the other 7 squarings counted as the timed one.
            seconds = finished - start + (EXP_TIMES - 1) * (squared - built)
            mode = f"extrapolated: 1 of {EXP_TIMES} squarings"
        row["seconds_per_squaring"] = squared - built
        del transition
    else:
        seconds, mode = EXP_TIMES * seconds_per_squaring, f"extrapolated: matmul rate ({probe}x{probe} squaring)"
    if device.type == "cuda" and squarings:
        row.update(peak_bytes=torch.cuda.max_memory_allocated(device), memory_source="torch.cuda peak")
        torch.cuda.empty_cache()
    else:
        row.update(peak_bytes=analytic_peak, memory_source="analytic lower bound")
    row.update(seconds_per_image=seconds, images_per_second=1 / seconds, mode=mode)
    return row


def stencil_walk_rows(
    cams: np.ndarray, edge: np.ndarray, batches: list[int], repeats: int, device: jax.Device
) -> list[dict]:
    """Times our jitted walk of batches of same-size images: compile time, median seconds, static peak memory."""
    rows = []
    for batch in batches:
        batched_cams = jax.device_put(np.broadcast_to(cams, (batch, *cams.shape)), device)
        batched_edge = jax.device_put(np.broadcast_to(edge, (batch, *edge.shape)), device)
        start = time.perf_counter()
        compiled = random_walk.propagate_to_edge.lower(
            batched_cams, batched_edge, radius=RADIUS, beta=BETA, exp_times=EXP_TIMES
        ).compile()
        compile_seconds = time.perf_counter() - start
        stats = compiled.memory_analysis()
        peak = (
            stats.temp_size_in_bytes
            + stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
        )
        walked = jax.block_until_ready(compiled(batched_cams, batched_edge, exp_times=EXP_TIMES))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(batched_cams, batched_edge, exp_times=EXP_TIMES))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append(
            {
                "framework": "jax stencil",
                "batch": batch,
                "compile_seconds": compile_seconds,
                "seconds_per_batch": seconds,
                "seconds_per_image": seconds / batch,
                "images_per_second": batch / seconds,
                "peak_bytes": peak,
                "memory_source": "XLA static",
                "mode": f"measured (median of {repeats})",
                "walked": np.asarray(walked[0]),
            }
        )
    return rows


def run(
    sizes: list[tuple[int, int]],
    classes: int,
    batches: list[int],
    repeats: int,
    device_name: str,
    max_seconds: float,
) -> list[dict]:
    """All rows: for each image size, our walk at each batch size, then the dense walk of one image."""
    jax_device = jax.devices("gpu" if device_name == "cuda" else "cpu")[0]
    torch_device = torch.device(device_name)
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    for image_size in sizes:
        grid = grid_of(image_size)
        cams, edge = random_inputs(classes, grid)
        common = {"image": f"{image_size[0]}x{image_size[1]}", "grid": f"{grid[0]}x{grid[1]}", "classes": classes}
        stencil = stencil_walk_rows(cams, edge, batches, repeats, jax_device)
        dense = dense_walk_row(cams, edge, torch_device, max_seconds)
        dense["batch"] = 1
        dense_bytes = 4 * edge.size**2
        for row in [*stencil, dense]:
            row.update(common, dense_matrix_bytes=dense_bytes, device=str(jax_device.device_kind))
        if "walked" in dense:
            difference = np.abs(stencil[0]["walked"] - dense["walked"]).max() / np.abs(dense["walked"]).max()
            dense["relative_difference_to_stencil"] = float(difference)
        for row in [*stencil, dense]:
            row.pop("walked", None)
        for row in stencil:
            row["speedup_vs_dense"] = dense["seconds_per_image"] / row["seconds_per_image"]
        results.extend([*stencil, dense])
    return results


def format_table(results: list[dict]) -> str:
    header = ["image", "grid", "K", "framework", "batch", "img/s", "s/img", "peak MiB", "memory", "speedup", "mode"]
    lines = [header]
    for row in results:
        lines.append(
            [
                row["image"],
                row["grid"],
                str(row["classes"]),
                row["framework"],
                str(row["batch"]),
                f"{row['images_per_second']:.4g}",
                f"{row['seconds_per_image']:.4g}",
                f"{row['peak_bytes'] / 2**20:.1f}",
                row["memory_source"],
                f"{row['speedup_vs_dense']:.4g}x" if "speedup_vs_dense" in row else "-",
                row["mode"],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rendered = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def _parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="375x500,640x640", help="image sizes HxW (the grid is a quarter)")
    parser.add_argument("--classes", type=int, default=2, help="CAM channels K")
    parser.add_argument("--batches", default="1", help="batch sizes of our walk, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our walk (median)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dense-max-seconds", type=float, default=120, help="longest dense walk run in full; longer is extrapolated"
    )
    parser.add_argument("--cpu-threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    parser.add_argument("--json", default="", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    results = run(
        sizes=[_parse_size(size) for size in args.sizes.split(",")],
        classes=args.classes,
        batches=[int(batch) for batch in args.batches.split(",")],
        repeats=args.repeats,
        device_name=args.device,
        max_seconds=args.dense_max_seconds,
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"results": results}, file, indent=2)
    for row in results:
        if "relative_difference_to_stencil" in row:
            print(f"{row['image']}: max |stencil - dense| / max |dense| = {row['relative_difference_to_stencil']:.2e}")
    print(format_table(results))


if __name__ == "__main__":
    main()
