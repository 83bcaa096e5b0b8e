"""Benchmark runner: our JAX Puzzle-CAM against the authors' PyTorch computation, same device.

Owns the benchmark table of issue 6 and nothing else: it builds every model and step through the
library (``models``, ``objectives``, ``optim``, ``training``, ``sharding``,
``cam_inference``, ``data.input_pipeline``) and times them next to the authors' computation in
PyTorch: their model, optimizer and training step from ``benchmarks.authors_torch`` (the official
``resnest`` package for the backbones), their multi-scale inference transcribed here. Run it from
the repository root as::

    python -m benchmarks.bench --suite gpu --json bench.json      # the full table (~8 min, H100)
    python -m benchmarks.bench --suite cpu --json bench_cpu.json  # a few small rows for a CPU
    python -m benchmarks.bench --suite gpu --dry-run              # list the planned rows only

Rows:
  * ``train``: one Puzzle-CAM step (full forward + 2x2 tiled forward + backward + SGD update) in
    images/s, step time, compile time, peak device memory, model FLOPs per image counted from the
    step's jaxpr (convolutions and matmuls, ``benchmarks.flops``), achieved FLOP/s and MFU against
    the device's peak, and the JAX/PyTorch ratio. XLA's ``cost_analysis()`` counts are kept in the
    JSON for reference only: XLA:GPU's leaves out the convolutions it hands to cuDNN as custom calls.
  * ``inference``: multi-scale (0.5, 1, 1.5, 2) + flip CAMs of VOC-sized images streamed through the
    ``infer_cam`` stage's batched path (``cam_inference.iterate_cams``), images/s.
  * ``pipeline``: the host input pipeline (grain loader, augmentation, batching) in images/s per
    worker.

Design choices (each one for robustness on a time-limited accelerator lease):
  * The parent process imports neither JAX nor PyTorch. Consecutive rows of one framework run in one
    child process (a *phase*), so the two frameworks never hold device memory at the same time
    (JAX's allocator does not hand memory back), a crashed or hung row cannot take the table down,
    and a phase past the hard time limit is killed. Children report each row as soon as it is done,
    so partial results survive.
  * Every row is wrapped in try/except; an error is recorded in its JSON entry and the run moves on.
    Rows that would start after the time budget are skipped and listed. The JSON is rewritten after
    every phase and the table is printed last.
  * The batch and the state stay on the device: the step is measured, not the host-to-device copy
    (the ``pipeline`` rows measure the host side separately). Timing starts after the warm-up steps
    and ends with ``block_until_ready`` / ``torch.cuda.synchronize``; compile time is reported
    separately.
  * "float32" means each framework's default float32 arithmetic, which on NVIDIA Ampere and later is
    TF32 in the convolutions for both JAX and PyTorch (cuDNN); ``--fp32-precision=highest`` forces
    full float32 in both. MFU of float32 rows is taken against the TF32 (or full float32) peak
    accordingly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from configs import default as default_config

# Worker processes import ``benchmarks`` from here, wherever the parent was started.
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Marks the lines a worker process prints for the parent; everything else a worker prints is passed
# through.
_MESSAGE_MARKER = "@@PUZZLE_BENCH@@ "

NUM_CLASSES = 20
OUTPUT_STRIDE = 16
TRAIN_LEARNING_RATE = 0.1
TRAIN_WEIGHT_DECAY = 1e-4
# Length of the poly schedule and of the alpha ramp; only its ratio to the step matters for the
# numbers.
TRAIN_TOTAL_STEPS = 4950
# The ``flops_source`` of the JAX train rows (``benchmarks.flops``).
JAXPR_FLOPS_SOURCE = "jaxpr count (convolutions + matmuls)"
INFERENCE_SCALES = (0.5, 1.0, 1.5, 2.0)
INFERENCE_PAD_MULTIPLE = 64  # configs/default.py's infer.pad_multiple
INFERENCE_IMAGES_PER_CALL = 8  # configs/default.py's infer.images_per_call
PIPELINE_SOURCE_SIZE = (375, 500)  # a typical VOC image, (height, width)
PIPELINE_RESCALE_RANGE = (320, 640)

DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("jax", "torch", "host")
KINDS = ("train", "inference", "pipeline")
TORCH_LAYOUTS = ("nchw", "channels_last")
FP32_PRECISIONS = ("default", "highest")
SUITES = ("gpu", "cpu", "smoke", "grid")
# Architectures whose PyTorch reference computes exactly what our model computes (``resnet_tiny``'s
# does not).
TORCH_EQUIVALENT_ARCHS = (
    "resnet50",
    "resnet101",
    "resnest50",
    "resnest101",
    "resnest200",
    "resnest269",
)

# Dense (no structured sparsity) peak FLOP/s in TFLOP/s from the vendors' datasheets, matched by a
# lower-case substring of the device kind, first match wins. "tf32" is the tensor-core float32 rate
# both frameworks use by default for convolutions; "fp32" is the full-precision rate. TPUs run
# float32 convolutions as bf16 passes at DEFAULT precision, so the bf16 peak is listed for all
# three.
PEAK_TFLOPS_BY_DEVICE = (
    ("h100 pcie", {"bfloat16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("h100 nvl", {"bfloat16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("h100", {"bfloat16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("h200", {"bfloat16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("gh200", {"bfloat16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("a100", {"bfloat16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("l40s", {"bfloat16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("l4", {"bfloat16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("a10", {"bfloat16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("tpu v6 lite", {"bfloat16": 918.0, "tf32": 918.0, "fp32": 918.0}),
    ("tpu v5 lite", {"bfloat16": 197.0, "tf32": 197.0, "fp32": 197.0}),
    ("tpu v5", {"bfloat16": 459.0, "tf32": 459.0, "fp32": 459.0}),
    ("tpu v4", {"bfloat16": 275.0, "tf32": 275.0, "fp32": 275.0}),
)


def puzzle_settings() -> ml_collections.ConfigDict:
    """The Puzzle-CAM setting every train row times, JAX and PyTorch: ``configs/default.py``'s ``cam``
    section (the README's setting, spec §3)."""
    return default_config.get_config().cam


# --------------------------------------------------------------------------------------------------
# Row specifications and suites
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One configuration to measure.

    Attributes:
      kind: ``train``, ``inference`` or ``pipeline``.
      framework: ``jax``, ``torch`` or ``host`` (the input pipeline).
      arch: backbone name (``models.ARCHITECTURES``); empty for pipeline rows.
      batch: images per device per step (train, pipeline); images timed (inference).
      height, width: input size (train: the crop; inference: the source image; pipeline: the crop).
      dtype: ``float32`` or ``bfloat16`` compute.
      layout: ``nhwc`` for JAX, ``nchw`` or ``channels_last`` for PyTorch, ``host`` for the
        pipeline.
      warmup: untimed steps (images for inference) after compilation.
      steps: timed steps (images for inference, batches for the pipeline).
      program: JAX train rows only: the model's program choices as ``GROUPED_CONV/BN_STATISTICS`` (for example
        ``split/one_pass``: ``model.grouped_conv`` and ``model.bn_statistics``); empty for the config defaults.
    """

    kind: str
    framework: str
    arch: str
    batch: int
    height: int
    width: int
    dtype: str
    layout: str
    warmup: int
    steps: int
    program: str = ""

    @property
    def row_id(self) -> str:
        return (
            f"{self.kind}/{self.framework}/{self.arch or '-'}/b{self.batch}/"
            f"{self.height}x{self.width}/{self.dtype}/{self.layout}"
        ) + (f"/{self.program}" if self.program else "")


def program_options(program: str) -> dict[str, str]:
    """``create_classifier`` keywords of a row's ``program`` (``"split/one_pass"``); ``{}`` for ``""``."""
    if not program:
        return {}
    grouped_conv, separator, bn_statistics = program.partition("/")
    if not separator:
        raise ValueError(f"program {program!r}: expected GROUPED_CONV/BN_STATISTICS, e.g. 'split/one_pass'")
    return {"grouped_conv": grouped_conv, "bn_statistics": bn_statistics}


