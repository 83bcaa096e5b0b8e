"""Where the device time of one training step goes: a kernel trace of the benchmark's step, by kernel class and kernel.

Builds the Puzzle-CAM step exactly as ``python -m benchmarks.bench`` does (``bench.build_jax_train_step``), compiles
it, runs ``--warmup`` steps, times ``--steps`` steps, then traces ``--steps`` more with ``jax.profiler`` and reads the
Chrome-trace JSON (gzip) that the profiler writes under the trace folder (or its ``.xplane.pb`` where a jax writes no
JSON). It prints:

  1. device time per step by kernel class (ms per step, share), with cuDNN's channel-slicing kernels
     (``nhwcSliceCKernel``, grouped convolutions) as a sub-row of the convolutions;
  2. the ``--top`` kernels by device time per step (name, class, ms per step, launches per step, share);
  3. the total device time per step against the step's wall time (untraced and traced) and the images/s.

Which events are device time: on a GPU, the complete events (``ph == "X"``) of the stream threads
(``Stream #13(Compute)``) of the ``/device:...`` processes: the CUDA kernels, memcpys and memsets on the device's
streams (the derived "XLA Ops"/"XLA Modules" lines of the same process repeat that time and are left out, as are
all host threads). Where a device process has no stream thread (a TPU) its "XLA Ops" line is read. On a CPU there
is no device stream: the XLA op events of the threads that execute the program (those whose ``args`` name an
``hlo_op``) are read instead, so the script runs, and is tested, on a CPU; there, ops of several threads run at
once, so the sum can exceed the wall time. Overlapping or nested events on one stream or thread are not double
counted: each instant of a stream's busy time goes to the innermost (latest-started) event running then, so the
classes add up to the union of each stream's busy intervals. The total is summed over streams; ``busy`` is the
union over all of them, which the wall time is compared with.

Classes come from the kernel name alone (``classify_kernel``), refined by the event's ``hlo_op`` where the trace
has one: cuDNN launches CUTLASS/xmma kernels, some named ``gemm``, for convolutions, while cuBLAS launches the same
kinds of kernels for dots; only the HLO op (``cudnn-conv...`` against ``cublas-gemm...``) tells them apart.
Collectives (NCCL) and XLA:CPU's YNNPACK fusions, whose names do not say what they compute, count as other.

    python -m benchmarks.profile_step --arch resnest101 --batch 16 --dtype bfloat16 --json profile.json
    JAX_PLATFORMS=cpu python -m benchmarks.profile_step --arch resnet_tiny --size 64 --batch 2   # a CPU check

The trace folder (``--trace-dir``, else a new temporary one) is printed; open its ``perfetto_trace.json.gz`` in
https://ui.perfetto.dev ("Open trace file").
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import heapq
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

CONVOLUTIONS = "convolutions"
CHANNEL_SLICING = "of which cuDNN channel slicing"
MATMULS = "matmuls/gemm"
REDUCTIONS = "reductions"
ELEMENTWISE = "elementwise fusions"
COPIES = "copies/transposes"
OTHER = "other"
KERNEL_CLASSES = (CONVOLUTIONS, MATMULS, REDUCTIONS, ELEMENTWISE, COPIES, OTHER)

_MEMORY = re.compile(r"memcpy|memset")
_MATMUL_OP = re.compile(r"cublas|gemm|matmul|(^|[^a-z])dot([^a-z]|$)")
_CONV_OP = re.compile(r"cudnn|conv(?!ert)")  # "convert" is an elementwise op
_CONV_KERNEL = re.compile(
    r"cudnn|cutlass|xmma|implicit_?gemm|implicit_?precomp|fprop|dgrad|wgrad|winograd|im2col|conv(?!ert)|nhwc|nchw"
)
_MATMUL_KERNEL = re.compile(r"gemm|gemv|cublas|matmul|(^|[^a-z])dot([^a-z]|$)")
_COLLECTIVE = re.compile(r"nccl|all[-_]?reduce|reduce[-_]?scatter|all[-_]?gather|all[-_]?to[-_]?all")
_REDUCTION = re.compile(r"reduc")
_COPY = re.compile(r"copy|transpose")
_LIBRARY_FUSION = re.compile(r"^(ynn|xnn)_fusion")  # XLA:CPU's YNNPACK fusions: the name does not say what is inside
_ELEMENTWISE = re.compile(r"^loop_|^wrapped_|fusion|elementwise")
_CHANNEL_SLICING = re.compile(r"slicec|(nhwc|nchw)slice")


def classify_kernel(name: str, hlo_op: str = "") -> str:
    """The class of a kernel (one of ``KERNEL_CLASSES``) from its name and, if known, the HLO op that launched it.

    Args:
      name: the kernel name as the trace has it: a CUDA kernel (``sm90_xmma_fprop_implicit_gemm_...``,
        ``nhwcSliceCKernel``), an XLA fusion's kernel (``input_reduce_fusion_12``, ``loop_multiply_fusion_3``), a
        memory operation (``Memcpy HtoD``) or, on a CPU, the XLA op (``convolution.3``, ``transpose_copy_fusion``).
      hlo_op: the event's ``hlo_op`` argument, or empty. It decides between convolutions and matmuls, whose library
        kernels look alike.

    Returns:
      The class name.
    """
    kernel, op = name.lower(), hlo_op.lower()
    if _MEMORY.search(kernel):
        return COPIES
    if op and _MATMUL_OP.search(op):
        return MATMULS
    if op and _CONV_OP.search(op):
        return CONVOLUTIONS
    if _CHANNEL_SLICING.search(kernel) or _CONV_KERNEL.search(kernel):
        return CONVOLUTIONS
    if _MATMUL_KERNEL.search(kernel):
        return MATMULS
    if _COLLECTIVE.search(kernel):  # communication between devices, under other
        return OTHER
    if _REDUCTION.search(kernel):  # before copies: a fusion that reduces (copy_reduce_fusion) is a reduction
        return REDUCTIONS
    if _COPY.search(kernel):
        return COPIES
    if _LIBRARY_FUSION.search(kernel):
        return OTHER
    if _ELEMENTWISE.search(kernel):
        return ELEMENTWISE
    return OTHER


def is_channel_slicing(name: str) -> bool:
    """Whether ``name`` is one of cuDNN's channel-slicing kernels (``nhwcSliceCKernel``): grouped convolutions."""
    return bool(_CHANNEL_SLICING.search(name.lower()))


