"""Tests of ``benchmarks.profile_step``: kernel classes from names, device time from a Chrome trace (nested and
overlapping events counted once, host threads and derived lines left out) and a real traced step on the CPU."""

import glob
import gzip
import json
import os

import pytest

from benchmarks import profile_step
from benchmarks.profile_step import (
    CONVOLUTIONS,
    COPIES,
    ELEMENTWISE,
    KERNEL_CLASSES,
    MATMULS,
    OTHER,
    REDUCTIONS,
)


@pytest.mark.parametrize("name, expected", [
    # cuDNN / CUTLASS / xmma convolution kernels, as CUPTI names them on Hopper and Ampere.
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1",
     CONVOLUTIONS),
    ("sm80_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize64x64x64_stage4", CONVOLUTIONS),
    ("sm80_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x32_stage4_warpsize2x2x1",
     CONVOLUTIONS),
    ("cutlass_80_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x3_nhwc_align8", CONVOLUTIONS),
    ("cutlass_80_tensorop_s1688gemm_bf16_128x128_32x3_nn_align8", CONVOLUTIONS),  # cuDNN's 1x1 convolutions
    ("void cudnn::engines_precompiled::nhwcSliceCKernel<__nv_bfloat16, float, 4>(int, int, __nv_bfloat16 const*)",
     CONVOLUTIONS),
    ("nhwcSliceCKernel", CONVOLUTIONS),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>(nchw2nhwc_params_t)",
     CONVOLUTIONS),
    ("void implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int)", CONVOLUTIONS),
    ("convolution.12", CONVOLUTIONS),  # XLA:CPU op names
    ("conv_general_dilated.138", CONVOLUTIONS),
    ("convolution-window-dilated.1", CONVOLUTIONS),
    # XLA's own gemms and dots.
    ("gemm_fusion_dot_3", MATMULS),
    ("triton_gemm_dot_general_12", MATMULS),
    ("dot.4", MATMULS),
    ("void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false>(float)", MATMULS),
    # XLA:GPU kernels named after their fusions.
    ("input_reduce_fusion_12", REDUCTIONS),
    ("input_reduce_fusion", REDUCTIONS),
    ("loop_reduce_window_fusion_2", REDUCTIONS),
    ("multiply_reduce_fusion.3", REDUCTIONS),
    ("wrapped_reduce-window", REDUCTIONS),
    ("copy_reduce_fusion.1", REDUCTIONS),
    ("loop_multiply_fusion_3", ELEMENTWISE),
    ("loop_convert_fusion_7", ELEMENTWISE),  # "convert" is no convolution
    ("loop_broadcast_fusion", ELEMENTWISE),
    ("wrapped_add", ELEMENTWISE),
    ("maximum_bitcast_fusion.2", ELEMENTWISE),
    ("wrapped_transpose", COPIES),
    ("copy_fusion", COPIES),
    ("transpose_copy_fusion.91", COPIES),
    ("input_transpose_fusion_1", COPIES),
    ("copy.420", COPIES),
    ("Memcpy HtoD", COPIES),
    ("MemcpyD2D", COPIES),
    ("Memset (Device)", COPIES),
    ("ynn_fusion.13", OTHER),  # XLA:CPU's YNNPACK fusion: contents unknown from the name
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", OTHER),  # collectives: not a reduction kernel of the step
    ("all-reduce.3", OTHER),
    ("some_unknown_kernel", OTHER),
])
def test_kernel_class_from_its_name(name, expected):
    assert profile_step.classify_kernel(name) == expected


def test_the_hlo_op_tells_a_cublas_gemm_from_a_cudnn_convolution_with_the_same_kernel():
    kernel = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"
    assert profile_step.classify_kernel(kernel) == CONVOLUTIONS
    assert profile_step.classify_kernel(kernel, "cublas-gemm.3") == MATMULS
    assert profile_step.classify_kernel(kernel, "cublas-lt-matmul.1") == MATMULS
    assert profile_step.classify_kernel(kernel, "cudnn-conv-bw-filter.2") == CONVOLUTIONS
    assert profile_step.classify_kernel("loop_add_fusion_1", "loop_convert_fusion.1") == ELEMENTWISE
    assert profile_step.classify_kernel("Memcpy DtoD", "cudnn-conv.4") == COPIES


def test_channel_slicing_kernels():
    assert profile_step.is_channel_slicing("void cudnn::engines_precompiled::nhwcSliceCKernel<float>(int)")
    assert not profile_step.is_channel_slicing("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc")
    assert not profile_step.is_channel_slicing("wrapped_slice")


def test_nested_and_overlapping_events_are_counted_once_by_the_innermost():
    spans = [
        (0.0, 10.0, "outer", ""),
        (2.0, 5.0, "inner", ""),  # nested in outer
        (8.0, 14.0, "late", ""),  # starts inside outer, ends after it
        (20.0, 20.0, "empty", ""),
        (30.0, 31.0, "alone", ""),
    ]
    times = profile_step.exclusive_times(reversed(spans))
    assert times == {("outer", ""): 5.0, ("inner", ""): 3.0, ("late", ""): 6.0, ("alone", ""): 1.0}
    assert sum(times.values()) == 15.0  # the union of the spans