def with_programs(rows: Sequence[RowSpec], programs: Sequence[str]) -> list[RowSpec]:
    """Each JAX train row once per program (in the given order); ResNets, which have no grouped convolutions,
    only with the programs whose grouped convolution is the default one (``grouped``), each statistics once."""
    if not programs:
        return list(rows)
    expanded: list[RowSpec] = []
    for row in rows:
        if row.framework != "jax" or row.kind != "train":
            expanded.append(row)
            continue
        for program in programs:
            options = program_options(program)
            if row.arch.startswith("resnet") and not row.arch.startswith("resnest"):
                program = f"grouped/{options['bn_statistics']}"
            candidate = dataclasses.replace(row, program=program)
            if candidate not in expanded:
                expanded.append(candidate)
    return expanded


def _train_rows(
    arch: str,
    batch: int,
    size: int,
    dtypes: Sequence[str],
    warmup: int,
    steps: int,
    frameworks: Sequence[str],
) -> list[RowSpec]:
    """JAX rows for ``dtypes`` first (one phase), then the PyTorch rows (the next phase).

    PyTorch float32 runs NCHW, as the authors ran it; PyTorch bfloat16 runs channels-last, the
    layout that makes autocast use tensor cores without transposes (the fair mixed-precision
    reference).
    """
    rows = []
    if "jax" in frameworks:
        rows += [
            RowSpec("train", "jax", arch, batch, size, size, dtype, "nhwc", warmup, steps)
            for dtype in dtypes
        ]
    if "torch" in frameworks:
        rows += [
            RowSpec(
                "train",
                "torch",
                arch,
                batch,
                size,
                size,
                dtype,
                "channels_last" if dtype == "bfloat16" else "nchw",
                warmup,
                steps,
            )
            for dtype in dtypes
        ]
    return rows


def _inference_rows(
    arch: str,
    images: int,
    height: int,
    width: int,
    dtypes: Sequence[str],
    frameworks: Sequence[str],
) -> list[RowSpec]:
    rows = []
    if "jax" in frameworks:
        rows += [
            RowSpec("inference", "jax", arch, images, height, width, dtype, "nhwc", 1, images)
            for dtype in dtypes
        ]
    if "torch" in frameworks:
        rows += [
            RowSpec("inference", "torch", arch, images, height, width, dtype, "nchw", 1, images)
            for dtype in dtypes
        ]
    return rows


def _pipeline_row(batch: int, crop: int, batches: int) -> RowSpec:
    # The loader's batches are uint8 crops (normalised on the device by the step).
    return RowSpec("pipeline", "host", "", batch, crop, crop, "uint8", "host", 1, batches)


def build_suite(name: str, options: argparse.Namespace) -> list[RowSpec]:
    """The rows of a suite, most important first (the last rows fall first to the time budget).

    Args:
      name: one of ``SUITES``.
      options: the parsed command line (``--archs``, ``--batch-sizes``, ``--dtypes``,
        ``--image-size``, ``--warmup-steps``, ``--timed-steps``, ``--frameworks``, ``--kinds``
        refine or filter the suite).

    Returns:
      The ordered row specifications.
    """
    frameworks = options.frameworks
    warmup = options.warmup_steps
    steps = options.timed_steps
    rows: list[RowSpec] = []
    if name == "gpu":
        warmup = 3 if warmup is None else warmup
        steps = 10 if steps is None else steps
        size = options.image_size or 512
        both = ("bfloat16", "float32")

        def train(arch: str, batch: int) -> list[RowSpec]:
            return _train_rows(arch, batch, size, both, warmup, steps, frameworks)

        # The targets first: ResNeSt-101 at batch 16 and 32, mixed precision and float32.
        rows += train("resnest101", 16)
        rows += train("resnest101", 32)
        rows += _inference_rows("resnest101", 8, 375, 500, both, frameworks)
        rows.append(_pipeline_row(16, size, 12))
        rows += train("resnet50", 32)
        rows += train("resnest50", 32)
        rows += train("resnest269", 8)
        # Then the rest of the grid, and the other PyTorch layouts for the headline row.
        rows += [
            RowSpec(
                "train", "torch", "resnest101", 16, size, size, "bfloat16", "nchw", warmup, steps
            ),
            RowSpec(
                "train",
                "torch",
                "resnest101",
                16,
                size,
                size,
                "float32",
                "channels_last",
                warmup,
                steps,
            ),
        ]
        rows += train("resnest101", 8)
        rows += train("resnet50", 16)
        rows += train("resnest50", 16)
        rows += train("resnest269", 16)
        rows += train("resnet50", 8)
        rows += train("resnest50", 8)
        rows += train("resnest269", 32)
    elif name == "cpu":
        warmup = 1 if warmup is None else warmup
        steps = 3 if steps is None else steps
        size = options.image_size or 224
        rows += _train_rows("resnet50", 2, size, ("float32",), warmup, steps, frameworks)
        rows.append(_pipeline_row(8, 512, 6))
        rows += _inference_rows("resnet50", 2, 188, 250, ("float32",), frameworks)
    elif name == "smoke":
        warmup = 1 if warmup is None else warmup
        steps = 2 if steps is None else steps
        size = options.image_size or 64
        rows += _train_rows("resnet_tiny", 2, size, ("float32",), warmup, steps, frameworks)
        rows += _inference_rows("resnet_tiny", 2, 48, 64, ("float32",), frameworks)
        rows.append(_pipeline_row(2, size, 3))
    elif name == "grid":
        warmup = 3 if warmup is None else warmup
        steps = 10 if steps is None else steps
        size = options.image_size or 512
        for arch in options.archs or ("resnest101",):
            for batch in options.batch_sizes or (16,):
                rows += _train_rows(
                    arch, batch, size, options.dtypes or DTYPES, warmup, steps, frameworks
                )
    else:
        raise ValueError(f"--suite={name!r}; allowed values are {list(SUITES)}.")
    return _filter_rows(with_programs(rows, getattr(options, "jax_programs", ())), options)


def _filter_rows(rows: list[RowSpec], options: argparse.Namespace) -> list[RowSpec]:
    """Applies ``--archs``, ``--batch-sizes``, ``--dtypes``, ``--kinds``, ``--frameworks``."""
    selected = []
    for row in rows:
        if options.kinds and row.kind not in options.kinds:
            continue
        if row.framework not in options.frameworks and row.framework != "host":
            continue
        if row.kind != "pipeline":
            if options.archs and row.arch not in options.archs:
                continue
            if options.dtypes and row.dtype not in options.dtypes:
                continue
            if options.batch_sizes and row.kind == "train" and row.batch not in options.batch_sizes:
                continue
        selected.append(row)
    return selected


def group_into_phases(rows: Sequence[RowSpec]) -> list[tuple[str, list[RowSpec]]]:
    """Splits the ordered rows into runs of one framework (one child process each)."""
    phases: list[tuple[str, list[RowSpec]]] = []
    for row in rows:
        if phases and phases[-1][0] == row.framework:
            phases[-1][1].append(row)
        else:
            phases.append((row.framework, [row]))
    return phases