def find_trace_file(trace_dir: str, not_before: float = 0.0) -> str:
    """The newest trace the profiler wrote under ``trace_dir`` (modified at or after ``not_before``).

    jax writes ``plugins/profile/<run>/<host>.xplane.pb``, ``<host>.trace.json.gz`` and, asked to,
    ``perfetto_trace.json.gz`` (the JSON files hold the same events); the folder layout is globbed, not assumed.
    The Chrome-trace JSON is preferred; the ``.xplane.pb`` is the fallback for a jax that writes no JSON.
    """
    for patterns in (("**/perfetto_trace.json.gz", "**/*.trace.json.gz", "**/*.trace.json"), ("**/*.xplane.pb",)):
        candidates = [path for pattern in patterns
                      for path in glob.glob(os.path.join(trace_dir, pattern), recursive=True)
                      if os.path.getmtime(path) >= not_before]
        if candidates:
            return max(candidates, key=lambda path: (os.path.getmtime(path), "perfetto" in path))
    found = sorted(os.path.relpath(path, trace_dir) for path in glob.glob(f"{trace_dir}/**/*", recursive=True))
    raise FileNotFoundError(
        f"no trace (*.trace.json.gz, perfetto_trace.json.gz, *.xplane.pb) under {trace_dir}; found {found[:20]}. "
        "Check that jax.profiler traced (a profiler already running in this process fails the trace)."
    )


def read_trace_events(path: str) -> list[dict[str, Any]]:
    """The Chrome-trace events of a trace file: the ``traceEvents`` of a JSON file (gzip or plain), or the same
    events built from an ``.xplane.pb`` (planes as processes, lines as threads, event stats as ``args``)."""
    if path.endswith(".xplane.pb"):
        from jax.profiler import ProfileData

        events: list[dict[str, Any]] = []
        for pid, plane in enumerate(ProfileData.from_file(path).planes):
            events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": plane.name}})
            for tid, line in enumerate(plane.lines):
                events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": line.name}})
                events += [{"ph": "X", "pid": pid, "tid": tid, "name": event.name, "ts": event.start_ns / 1000.0,
                            "dur": event.duration_ns / 1000.0, "args": dict(event.stats)} for event in line.events]
        return events
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as file:
        document = json.load(file)
    return document["traceEvents"] if isinstance(document, dict) else document