def _metadata(pid, tid=None, process=None, thread=None):
    if thread is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}


def _event(pid, tid, name, ts, dur, hlo_op=None):
    event = {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}
    if hlo_op is not None:
        event["args"] = {"hlo_op": hlo_op, "hlo_module": "jit_train_step"}
    return event


def _gpu_trace():
    """Two steps of a GPU trace: kernels on two streams, the derived 'XLA Ops' line and a host thread (ignored)."""
    events = [_metadata(1, process="/device:GPU:0"), _metadata(1, 7, thread="Stream #7(Compute)"),
              _metadata(1, 8, thread="Stream #8(MemcpyD2D)"), _metadata(1, 100, thread="XLA Ops"),
              _metadata(2, process="/host:CPU"), _metadata(2, 5, thread="python")]
    for step in range(2):
        t = 1000.0 * step
        events += [
            _event(1, 7, "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32", t, 600, "cudnn-conv.1"),
            # A nested event (e.g. a marker around a kernel) takes its time from the one it is in.
            _event(1, 7, "void cudnn::engines_precompiled::nhwcSliceCKernel<__nv_bfloat16>(int)", t + 100, 100,
                   "cudnn-conv.1"),
            _event(1, 7, "input_reduce_fusion_12", t + 600, 200, "input_reduce_fusion.12"),
            _event(1, 7, "loop_multiply_fusion_3", t + 750, 150, "loop_multiply_fusion.3"),  # overlaps the reduce
            _event(1, 8, "Memcpy DtoD", t + 500, 100),
            _event(1, 8, "Memset (Device)", t + 550, 0),  # launched, but no time
            # Duplicates of the kernel time and host work: not device time.
            _event(1, 100, "cudnn-conv.1", t, 600, "cudnn-conv.1"),
            _event(2, 5, "ThunkExecutor::Execute", t, 900, "loop_multiply_fusion.3"),
        ]
    return events


def test_gpu_trace_by_class_counts_each_stream_instant_once_and_ignores_host_and_derived_lines():
    result = profile_step.summarise_trace(_gpu_trace(), steps=2, top=3)
    assert result["event_source"] == "kernels on the device streams"
    assert [row["stream"] for row in result["streams"]] == ["/device:GPU:0 Stream #7(Compute)",
                                                             "/device:GPU:0 Stream #8(MemcpyD2D)"]
    by_class = {row["class"]: row for row in result["classes"]}
    assert list(by_class) == list(KERNEL_CLASSES)
    # Per step (microseconds -> ms): conv 600 (of which slicing 100), reduce 150 (to 750, then the multiply on top),
    # multiply 150, memcpy 100 on the other stream.
    assert by_class[CONVOLUTIONS]["ms_per_step"] == pytest.approx(0.6)
    assert by_class[CONVOLUTIONS]["channel_slicing_ms_per_step"] == pytest.approx(0.1)
    assert by_class[REDUCTIONS]["ms_per_step"] == pytest.approx(0.15)
    assert by_class[ELEMENTWISE]["ms_per_step"] == pytest.approx(0.15)
    assert by_class[COPIES]["ms_per_step"] == pytest.approx(0.1)
    assert by_class[MATMULS]["ms_per_step"] == by_class[OTHER]["ms_per_step"] == 0.0
    assert by_class[CONVOLUTIONS]["kernels_per_step"] == 2
    assert result["device_ms_per_step"] == pytest.approx(1.0)
    assert result["busy_ms_per_step"] == pytest.approx(0.9)  # the memcpy runs while stream 7 computes
    assert sum(row["share"] for row in result["classes"]) == pytest.approx(1.0)
    assert [(row["class"], row["count_per_step"]) for row in result["top_kernels"]] == [
        (CONVOLUTIONS, 1), (REDUCTIONS, 1), (ELEMENTWISE, 1)]
    assert result["top_kernels"][0]["ms_per_step"] == pytest.approx(0.5)
    assert result["kernel_count"] == 6
    assert by_class[COPIES]["kernels_per_step"] == 2
    report = profile_step.format_report(result)
    assert "| convolutions | 0.60 | 60.0% | 2 |" in report and "channel slicing | 0.10 | 10.0% |" in report


def test_cpu_trace_reads_the_xla_op_events_of_the_executing_threads():
    events = [_metadata(3, process="/host:CPU"), _metadata(3, 1, thread="tf_XLAEigen/1"),
              _metadata(3, 2, thread="python"),
              _event(3, 1, "ThunkExecutor::Execute", 0, 100),  # spans the ops: no hlo_op, not counted
              _event(3, 1, "convolution.3", 10, 40, "convolution.3"),
              {**_event(3, 1, "end: convolution.3", 50, 1), "args": {"_src": "thunk_executor.cc"}},
              _event(3, 1, "transpose_copy_fusion.9", 60, 20, "transpose_copy_fusion.9"),
              _event(3, 2, "PjitFunction(jit(train_step))", 0, 100)]
    result = profile_step.summarise_trace(events, steps=1)
    assert "CPU" in result["event_source"]
    assert {row["class"]: row["ms_per_step"] for row in result["classes"] if row["ms_per_step"]} == {
        CONVOLUTIONS: pytest.approx(0.04), COPIES: pytest.approx(0.02)}
    with pytest.raises(ValueError, match="no device events"):
        profile_step.summarise_trace(events[:4], steps=1)