# --------------------------------------------------------------------------------------------------
# Shared worker helpers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WorkerSettings:
    """What a worker needs besides its rows (sent as JSON to child processes)."""

    soft_deadline: float  # epoch seconds: no row starts after this
    hard_deadline: float  # epoch seconds: the parent kills the phase at this time
    num_devices: int = 1
    fp32_precision: str = "default"
    compile_estimates: dict = dataclasses.field(
        default_factory=dict
    )  # arch -> seconds, from earlier phases
    compilation_cache_dir: str = ""
    seed: int = 0
    require_accelerator: bool = (
        False  # fail the phase at once rather than benchmark a CPU by mistake
    )
    # 0 = each framework's default; 1 = single-threaded JAX (XLA CPU) and PyTorch.
    cpu_threads: int = 0
    per_step_timing: bool = False  # see _time_steps


def _host_peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _synthetic_labels(rng, batch: int):
    """Multi-hot labels with at least one class per image."""
    import numpy as np

    labels = (rng.random((batch, NUM_CLASSES)) < 0.15).astype(np.float32)
    labels[np.arange(batch), rng.integers(0, NUM_CLASSES, batch)] = 1.0
    return labels


def _synthetic_train_batch(batch: int, height: int, width: int, seed: int):
    """Normalised-looking float32 images (the PyTorch step's input, as the authors' loader gives it) and labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, height, width, 3), dtype=np.float32)
    return images, _synthetic_labels(rng, batch)


def _synthetic_loader_batch(batch: int, height: int, width: int, seed: int) -> dict:
    """A batch as our train loader hands it to the step: uint8 crops (normalised inside the step),
    each image's box on its crop (here the whole crop) and multi-hot labels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    boxes = np.tile(np.array([0, 0, height, width], np.int32), (batch, 1))
    return {"image": images, "image_box": boxes, "labels": _synthetic_labels(rng, batch)}