def select_device_events(events: Sequence[dict[str, Any]]) -> tuple[dict[str, list[tuple]], str]:
    """The device-time events of a trace, per stream (see the module docstring for which events those are).

    Returns:
      ``({stream name: [(start_us, end_us, name, hlo_op), ...]}, a sentence saying which events were read)``.
    """
    process_names, thread_names = {}, {}
    for event in events:
        if event.get("ph") == "M" and event.get("name") == "process_name":
            process_names[event.get("pid")] = str(event.get("args", {}).get("name", ""))
        elif event.get("ph") == "M" and event.get("name") == "thread_name":
            thread_names[(event.get("pid"), event.get("tid"))] = str(event.get("args", {}).get("name", ""))
    device_threads = {key: name for key, name in thread_names.items()
                      if process_names.get(key[0], "").startswith("/device:")}
    selections = (
        ("kernels on the device streams", {key for key, name in device_threads.items()
                                            if "stream" in name.lower()}, False),
        ("XLA ops of the device's 'XLA Ops' line", {key for key, name in device_threads.items()
                                                    if name == "XLA Ops"}, False),
        ("XLA op events of the host threads that execute the program (no device stream: CPU)", None, True),
    )
    for source, threads, needs_hlo_op in selections:
        streams: dict[str, list[tuple]] = collections.defaultdict(list)
        for event in events:
            if event.get("ph") != "X" or "dur" not in event:
                continue
            key = (event.get("pid"), event.get("tid"))
            arguments = event.get("args") or {}
            if (threads is not None and key not in threads) or (needs_hlo_op and "hlo_op" not in arguments):
                continue
            stream = f"{process_names.get(key[0], key[0])} {thread_names.get(key, key[1])}"
            start, hlo_op = float(event["ts"]), str(arguments.get("hlo_op", ""))
            streams[stream].append((start, start + float(event["dur"]), str(event["name"]), hlo_op))
        if streams:
            return dict(streams), source
    raise ValueError("the trace has no device events: no /device: stream thread and no event with an hlo_op")


def exclusive_times(spans: Iterable[tuple]) -> dict[tuple[str, str], float]:
    """Time of each ``(name, hlo_op)`` on one stream, every instant given to the innermost event running then.

    Args:
      spans: ``(start, end, name, hlo_op)`` of one stream, any order; they may nest or overlap.

    Returns:
      ``{(name, hlo_op): time}``, in the spans' unit; the values add up to the union of the spans.
    """
    spans = sorted(spans, key=lambda span: (span[0], -span[1]))
    times: dict[tuple[str, str], float] = collections.defaultdict(float)
    boundaries = sorted({value for span in spans for value in span[:2]})
    running: list[tuple] = []  # heap of (-start, end, index): the latest-started (then the shortest) on top
    next_span = 0
    for left, right in zip(boundaries, boundaries[1:]):
        while next_span < len(spans) and spans[next_span][0] <= left:
            heapq.heappush(running, (-spans[next_span][0], spans[next_span][1], next_span))
            next_span += 1
        while running and running[0][1] <= left:  # ended; ended events below the top are dropped when they surface
            heapq.heappop(running)
        if running:
            _, _, name, hlo_op = spans[running[0][2]]
            times[(name, hlo_op)] += right - left
    return dict(times)