def test_the_newest_trace_file_is_found_and_a_missing_one_is_named(tmp_path):
    old = tmp_path / "plugins" / "profile" / "run_1" / "host.trace.json.gz"
    new = tmp_path / "plugins" / "profile" / "run_2" / "perfetto_trace.json.gz"
    for path, stamp in ((old, 1000.0), (new, 2000.0)):
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt") as file:
            json.dump({"displayTimeUnit": "ns", "traceEvents": _gpu_trace()}, file)
        os.utime(path, (stamp, stamp))
    assert profile_step.find_trace_file(str(tmp_path)) == str(new)
    assert len(profile_step.read_trace_events(str(new))) == len(_gpu_trace())
    # A jax that writes no JSON: the profiler's own .xplane.pb is read.
    xplane = tmp_path / "plugins" / "profile" / "run_3" / "host.xplane.pb"
    xplane.parent.mkdir()
    xplane.write_bytes(b"")
    os.utime(xplane, (3000.0, 3000.0))
    assert profile_step.find_trace_file(str(tmp_path)) == str(new)
    assert profile_step.find_trace_file(str(tmp_path), not_before=2500.0) == str(xplane)
    with pytest.raises(FileNotFoundError, match="no trace .* under .*run_3/host.xplane.pb"):
        profile_step.find_trace_file(str(tmp_path), not_before=4000.0)


def test_model_options_are_passed_only_when_given(monkeypatch, tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks import bench

    calls = []

    def fake_build(arch, **keywords):
        calls.append(keywords)
        step = jax.jit(lambda state, batch: (jnp.tanh(state * batch), {"loss": batch.sum()}), donate_argnums=0)
        return step, jnp.zeros((64, 64)), jnp.ones((64, 64)), 1

    monkeypatch.setattr(bench, "build_jax_train_step", fake_build)
    common = ["--steps", "1", "--warmup", "0", "--batch", "4"]
    result = profile_step.profile_step(profile_step.parse_arguments(common + ["--trace-dir", str(tmp_path / "a")]))
    assert "model_options" not in calls[-1] and result["model_options"] == {}
    assert result["images_per_second"] > 0 and result["batch"] == 4
    options = profile_step.parse_arguments(common + ["--grouped-conv", "split", "--trace-dir", str(tmp_path / "b")])
    assert profile_step.profile_step(options)["model_options"] == {"grouped_conv": "split"}
    assert calls[-1]["model_options"] == {"grouped_conv": "split"}
    with pytest.raises(SystemExit):
        profile_step.parse_arguments(["--bn-statistics", "three_pass"])


@pytest.mark.slow
def test_profiles_a_real_step_on_the_cpu(tmp_path, capsys):
    output = tmp_path / "profile.json"
    assert profile_step.main(["--arch", "resnet_tiny", "--size", "32", "--batch", "2", "--steps", "2",
                              "--warmup", "1", "--trace-dir", str(tmp_path / "trace"), "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(output.read_text())
    assert result["arch"] == "resnet_tiny" and result["backend"] == "cpu" and "CPU" in result["event_source"]
    assert os.path.isfile(result["trace_file"]) and result["trace_file"].startswith(str(tmp_path / "trace"))
    assert sum(row["share"] for row in result["classes"]) == pytest.approx(1.0)
    by_class = {row["class"]: row["ms_per_step"] for row in result["classes"]}
    assert by_class[CONVOLUTIONS] > 0 and by_class[ELEMENTWISE] > 0 and by_class[COPIES] > 0
    assert sum(by_class.values()) == pytest.approx(result["device_ms_per_step"])
    assert 0 < result["busy_ms_per_step"] <= result["device_ms_per_step"] + 1e-9
    # The union over the executing threads lies within the traced steps' wall time.
    assert result["busy_ms_per_step"] <= result["traced_wall_ms_per_step"]
    assert result["images_per_second"] == pytest.approx(2000.0 / result["wall_ms_per_step"])
    assert len(result["top_kernels"]) == 15
    # The profiler's .xplane.pb of the same trace, read as a fallback, gives the same table.
    (xplane,) = glob.glob(os.path.join(os.path.dirname(result["trace_file"]), "*.xplane.pb"))
    from_xplane = profile_step.summarise_trace(profile_step.read_trace_events(xplane), steps=2)
    assert [row["ms_per_step"] for row in from_xplane["classes"]] == pytest.approx(
        [row["ms_per_step"] for row in result["classes"]], rel=1e-6)
    for kernel_class in KERNEL_CLASSES:
        assert f"| {kernel_class} |" in printed
    assert "images/s" in printed