def _synthetic_voc_images(count: int, height: int, width: int, seed: int):
    """uint8 RGB images and their multi-hot labels (two classes each)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]
    labels = []
    for _ in range(count):
        label = np.zeros(NUM_CLASSES, np.float32)
        label[rng.choice(NUM_CLASSES, 2, replace=False)] = 1.0
        labels.append(label)
    return images, labels


def _time_steps(
    run_step: Callable[[], Any], synchronize: Callable[[Any], Any], count: int, per_step: bool
) -> tuple[float, dict[str, Any]]:
    """Times ``count`` calls of ``run_step``; returns seconds per step and how it was measured.

    Without ``per_step`` the steps run back to back (asynchronous dispatch overlaps them, as in
    training) and one synchronisation ends the measurement: the mean is returned. With ``per_step``
    every step is synchronised and timed alone, and the median is returned, which is robust to other
    processes taking the CPU for a moment (a shared CPU).
    """
    if per_step:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            synchronize(run_step())
            times.append(time.perf_counter() - start)
        timing = {
            "timing": f"median of {count} individually synchronised steps",
            "step_times_ms": [1000.0 * value for value in times],
            "min_step_time_ms": 1000.0 * min(times),
        }
        return statistics.median(times), timing
    start = time.perf_counter()
    output = None
    for _ in range(count):
        output = run_step()
    synchronize(output)
    elapsed = time.perf_counter() - start
    return elapsed / count, {"timing": f"mean of {count} back-to-back steps, one final sync"}


def _base_result(spec: RowSpec) -> dict[str, Any]:
    result = dataclasses.asdict(spec)
    result.update(id=spec.row_id, status="ok", error=None)
    return result


def _should_skip(spec: RowSpec, settings: WorkerSettings) -> str | None:
    """Why ``spec`` must not start now (time budget), or None."""
    now = time.time()
    if now > settings.soft_deadline:
        return "time budget used up before this row started"
    estimate = settings.compile_estimates.get(spec.arch) if spec.framework == "jax" else None
    if estimate and now + estimate > settings.hard_deadline:
        return (
            f"a {spec.arch} compile took {estimate:.0f} s earlier; it would not finish before the "
            "hard time limit"
        )
    return None


def run_rows(
    framework: str, specs: Sequence[RowSpec], settings: WorkerSettings, emit: Callable[[dict], None]
) -> None:
    """Runs ``specs`` of one framework in this process; emits one result per row, errors too."""
    environment: dict[str, Any] = {}
    try:
        if framework == "jax":
            runner, environment = _JaxRunner(settings), _jax_environment()
        elif framework == "torch":
            runner, environment = _TorchRunner(settings), _torch_environment()
        elif framework == "host":
            runner, environment = _HostRunner(settings), {}
        else:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    except Exception as error:  # noqa: BLE001 (any set-up failure becomes an error on every row)
        message = f"{framework} set-up failed: {type(error).__name__}: {error}"
        traceback.print_exc()
        for spec in specs:
            emit({"type": "row", "row": dict(_base_result(spec), status="error", error=message)})
        return
    emit({"type": "environment", "framework": framework, "environment": environment})
    for spec in specs:
        result = _base_result(spec)
        reason = _should_skip(spec, settings)
        if reason:
            result.update(status="skipped", error=reason)
            emit({"type": "row", "row": result})
            continue
        print(f"[bench] {spec.row_id} ...", file=sys.stderr, flush=True)
        started = time.time()
        try:
            result.update(runner.run(spec))
        except Exception as error:  # noqa: BLE001 (one failing row must not stop the table)
            traceback.print_exc()
            result.update(
                status="error", error=f"{type(error).__name__}: {_first_line(str(error))}"
            )
        finally:
            runner.cleanup()
        result["elapsed_s"] = time.time() - started
        result["host_peak_rss_bytes"] = _host_peak_rss_bytes()
        if result.get("compile_time_s") and spec.framework == "jax" and spec.kind == "train":
            previous = settings.compile_estimates.get(spec.arch, 0.0)
            settings.compile_estimates[spec.arch] = max(previous, result["compile_time_s"])
        print(
            f"[bench] {spec.row_id}: {result['status']} "
            f"{_format_number(result.get('images_per_second'), '.1f')} img/s "
            f"in {result['elapsed_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        emit({"type": "row", "row": result})


def _first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]


# --------------------------------------------------------------------------------------------------
# JAX rows (our library)
# --------------------------------------------------------------------------------------------------


def _jax_environment() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax

    device = jax.devices()[0]
    environment = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
        "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", ""),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    try:
        import orbax.checkpoint

        environment["orbax_checkpoint"] = getattr(orbax.checkpoint, "__version__", "?")
    except Exception:  # noqa: BLE001 (only informative)
        pass
    return environment


def _xla_flops(analysis) -> float | None:
    """Total FLOPs per device from a ``cost_analysis()`` result (a dict, a list of them, None)."""
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


def _jax_device_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def build_jax_train_step(
    arch: str,
    *,
    batch_per_device: int,
    height: int,
    width: int,
    dtype: str = "float32",
    num_devices: int = 1,
    seed: int = 0,
    remat: bool = False,
    model_options: dict[str, str] | None = None,
):
    """Our Puzzle-CAM training step, built only from the library's public functions, and its inputs.

    Args:
      arch: one of ``models.ARCHITECTURES``.
      batch_per_device: images per device.
      height, width: crop size.
      dtype: ``float32`` or ``bfloat16`` compute (parameters and BatchNorm statistics stay float32).
      num_devices: mesh size (0 = all devices).
      seed: initialisation and synthetic-data seed.
      remat: recompute each residual block's activations in the backward pass (``model.remat``).
      model_options: more ``models.create_classifier`` keywords (``grouped_conv``, ``bn_statistics``).

    Returns:
      ``(train_step, state, batch, devices)``: the jitted, state-donating step of
      ``training.make_train_step``, the replicated initial state, a synthetic global batch on the
      devices, and the mesh size.
    """
    import jax.numpy as jnp
    from flax import nnx

    from puzzle_jax import models, objectives, optim, sharding, training

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed values are {list(DTYPES)}.")
    mesh = sharding.create_mesh(num_devices)
    devices = mesh.devices.size
    model = models.create_classifier(
        arch,
        NUM_CLASSES,
        output_stride=OUTPUT_STRIDE,
        bn_mode="global",
        dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype],
        remat=remat,
        rngs=nnx.Rngs(seed),
        **(model_options or {}),
    )
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(
        params,
        learning_rate=TRAIN_LEARNING_RATE,
        weight_decay=TRAIN_WEIGHT_DECAY,
        total_steps=TRAIN_TOTAL_STEPS,
    )
    objective = objectives.create_puzzle_objective(
        puzzle_settings(), TRAIN_TOTAL_STEPS, OUTPUT_STRIDE
    )
    graphdef, state = training.create_train_state(model, optimizer, mesh)
    train_step = training.make_train_step(graphdef, optimizer, objective, mesh)
    batch = sharding.host_batch_to_global(
        _synthetic_loader_batch(batch_per_device * devices, height, width, seed), mesh
    )
    return train_step, state, batch, devices


class _JaxRunner:
    """Times our training step, CAM inference, from the library's public functions."""

    def __init__(self, settings: WorkerSettings):
        import jax

        self.settings = settings
        if settings.require_accelerator and jax.default_backend() == "cpu":
            raise RuntimeError(
                f"JAX sees no accelerator (devices: {jax.devices()}); check the CUDA plugin"
            )
        if settings.fp32_precision == "highest":
            jax.config.update("jax_default_matmul_precision", "highest")
        if settings.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", settings.compilation_cache_dir)

    def run(self, spec: RowSpec) -> dict[str, Any]:
        if spec.kind == "train":
            return self._train(spec)
        if spec.kind == "inference":
            return self._inference(spec)
        raise ValueError(f"JAX rows are train or inference, got kind={spec.kind!r}")

    def cleanup(self) -> None:
        import gc

        gc.collect()

    def _train(self, spec: RowSpec) -> dict[str, Any]:
        import jax
        import numpy as np

        from benchmarks import flops
        from puzzle_jax import training

        train_step, state, batch, devices = build_jax_train_step(
            spec.arch,
            batch_per_device=spec.batch,
            height=spec.height,
            width=spec.width,
            dtype=spec.dtype,
            num_devices=self.settings.num_devices,
            seed=self.settings.seed,
            model_options=program_options(spec.program),
        )
        global_batch = spec.batch * devices
        started = time.perf_counter()
        traced_step = train_step.trace(state, batch)
        lowered = traced_step.lower()
        traced = time.perf_counter()
        compiled = lowered.compile()
        compile_done = time.perf_counter()
        # The jaxpr has the global shapes, so its count is the FLOPs of the whole global batch.
        model_flops = flops.count_jaxpr_flops(traced_step.jaxpr).total
        xla_flops_per_device = _xla_flops(compiled.cost_analysis())
        xla_lowered_flops_per_device = _xla_flops(lowered.cost_analysis())

        carried = {"state": state, "metrics": None}
        del state  # donated to the first step

        def one_step():
            carried["state"], carried["metrics"] = compiled(carried["state"], batch)
            return carried["state"], carried["metrics"]

        for _ in range(spec.warmup):
            one_step()
        jax.block_until_ready(carried["state"])
        step_time, timing = _time_steps(
            one_step, jax.block_until_ready, spec.steps, self.settings.per_step_timing
        )
        metrics = carried["metrics"]
        final_loss = float(np.asarray(metrics["loss"])) if metrics is not None else None
        xla_memory = training.step_memory_bytes(compiled)
        device_peak = _jax_device_peak_bytes()
        carried.clear()
        return {
            **timing,
            "global_batch": global_batch,
            "devices": devices,
            "images_per_second": global_batch / step_time,
            "step_time_ms": 1000.0 * step_time,
            "trace_time_s": traced - started,
            "compile_time_s": compile_done - traced,
            "model_flops_per_image": model_flops / global_batch or None,
            "flops_per_image": model_flops / global_batch or None,
            "flops_source": JAXPR_FLOPS_SOURCE if model_flops else None,
            # For reference only: XLA:GPU's count leaves out the convolutions run as cuDNN custom calls.
            "xla_flops_per_image": (
                xla_flops_per_device * devices / global_batch if xla_flops_per_device else None
            ),
            "xla_lowered_flops_per_image": (
                xla_lowered_flops_per_device * devices / global_batch
                if xla_lowered_flops_per_device
                else None
            ),
            "peak_memory_bytes": device_peak if device_peak is not None else xla_memory,
            "peak_memory_source": (
                "device peak_bytes_in_use (process high-water mark)"
                if device_peak is not None
                else "xla memory_analysis (arguments + outputs + temporaries - aliased)"
            ),
            "xla_memory_analysis_bytes": xla_memory,
            # Random data at the authors' learning rate may diverge; that changes no timing, so a
            # non-finite loss is recorded rather than failing the row.
            "final_loss": final_loss
            if final_loss is not None and math.isfinite(final_loss)
            else None,
            "loss_finite": final_loss is not None and math.isfinite(final_loss),
        }

    def _inference(self, spec: RowSpec) -> dict[str, Any]:
        import jax.numpy as jnp
        from flax import nnx

        from puzzle_jax import cam_inference, models

        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[spec.dtype]
        model = models.create_classifier(
            spec.arch,
            NUM_CLASSES,
            output_stride=OUTPUT_STRIDE,
            bn_mode="global",
            dtype=dtype,
            rngs=nnx.Rngs(self.settings.seed),
        )
        forward = cam_inference.create_forward(model)
        images, labels = _synthetic_voc_images(
            spec.warmup + spec.steps, spec.height, spec.width, self.settings.seed
        )
        scales = _inference_scales(spec)
        # The stage's steady state is full calls (only a bucket's last call is partial); a row timing fewer images
        # than a call holds would otherwise time mostly empty slots (4x for the CPU suite's 2 images).
        inputs_per_call = min(INFERENCE_IMAGES_PER_CALL, spec.steps)

        def stream(indices: range) -> None:
            # The infer_cam stage's path: inputs of one size bucket batched across images.
            records = ((str(index), images[index], labels[index]) for index in indices)
            for _ in cam_inference.iterate_cams(
                forward,
                records,
                scales=scales,
                flip=True,
                pad_multiple=INFERENCE_PAD_MULTIPLE,
                output_stride=OUTPUT_STRIDE,
                images_per_call=inputs_per_call,
            ):
                pass

        started = time.perf_counter()
        stream(range(spec.warmup))  # compiles one executable per size bucket (calls have a fixed batch size)
        warm = time.perf_counter()
        stream(range(spec.warmup, spec.warmup + spec.steps))
        image_time = (time.perf_counter() - warm) / spec.steps
        timing = {
            "timing": f"{spec.steps} images streamed through iterate_cams, {inputs_per_call} inputs (images at "
            "one scale, with their flips) per call, one wall-clock measurement"
        }
        device_peak = _jax_device_peak_bytes()
        return {
            **timing,
            "images_per_second": 1.0 / image_time,
            "step_time_ms": 1000.0 * image_time,
            "compile_time_s": warm - started,
            "scales": list(scales),
            "peak_memory_bytes": device_peak,
            "peak_memory_source": "device peak_bytes_in_use (process high-water mark)"
            if device_peak
            else None,
        }