def _union_length(intervals: Iterable[tuple]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end, *_ in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarise_trace(events: Sequence[dict[str, Any]], steps: int, top: int = 15) -> dict[str, Any]:
    """Device time per step by kernel class, the ``top`` kernels and the per-stream totals of a trace of ``steps``.

    Returns:
      A JSON-serialisable dict: ``event_source``, ``streams``, ``classes`` (every class of ``KERNEL_CLASSES`` with
      ``ms_per_step``, ``share``, ``kernels_per_step``, and ``channel_slicing_ms_per_step`` on the convolutions),
      ``top_kernels``, ``device_ms_per_step`` (summed over streams) and ``busy_ms_per_step`` (their union).
    """
    streams, source = select_device_events(events)
    kernel_ms: dict[tuple[str, str], float] = collections.defaultdict(float)
    launches: collections.Counter = collections.Counter()
    stream_rows = []
    for stream, spans in sorted(streams.items()):
        for key, microseconds in exclusive_times(spans).items():
            kernel_ms[key] += microseconds / 1000.0
        launches.update((name, hlo_op) for _, _, name, hlo_op in spans)
        stream_rows.append({"stream": stream, "ms_per_step": _union_length(spans) / 1000.0 / steps,
                            "events_per_step": len(spans) / steps})
    # One row per kernel name and class: the same library kernel may serve a convolution and a dot.
    by_kernel: dict[tuple[str, str], dict[str, Any]] = {}
    for (name, hlo_op), count in launches.items():  # every launch, also those that nested ones cover entirely
        kernel_class = classify_kernel(name, hlo_op)
        row = by_kernel.setdefault((name, kernel_class), {"name": name, "class": kernel_class, "ms": 0.0, "count": 0})
        row["ms"] += kernel_ms.get((name, hlo_op), 0.0)
        row["count"] += count
    device_ms = sum(row["ms"] for row in by_kernel.values()) / steps
    share = lambda milliseconds: milliseconds / device_ms if device_ms > 0 else 0.0
    kernels = [{"name": row["name"], "class": row["class"], "ms_per_step": row["ms"] / steps,
                "count_per_step": row["count"] / steps, "share": share(row["ms"] / steps)}
               for row in sorted(by_kernel.values(), key=lambda row: (-row["ms"], row["name"]))]
    classes = []
    for kernel_class in KERNEL_CLASSES:
        members = [kernel for kernel in kernels if kernel["class"] == kernel_class]
        milliseconds = sum(kernel["ms_per_step"] for kernel in members)
        classes.append({"class": kernel_class, "ms_per_step": milliseconds, "share": share(milliseconds),
                        "kernels_per_step": sum(kernel["count_per_step"] for kernel in members)})
    slicing = sum(kernel["ms_per_step"] for kernel in kernels
                  if kernel["class"] == CONVOLUTIONS and is_channel_slicing(kernel["name"]))
    classes[0].update(channel_slicing_ms_per_step=slicing, channel_slicing_share=share(slicing))
    return {
        "event_source": source, "steps": steps, "streams": stream_rows, "classes": classes,
        "top_kernels": kernels[:top], "kernel_count": len(kernels), "device_ms_per_step": device_ms,
        "busy_ms_per_step": _union_length(span for spans in streams.values() for span in spans) / 1000.0 / steps,
    }


def _short_name(name: str, width: int = 72) -> str:
    """A kernel name for a table cell: no ``void``, no parameter list, at most ``width`` characters."""
    short = re.sub(r"^void ", "", name).split("(")[0].replace("|", "/")
    return short if len(short) <= width else short[: width - 3] + "..."


def format_report(result: dict[str, Any]) -> str:
    """The three tables of the module docstring, as markdown."""
    lines = ["| kernel class | ms per step | share | kernels per step |", "|---|---|---|---|"]
    for row in result["classes"]:
        lines.append(f"| {row['class']} | {row['ms_per_step']:.2f} | {100 * row['share']:.1f}% | "
                     f"{row['kernels_per_step']:.0f} |")
        if row["class"] == CONVOLUTIONS:
            lines.append(f"| &nbsp;&nbsp;{CHANNEL_SLICING} | {row['channel_slicing_ms_per_step']:.2f} | "
                         f"{100 * row['channel_slicing_share']:.1f}% | |")
    lines += ["", f"Top {len(result['top_kernels'])} of {result['kernel_count']} kernels:", "",
              "| kernel | class | ms per step | count per step | share |", "|---|---|---|---|---|"]
    lines += [f"| `{_short_name(row['name'])}` | {row['class']} | {row['ms_per_step']:.3f} | "
              f"{row['count_per_step']:g} | {100 * row['share']:.1f}% |" for row in result["top_kernels"]]
    wall = result.get("wall_ms_per_step")
    lines += ["", f"Device time read from: {result['event_source']} ({len(result['streams'])} streams/threads).",
              f"Device time {result['device_ms_per_step']:.2f} ms/step (sum over streams; their union, busy: "
              f"{result['busy_ms_per_step']:.2f} ms/step)" + (
                  f" vs wall {wall:.2f} ms/step untraced, {result['traced_wall_ms_per_step']:.2f} traced: busy "
                  f"{100 * result['busy_ms_per_step'] / result['traced_wall_ms_per_step']:.0f}% of the traced wall; "
                  f"{result['images_per_second']:.1f} images/s" if wall else "")]
    return "\n".join(lines)


def profile_step(options: argparse.Namespace) -> dict[str, Any]:
    """Builds, compiles, warms up, times and traces the step; returns ``summarise_trace``'s dict and the timings."""
    import jax

    from benchmarks import bench

    model_options = {key: value for key, value in (("grouped_conv", options.grouped_conv),
                                                   ("bn_statistics", options.bn_statistics)) if value}
    # The keyword is passed only when an option is given, so the script runs on a bench.py without it.
    extra = {"model_options": model_options} if model_options else {}
    step, state, batch, devices = bench.build_jax_train_step(
        options.arch, batch_per_device=options.batch, height=options.size, width=options.size, dtype=options.dtype,
        **extra,
    )
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - started
    carried = {"state": state}
    del state  # donated to the first step

    def run_steps(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            carried["state"], _ = compiled(carried["state"], batch)
        jax.block_until_ready(carried["state"])
        return time.perf_counter() - started

    run_steps(options.warmup)
    wall_s = run_steps(options.steps)
    trace_dir = options.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
    trace_started = time.time()
    try:
        tracer = jax.profiler.trace(trace_dir, create_perfetto_trace=True)
    except TypeError:  # a jax whose trace() lost the keyword still writes <host>.trace.json.gz
        tracer = jax.profiler.trace(trace_dir)
    with tracer:
        traced_wall_s = run_steps(options.steps)
    trace_file = find_trace_file(trace_dir, not_before=trace_started - 1.0)
    result = summarise_trace(read_trace_events(trace_file), options.steps, options.top)
    global_batch = options.batch * devices
    result.update(
        arch=options.arch, batch=global_batch, size=options.size, dtype=options.dtype, model_options=model_options,
        backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
        warmup=options.warmup, compile_s=compile_s, trace_dir=trace_dir, trace_file=trace_file,
        wall_ms_per_step=1000.0 * wall_s / options.steps,
        traced_wall_ms_per_step=1000.0 * traced_wall_s / options.steps,
        images_per_second=global_batch * options.steps / wall_s,
    )
    return result


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    from puzzle_jax.models import BN_STATISTICS, GROUPED_CONV_IMPLEMENTATIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnest101")
    parser.add_argument("--batch", type=int, default=16, help="images per device")
    parser.add_argument("--size", type=int, default=512, help="crop height and width")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then as many traced")
    parser.add_argument("--warmup", type=int, default=2, help="steps run after compiling, before timing")
    parser.add_argument("--trace-dir", default="", help="where the profiler writes (default: a new temporary folder)")
    parser.add_argument("--json", default="", help="write the tables and timings here")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--grouped-conv", default=None, choices=GROUPED_CONV_IMPLEMENTATIONS,
                        help="model option grouped_conv (default: the model's)")
    parser.add_argument("--bn-statistics", default=None, choices=BN_STATISTICS,
                        help="model option bn_statistics (default: the model's)")
    options = parser.parse_args(argv)
    for name in ("batch", "size", "steps", "top"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(options, name)}")
    if options.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {options.warmup}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    result = profile_step(options)
    print(f"{result['arch']} batch {result['batch']} at {result['size']}x{result['size']} {result['dtype']}"
          f"{' ' + str(result['model_options']) if result['model_options'] else ''} on {result['device_kind']} "
          f"(jax {result['jax']}), {options.steps} traced steps; trace: {result['trace_file']}\n")
    print(format_report(result), flush=True)
    if options.json:
        with open(options.json + ".tmp", "w") as file:
            json.dump(result, file, indent=2)
        os.replace(options.json + ".tmp", options.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