def _inference_scales(spec: RowSpec) -> tuple[float, ...]:
    # Tiny smoke images cannot be halved below one output-stride cell and still be meaningful.
    return INFERENCE_SCALES if min(spec.height, spec.width) >= 128 else (0.5, 1.0)


# --------------------------------------------------------------------------------------------------
# PyTorch rows: the authors' computation (``authors_torch``'s model and step; their inference)
# --------------------------------------------------------------------------------------------------


def _torch_environment() -> dict[str, Any]:
    import torch

    environment = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        environment["device_kind"] = torch.cuda.get_device_name(0)
    try:
        import resnest

        environment["resnest_path"] = os.path.dirname(resnest.__file__)
    except Exception:  # noqa: BLE001 (reported by the rows themselves)
        pass
    return environment


def _torch_memory_format(layout: str):
    import torch

    if layout not in TORCH_LAYOUTS:
        raise ValueError(f"PyTorch layout={layout!r}; allowed values are {list(TORCH_LAYOUTS)}.")
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def build_torch_train_step(
    arch: str,
    *,
    batch: int,
    height: int,
    width: int,
    dtype: str,
    layout: str,
    device,
    seed: int = 0,
):
    """The authors' step in PyTorch on ``device`` (``benchmarks.authors_torch``), and a synthetic batch of
    normalised-looking float32 images (what the authors' loader gives their step; our step gets the loader's uint8
    crops).

    Args:
      arch: one of ``authors_torch.ARCHITECTURES``.
      batch: images per step.
      height, width: crop size.
      dtype: ``float32``, or ``bfloat16`` for ``torch.autocast`` (parameters stay float32).
      layout: ``nchw`` or ``channels_last`` (model and images).
      device: a ``torch.device``.
      seed: initialisation and synthetic-data seed.

    Returns:
      ``(train_step, images, labels)``; ``train_step(images, labels)`` runs one iteration and
      returns its losses (``"loss"``: the total).
    """
    import torch

    from benchmarks import authors_torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed values are {list(DTYPES)}.")
    torch.manual_seed(seed)
    memory_format = _torch_memory_format(layout)
    model = authors_torch.create_classifier(arch, NUM_CLASSES, OUTPUT_STRIDE)
    model = model.to(device, memory_format=memory_format)
    model.train()
    optimizer = authors_torch.create_optimizer(
        model,
        learning_rate=TRAIN_LEARNING_RATE,
        weight_decay=TRAIN_WEIGHT_DECAY,
        max_step=TRAIN_TOTAL_STEPS,
    )
    train_step = authors_torch.create_puzzle_train_step(
        model,
        optimizer,
        puzzle_settings(),
        max_step=TRAIN_TOTAL_STEPS,
        batch_size=batch,
        device_type=device.type,
        dtype=dtype,
    )
    images, labels = _synthetic_train_batch(batch, height, width, seed)
    images = (
        torch.from_numpy(images)
        .permute(0, 3, 1, 2)
        .to(device)
        .contiguous(memory_format=memory_format)
    )
    return train_step, images, torch.from_numpy(labels).to(device)


class _TorchRunner:
    """Times the authors' computation in PyTorch on the same device."""

    def __init__(self, settings: WorkerSettings):
        import torch

        self.settings = settings
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if settings.require_accelerator and self.device.type != "cuda":
            raise RuntimeError("PyTorch sees no CUDA device")
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        if self.device.type == "cuda":
            # Let cuDNN pick its fastest algorithms (the counterpart of XLA's autotuning).
            torch.backends.cudnn.benchmark = True
        if settings.fp32_precision == "highest":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False

    def cleanup(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> tuple[int | None, str | None]:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
        return None, None

    def run(self, spec: RowSpec) -> dict[str, Any]:
        if self.settings.num_devices not in (0, 1):
            raise ValueError("the PyTorch reference runs on one device; use --num-devices=1")
        if spec.kind == "train":
            return self._train(spec)
        if spec.kind == "inference":
            return self._inference(spec)
        raise ValueError(f"PyTorch rows are train or inference, got kind={spec.kind!r}")

    def _train(self, spec: RowSpec) -> dict[str, Any]:
        from torch.utils.flop_counter import FlopCounterMode

        self._reset_peak()
        train_step, images, labels = build_torch_train_step(
            spec.arch,
            batch=spec.batch,
            height=spec.height,
            width=spec.width,
            dtype=spec.dtype,
            layout=spec.layout,
            device=self.device,
            seed=self.settings.seed,
        )

        # The first step runs under the FLOP counter (convolutions and matmuls, forward and
        # backward); it also pays cuDNN's algorithm search, so it is counted as warm-up time. The
        # counter (torch 2.13) counts the backward of a grouped convolution as 3x its forward
        # instead of 2x, so for ResNeSt (split attention) its total is about 20% high; XLA's
        # count is the one the table uses.
        started = time.perf_counter()
        with FlopCounterMode(display=False) as counter:
            train_step(images, labels)
        self._synchronize()
        first_step = time.perf_counter() - started
        counted_flops = float(counter.get_total_flops())
        for _ in range(max(spec.warmup - 1, 0)):
            train_step(images, labels)
        self._synchronize()
        losses = []

        def one_step():
            losses.append(train_step(images, labels)["loss"])

        step_time, timing = _time_steps(
            one_step, lambda _: self._synchronize(), spec.steps, self.settings.per_step_timing
        )
        final_loss = float(losses[-1].detach().cpu()) if losses else None
        peak, peak_source = self._peak()
        return {
            **timing,
            "global_batch": spec.batch,
            "devices": 1,
            "images_per_second": spec.batch / step_time,
            "step_time_ms": 1000.0 * step_time,
            "compile_time_s": None,
            "first_step_time_s": first_step,
            "torch_counted_flops_per_image": counted_flops / spec.batch
            if counted_flops > 0
            else None,
            "peak_memory_bytes": peak,
            "peak_memory_source": peak_source,
            # Random data at the authors' learning rate may diverge; that changes no timing, so a
            # non-finite loss is recorded rather than failing the row.
            "final_loss": final_loss
            if final_loss is not None and math.isfinite(final_loss)
            else None,
            "loss_finite": final_loss is not None and math.isfinite(final_loss),
        }

    def _inference(self, spec: RowSpec) -> dict[str, Any]:
        import numpy as np
        import torch
        import torch.nn.functional as functional

        from benchmarks import authors_torch
        from puzzle_jax.data import transforms  # numpy + PIL only: the same host preprocessing as ours

        torch.manual_seed(self.settings.seed)
        self._reset_peak()
        memory_format = _torch_memory_format(spec.layout)
        model = authors_torch.create_classifier(spec.arch, NUM_CLASSES, OUTPUT_STRIDE)
        model = model.to(self.device, memory_format=memory_format)
        model.eval()
        images, labels = _synthetic_voc_images(
            spec.warmup + spec.steps, spec.height, spec.width, self.settings.seed
        )
        scales = _inference_scales(spec)
        use_autocast = spec.dtype == "bfloat16"

        @torch.no_grad()
        def one_image(index: int) -> None:
            # The authors' inference_classification.py: per scale, a bicubic resize, the image and
            # its flip in one batch, ReLU'd maps summed with the flipped-back map, bilinear resizes
            # summed over scales.
            image = images[index]
            height, width = image.shape[:2]
            strided_size = (math.ceil(height / 4), math.ceil(width / 4))
            full_size = (16 * math.ceil(height / 16), 16 * math.ceil(width / 16))
            strided_sum, full_sum = 0.0, 0.0
            for scale in scales:
                scaled = transforms.resize_image(image, round(height * scale), round(width * scale))
                normalised = torch.from_numpy(transforms.normalize_image(scaled)).permute(2, 0, 1)
                batch = torch.stack([normalised, normalised.flip(-1)]).to(self.device)
                batch = batch.contiguous(memory_format=memory_format)
                with torch.autocast(
                    device_type=self.device.type, dtype=torch.bfloat16, enabled=use_autocast
                ):
                    _, features = model(batch)
                features = functional.relu(features.float())
                summed = features[0:1] + features[1:2].flip(-1)
                strided_sum = (
                    strided_sum
                    + functional.interpolate(
                        summed, strided_size, mode="bilinear", align_corners=False
                    )[0]
                )
                full_sum = (
                    full_sum
                    + functional.interpolate(
                        summed, full_size, mode="bilinear", align_corners=False
                    )[0, :, :height, :width]
                )
            keys = torch.from_numpy(np.flatnonzero(labels[index] > 0)).to(self.device)
            for maps in (strided_sum[keys], full_sum[keys]):
                maps = maps / (functional.adaptive_max_pool2d(maps, (1, 1)) + 1e-5)
                maps.cpu().numpy()

        started = time.perf_counter()
        for index in range(spec.warmup):
            one_image(index)
        self._synchronize()
        warm = time.perf_counter()
        indices = iter(range(spec.warmup, spec.warmup + spec.steps))
        image_time, timing = _time_steps(
            lambda: one_image(next(indices)),
            lambda _: self._synchronize(),
            spec.steps,
            self.settings.per_step_timing,
        )
        peak, peak_source = self._peak()
        return {
            **timing,
            "images_per_second": 1.0 / image_time,
            "step_time_ms": 1000.0 * image_time,
            "first_step_time_s": warm - started,
            "scales": list(scales),
            "peak_memory_bytes": peak,
            "peak_memory_source": peak_source,
        }


# --------------------------------------------------------------------------------------------------
# Host input pipeline rows
# --------------------------------------------------------------------------------------------------


class _HostRunner:
    """Times ``input_pipeline.create_train_loader`` on an in-memory synthetic source (grain)."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings

    def cleanup(self) -> None:
        pass

    def run(self, spec: RowSpec) -> dict[str, Any]:
        try:
            import grain  # noqa: F401 (only checks that the pipeline can run here)
        except ImportError as error:
            return {"status": "skipped", "error": f"grain is not importable here ({error})"}
        from puzzle_jax.data import input_pipeline

        records = max(4 * spec.batch, 32)
        images, labels = _synthetic_voc_images(
            records, *PIPELINE_SOURCE_SIZE, seed=self.settings.seed
        )
        source = [
            {"image": image, "labels": label} for image, label in zip(images, labels, strict=True)
        ]
        loader = input_pipeline.create_train_loader(
            source,
            transform=input_pipeline.ClassifierAugmentation(
                crop_size=spec.height, rescale_range=PIPELINE_RESCALE_RANGE
            ),
            global_batch_size=spec.batch,
            seed=self.settings.seed,
            worker_count=0,
        )
        iterator = iter(loader)
        for _ in range(spec.warmup):
            next(iterator)
        batches = []
        batch_time, timing = _time_steps(
            lambda: batches.append(next(iterator)),
            lambda _: None,
            spec.steps,
            self.settings.per_step_timing,
        )
        shape = batches[-1]["image"].shape
        if shape != (spec.batch, spec.height, spec.width, 3):
            raise ValueError(f"the loader produced images of shape {shape}")
        return {
            **timing,
            "images_per_second": spec.batch / batch_time,
            "step_time_ms": 1000.0 * batch_time,
            "workers": "1 (worker_count=0: the main process decodes and augments)",
            "source_image_size": list(PIPELINE_SOURCE_SIZE),
        }


# --------------------------------------------------------------------------------------------------
# Parent: phases, budget, ratios, MFU, JSON and the table
# --------------------------------------------------------------------------------------------------


def _child_environment(settings: WorkerSettings) -> dict[str, str]:
    """The parent's environment, the repository root first on the import path, and the CPU thread limit (read
    when the child imports JAX)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        path for path in (_REPOSITORY_ROOT, environment.get("PYTHONPATH", "")) if path
    )
    if settings.cpu_threads:
        environment["OMP_NUM_THREADS"] = str(settings.cpu_threads)
        if settings.cpu_threads == 1:
            # XLA's CPU backend has no thread-count flag other than turning its Eigen pool off.
            flags = environment.get("XLA_FLAGS", "")
            environment["XLA_FLAGS"] = (
                f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            )
    return environment


def _run_phase_in_child(
    framework: str,
    specs: Sequence[RowSpec],
    settings: WorkerSettings,
    on_message: Callable[[dict], None],
) -> str | None:
    """Runs one phase in a child process; returns an error text when it did not end normally."""
    payload = json.dumps(
        {
            "framework": framework,
            "rows": [dataclasses.asdict(spec) for spec in specs],
            "settings": dataclasses.asdict(settings),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench", "--worker"],
        env=_child_environment(settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    killed = threading.Event()

    def kill_at_hard_deadline() -> None:
        killed.set()
        process.kill()

    timer = threading.Timer(max(settings.hard_deadline - time.time(), 0.0), kill_at_hard_deadline)
    timer.start()
    try:
        process.stdin.write(payload)
        process.stdin.close()
        for line in process.stdout:
            if line.startswith(_MESSAGE_MARKER):
                on_message(json.loads(line[len(_MESSAGE_MARKER) :]))
            else:
                sys.stderr.write(line)
        returncode = process.wait()
    finally:
        timer.cancel()
    if killed.is_set():
        return "killed at the hard time limit"
    if returncode != 0:
        return f"the {framework} worker process exited with status {returncode}"
    return None


def worker_main() -> int:
    """Child-process entry: reads a phase as JSON on stdin, prints results as marked JSON lines."""
    request = json.load(sys.stdin)
    specs = [RowSpec(**row) for row in request["rows"]]
    settings = WorkerSettings(**request["settings"])

    def emit(message: dict) -> None:
        sys.stdout.write(_MESSAGE_MARKER + json.dumps(message) + "\n")
        sys.stdout.flush()

    run_rows(request["framework"], specs, settings, emit)
    return 0


def peak_tflops_for(
    device_kind: str, dtype: str, fp32_precision: str, overrides: dict[str, float | None]
):
    """The peak TFLOP/s of ``device_kind`` for rows of ``dtype``, and the basis it was taken on.

    Returns:
      ``(peak_tflops, basis)``, or ``(None, reason)`` when the device is not in
      ``PEAK_TFLOPS_BY_DEVICE`` and no override was given.
    """
    override = overrides.get(dtype)
    if override:
        return float(
            override
        ), f"--peak-tflops-{'bf16' if dtype == 'bfloat16' else 'fp32'} override"
    kind = (device_kind or "").lower()
    for substring, peaks in PEAK_TFLOPS_BY_DEVICE:
        if substring in kind:
            if dtype == "bfloat16":
                return peaks["bfloat16"], f"{substring} dense bf16"
            basis = "fp32" if fp32_precision == "highest" else "tf32"
            return peaks[basis], f"{substring} dense {basis}"
    return (
        None,
        f"no peak known for device kind {device_kind!r} "
        "(pass --peak-tflops-bf16/--peak-tflops-fp32)",
    )


def _comparison_key(row: dict) -> tuple:
    """Rows with the same key compute the same thing, in different frameworks or layouts."""
    return (row["kind"], row["arch"], row["batch"], row["height"], row["width"], row["dtype"])


def finalise_rows(
    rows: list[dict],
    environments: dict[str, dict],
    fp32_precision: str,
    overrides: dict[str, float | None],
) -> None:
    """Adds FLOP/s, MFU and the JAX/PyTorch ratios to the measured rows (in place)."""
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault(_comparison_key(row), []).append(row)

    def fastest(key: tuple, framework: str) -> dict | None:
        candidates = [
            row
            for row in by_key.get(key, [])
            if row["framework"] == framework
            and row["status"] == "ok"
            and row.get("images_per_second")
        ]
        return max(candidates, key=lambda row: row["images_per_second"]) if candidates else None

    for row in rows:
        row.setdefault("device_kind", environments.get(row["framework"], {}).get("device_kind"))
        if row["status"] != "ok":
            continue
        key = _comparison_key(row)
        if row["framework"] == "torch" and row["kind"] == "train":
            # The same model FLOPs for both frameworks: the JAX step's count when the JAX row ran,
            # else PyTorch's counter.
            jax_row = fastest(key, "jax") if row["arch"] in TORCH_EQUIVALENT_ARCHS else None
            if jax_row and jax_row.get("flops_per_image"):
                row["flops_per_image"] = jax_row["flops_per_image"]
                row["flops_source"] = (
                    f"{jax_row.get('flops_source') or 'FLOP count'} of the matching JAX step"
                )
            elif row.get("torch_counted_flops_per_image"):
                row["flops_per_image"] = row["torch_counted_flops_per_image"]
                row["flops_source"] = (
                    "torch.utils.flop_counter (convolutions and matmuls only; overcounts the "
                    "backward of grouped convolutions)"
                )
        flops = row.get("flops_per_image")
        if flops and row.get("images_per_second"):
            achieved = flops * row["images_per_second"] / row.get("devices", 1)
            row["achieved_tflops_per_device"] = achieved / 1e12
            peak, basis = peak_tflops_for(
                row.get("device_kind") or "", row["dtype"], fp32_precision, overrides
            )
            row["peak_tflops"] = peak
            row["peak_basis"] = basis
            row["mfu"] = achieved / (peak * 1e12) if peak else None
        if row["framework"] == "jax":
            torch_row = fastest(key, "torch")
            if torch_row:
                row["jax_over_torch"] = row["images_per_second"] / torch_row["images_per_second"]
                row["torch_reference_id"] = torch_row["id"]
            float32_key = key[:-1] + ("float32",)
            torch_float32 = fastest(float32_key, "torch")
            if torch_float32:
                row["jax_over_torch_float32"] = (
                    row["images_per_second"] / torch_float32["images_per_second"]
                )


def _format_number(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows, in run order."""
    header = (
        "kind",
        "fw",
        "arch",
        "batch",
        "size",
        "dtype",
        "layout",
        "img/s",
        "step ms",
        "compile s",
        "peak GiB",
        "GFLOP/img",
        "TFLOP/s",
        "MFU",
        "jax/torch",
        "jax/torch32",
        "status",
    )
    lines = []
    for row in rows:
        status = (
            row["status"]
            if row["status"] == "ok"
            else f"{row['status']}: {row.get('error') or ''}"[:70]
        )
        peak = row.get("peak_memory_bytes")
        lines.append(
            (
                row["kind"],
                row["framework"],
                row["arch"] or "-",
                str(row["batch"]),
                f"{row['height']}x{row['width']}",
                {"bfloat16": "bf16", "float32": "fp32"}.get(row["dtype"], row["dtype"]),
                row["layout"] + (f" {row['program']}" if row.get("program") else ""),
                _format_number(row.get("images_per_second"), ".1f"),
                _format_number(row.get("step_time_ms"), ".1f"),
                _format_number(row.get("compile_time_s"), ".1f"),
                _format_number(peak / 2**30 if peak else None, ".2f"),
                _format_number(
                    row["flops_per_image"] / 1e9 if row.get("flops_per_image") else None, ".1f"
                ),
                _format_number(row.get("achieved_tflops_per_device"), ".2f"),
                _format_number(100 * row["mfu"] if row.get("mfu") is not None else None, ".1f", "-")
                + ("%" if row.get("mfu") is not None else ""),
                _format_number(row.get("jax_over_torch"), ".2f"),
                _format_number(row.get("jax_over_torch_float32"), ".2f"),
                status,
            )
        )
    widths = [
        max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
        for i in range(len(header))
    ]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        ).rstrip()

    rendered = [render(header), render(tuple("-" * width for width in widths))]
    return "\n".join(rendered + [render(line) for line in lines])


def _write_json(path: str, document: dict) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as file:
        json.dump(document, file, indent=1, default=str)
    os.replace(temporary, path)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def csv(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
        return lambda text: tuple(cast(item) for item in text.split(",") if item)

    parser.add_argument("--suite", default="cpu", choices=SUITES, help="which set of rows to run")
    parser.add_argument(
        "--json", default="bench.json", help="where the raw results are written ('' = nowhere)"
    )
    parser.add_argument(
        "--archs", type=csv(str), default=(), help="only these architectures (comma-separated)"
    )
    parser.add_argument(
        "--batch-sizes", type=csv(int), default=(), help="only these per-device train batches"
    )
    parser.add_argument(
        "--dtypes", type=csv(str), default=(), help=f"only these compute dtypes {DTYPES}"
    )
    parser.add_argument("--kinds", type=csv(str), default=(), help=f"only these row kinds {KINDS}")
    parser.add_argument(
        "--frameworks", type=csv(str), default=("jax", "torch"), help="jax and/or torch"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="train crop side (suite default otherwise)"
    )
    parser.add_argument(
        "--jax-programs",
        type=csv(str),
        default=(),
        help="JAX train rows once per program GROUPED_CONV/BN_STATISTICS (e.g. grouped/two_pass,split/one_pass: "
        "model.grouped_conv and model.bn_statistics); default: the config's",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed steps after compilation"
    )
    parser.add_argument("--timed-steps", type=int, default=None, help="timed steps per row")
    parser.add_argument(
        "--num-devices", type=int, default=1, help="JAX mesh size (0 = all devices)"
    )
    parser.add_argument(
        "--fp32-precision",
        default="default",
        choices=FP32_PRECISIONS,
        help="'default': each framework's float32 (TF32 convolutions on NVIDIA); 'highest': full",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=450.0,
        help="no row starts later than this many seconds after --started-at",
    )
    parser.add_argument(
        "--hard-limit-s",
        type=float,
        default=510.0,
        help="a phase still running this many seconds after --started-at is killed",
    )
    parser.add_argument(
        "--started-at",
        type=float,
        default=None,
        help="epoch seconds the budget counts from (default: now); a wrapper script passes its own",
    )
    parser.add_argument(
        "--peak-tflops-bf16", type=float, default=None, help="override the device's bf16 peak"
    )
    parser.add_argument(
        "--peak-tflops-fp32", type=float, default=None, help="override the device's float32 peak"
    )
    parser.add_argument(
        "--isolation",
        default="process",
        choices=("process", "none"),
        help="'process': one child process per phase; 'none': everything in this process",
    )
    parser.add_argument(
        "--require-accelerator",
        action="store_true",
        help="fail JAX/PyTorch rows at once when the framework sees no GPU/TPU",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=0,
        help="CPU threads of both frameworks' workers (0 = their defaults). On a shared CPU use 1: "
        "PyTorch's OpenMP threads spin and stall when another process takes a core",
    )
    parser.add_argument(
        "--per-step-timing",
        choices=("auto", "on", "off"),
        default="auto",
        help="time each step alone and report the median ('auto': on for the cpu and smoke suites, "
        "whose CPU is usually shared; off on accelerators, where steps overlap as in training)",
    )
    parser.add_argument(
        "--compilation-cache-dir", default="", help="JAX persistent compilation cache"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the planned rows and exit")
    parser.add_argument(
        "--preflight",
        action="store_true",
        help="one tiny JAX step on the default backend, and the PyTorch reference import",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    for name, values, allowed in (
        ("--dtypes", options.dtypes, DTYPES),
        ("--kinds", options.kinds, KINDS),
        ("--frameworks", options.frameworks, ("jax", "torch")),
    ):
        unknown = [value for value in values if value not in allowed]
        if unknown:
            parser.error(f"{name}: {unknown} not allowed; allowed values are {list(allowed)}")
    for program in options.jax_programs:
        try:
            program_options(program)
        except ValueError as error:
            parser.error(f"--jax-programs: {error}")
    if options.hard_limit_s < options.time_budget_s:
        parser.error(
            f"--hard-limit-s={options.hard_limit_s} must be >= "
            f"--time-budget-s={options.time_budget_s}"
        )
    return options


def preflight() -> int:
    """Checks that this machine runs our JAX step (tiny) and can import the PyTorch reference."""
    import jax
    import numpy as np
    from flax import nnx

    from puzzle_jax import models, objectives, optim, sharding, training

    print(json.dumps(_jax_environment()), flush=True)
    mesh = sharding.create_mesh(1)
    model = models.create_classifier("resnet_tiny", NUM_CLASSES, bn_mode="global", rngs=nnx.Rngs(0))
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.1, weight_decay=1e-4, total_steps=10)
    objective = objectives.create_puzzle_objective(puzzle_settings(), 10, 16)
    graphdef, state = training.create_train_state(model, optimizer, mesh)
    step = training.make_train_step(graphdef, optimizer, objective, mesh)
    state, metrics = step(state, sharding.host_batch_to_global(_synthetic_loader_batch(2, 64, 64, 0), mesh))
    loss = float(np.asarray(jax.device_get(metrics["loss"])))
    if not math.isfinite(loss):
        raise FloatingPointError(f"preflight loss is {loss}")
    print(f"preflight: JAX puzzle step ok on {jax.default_backend()} (loss {loss:.4f})", flush=True)
    try:
        import resnest.torch  # noqa: F401
        import torch

        print(
            f"preflight: torch {torch.__version__}, cuda available: "
            f"{torch.cuda.is_available()}, resnest ok",
            flush=True,
        )
    except Exception as error:  # noqa: BLE001 (PyTorch rows will report it; JAX rows can still run)
        print(f"preflight: WARNING the PyTorch reference cannot run: {error}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status (0 even when some rows failed: see the JSON)."""
    options = parse_arguments(argv)
    if options.worker:
        return worker_main()
    if options.preflight:
        return preflight()
    started_at = options.started_at or time.time()
    rows = build_suite(options.suite, options)
    if options.dry_run:
        for index, spec in enumerate(rows):
            print(f"{index:3d}  {spec.row_id}  warmup={spec.warmup} steps={spec.steps}")
        return 0
    settings = WorkerSettings(
        soft_deadline=started_at + options.time_budget_s,
        hard_deadline=started_at + options.hard_limit_s,
        num_devices=options.num_devices,
        fp32_precision=options.fp32_precision,
        compilation_cache_dir=options.compilation_cache_dir,
        require_accelerator=options.require_accelerator,
        cpu_threads=options.cpu_threads,
        per_step_timing=(
            options.per_step_timing == "on"
            or (options.per_step_timing == "auto" and options.suite in ("cpu", "smoke"))
        ),
    )
    overrides = {"bfloat16": options.peak_tflops_bf16, "float32": options.peak_tflops_fp32}
    results: dict[str, dict] = {}
    environments: dict[str, dict] = {}
    document = {
        "command": [
            sys.executable,
            "-m",
            "benchmarks.bench",
            *(argv if argv is not None else sys.argv[1:]),
        ],
        "suite": options.suite,
        "started_at": started_at,
        "time_budget_s": options.time_budget_s,
        "hard_limit_s": options.hard_limit_s,
        "fp32_precision": options.fp32_precision,
        "settings": {
            "num_classes": NUM_CLASSES,
            "output_stride": OUTPUT_STRIDE,
            "puzzle": puzzle_settings().to_dict(),
            "learning_rate": TRAIN_LEARNING_RATE,
            "weight_decay": TRAIN_WEIGHT_DECAY,
            "inference_scales": INFERENCE_SCALES,
            "inference_pad_multiple": INFERENCE_PAD_MULTIPLE,
            "bn_mode": "global (batch statistics, the authors' 'normal')",
        },
        "host": {
            "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(),
            "cpu_threads": options.cpu_threads,
        },
        "environments": environments,
        "rows": [],
    }

    def on_message(message: dict) -> None:
        if message["type"] == "environment":
            environments[message["framework"]] = message["environment"]
        elif message["type"] == "row":
            results[message["row"]["id"]] = message["row"]

    for framework, specs in group_into_phases(rows):
        if time.time() > settings.soft_deadline:
            for spec in specs:
                results[spec.row_id] = dict(
                    _base_result(spec),
                    status="skipped",
                    error="time budget used up before this row started",
                )
            continue
        print(
            f"[bench] phase {framework}: {len(specs)} row(s), "
            f"{time.time() - started_at:.0f} s elapsed",
            file=sys.stderr,
            flush=True,
        )
        if options.isolation == "process":
            failure = _run_phase_in_child(framework, specs, settings, on_message)
        else:
            run_rows(framework, specs, settings, on_message)
            failure = None
        for spec in specs:
            if spec.row_id not in results:
                results[spec.row_id] = dict(
                    _base_result(spec),
                    status="error",
                    error=failure or "the worker reported no result",
                )
            row = results[spec.row_id]
            if spec.framework == "jax" and row.get("compile_time_s"):
                previous = settings.compile_estimates.get(spec.arch, 0.0)
                settings.compile_estimates[spec.arch] = max(previous, row["compile_time_s"])
        document["rows"] = [results[spec.row_id] for spec in rows if spec.row_id in results]
        finalise_rows(document["rows"], environments, options.fp32_precision, overrides)
        document["elapsed_s"] = time.time() - started_at
        _write_json(options.json, document)

    ordered = [results[spec.row_id] for spec in rows]
    finalise_rows(ordered, environments, options.fp32_precision, overrides)
    document["rows"] = ordered
    document["elapsed_s"] = time.time() - started_at
    _write_json(options.json, document)
    skipped = [row for row in ordered if row["status"] == "skipped"]
    errors = [row for row in ordered if row["status"] == "error"]
    device = environments.get("jax", {}).get("device_kind") or environments.get("torch", {}).get(
        "device_kind"
    )
    print(
        f"\nPuzzle-CAM benchmark, suite {options.suite}, device {device}, "
        f"{document['elapsed_s']:.0f} s; "
        f"JSON: {options.json or '(not written)'}"
    )
    if errors:
        print(
            f"{len(errors)} row(s) failed: "
            + "; ".join(f"{row['id']} ({row['error']})" for row in errors)
        )
    if skipped:
        print(f"{len(skipped)} row(s) skipped: " + ", ".join(row["id"] for row in skipped))
    print(
        "jax/torch: JAX images/s over the fastest PyTorch row of the same dtype; "
        "jax/torch32: over PyTorch float32."
    )
    print(format_table(ordered), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
