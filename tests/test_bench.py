"""Tests of the benchmark runner ``benchmarks.bench`` (a tiny run, FLOP counts, budget, errors) and of the
transcription of the authors' PyTorch code it times, ``benchmarks.authors_torch``."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import authors_torch, bench, flops

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bench.py must run where none of these is installed (the GPU machine): its JAX and PyTorch rows may
# not import them.
UNAVAILABLE_ON_GPU_MACHINE = (
    "tensorflow_datasets",
    "tensorflow",
    "grain",
    "tensorboardX",
    "array_record",
)


def _write_import_recorder(directory) -> str:
    """A ``sitecustomize`` recording at exit which of those modules each process imported."""
    path = directory / "sitecustomize.py"
    path.write_text(
        textwrap.dedent(f"""
        import atexit, json, os, sys

        def _record():
            watched = {UNAVAILABLE_ON_GPU_MACHINE!r}
            imported = sorted(name for name in sys.modules if name.split(".")[0] in watched)
            path = os.path.join({str(directory)!r}, f"modules-{{os.getpid()}}.json")
            with open(path, "w") as file:
                json.dump(imported, file)

        atexit.register(_record)
    """)
    )
    return str(directory)


def test_smoke_run_reports_real_numbers_and_ratios(tmp_path):
    """A run in child processes: the train rows have numbers; no process imported tfds or grain."""
    json_path = tmp_path / "bench.json"
    environment = dict(os.environ)
    recorder = _write_import_recorder(tmp_path)
    environment["PYTHONPATH"] = os.pathsep.join(
        [recorder, REPO_ROOT, environment.get("PYTHONPATH", "")]
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--suite",
            "smoke",
            "--kinds",
            "train",
            "--image-size",
            "32",
            "--cpu-threads",
            "1",
            "--json",
            str(json_path),
        ],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    document = json.loads(json_path.read_text())
    rows = {row["framework"]: row for row in document["rows"]}
    assert set(rows) == {"jax", "torch"}, document["rows"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["images_per_second"] > 0 and row["step_time_ms"] > 0
        # Images per second and step time come from the same measurement: batch = img/s x step time.
        assert row["images_per_second"] * row["step_time_ms"] / 1000 == pytest.approx(
            row["batch"], rel=1e-6
        )
        assert math_isfinite(row["final_loss"])
    jax_row, torch_row = rows["jax"], rows["torch"]
    assert jax_row["compile_time_s"] > 0
    assert jax_row["flops_per_image"] > 0 and jax_row["flops_source"] == bench.JAXPR_FLOPS_SOURCE
    assert jax_row["model_flops_per_image"] == jax_row["flops_per_image"]
    assert jax_row["xla_flops_per_image"] > 0  # kept for reference (XLA:CPU counts convolutions)
    assert jax_row["peak_memory_bytes"] > 0
    assert torch_row["torch_counted_flops_per_image"] > 0
    assert jax_row["jax_over_torch"] == pytest.approx(
        jax_row["images_per_second"] / torch_row["images_per_second"], rel=1e-9
    )
    assert jax_row["jax_over_torch_float32"] == pytest.approx(jax_row["jax_over_torch"], rel=1e-9)
    assert "jax" in document["environments"] and "torch" in document["environments"]
    imported = [json.loads(path.read_text()) for path in tmp_path.glob("modules-*.json")]
    assert (
        len(imported) == 3 and imported == [[]] * 3
    ), imported  # the parent, the JAX and the PyTorch worker
    # The table is the last thing printed, one line per row after its header.
    last_lines = completed.stdout.rstrip().splitlines()[-4:]
    assert last_lines[0].split()[:3] == ["kind", "fw", "arch"]
    assert [line.split()[1] for line in last_lines[2:]] == ["jax", "torch"]


def math_isfinite(value) -> bool:
    return value is not None and np.isfinite(value)


@pytest.fixture
def single_torch_thread():
    """PyTorch's OpenMP threads stall on a shared 2-core machine; one thread is fast and steady."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_flops_of_our_step_match_torch_flop_counter_of_the_authors_step(single_torch_thread):
    """Our ResNet-50 step and the PyTorch transcription do the same work (FLOPs within 20%).

    XLA and ``benchmarks.flops`` (the count bench.py reports) count only the multiply-adds that
    touch real input (not padding), and XLA adds elementwise work; PyTorch's counter counts every
    kernel tap of convolutions and matmuls. At 64x64 the padding share is large, so our counts
    are somewhat lower; a missing tiled pass, a missing backward or a different depth would be 2x
    off. The jaxpr count is XLA:CPU's without the elementwise work (a few percent here).
    """
    batch, size = 1, 64
    train_step, state, inputs, _ = bench.build_jax_train_step(
        "resnet50", batch_per_device=batch, height=size, width=size
    )
    traced_step = train_step.trace(state, inputs)
    xla_flops = bench._xla_flops(traced_step.lower().cost_analysis()) / batch
    counted_flops = flops.count_jaxpr_flops(traced_step.jaxpr).total / batch
    assert 0.9 < counted_flops / xla_flops <= 1.0, (counted_flops, xla_flops)
    torch_step, images, labels = bench.build_torch_train_step(
        "resnet50",
        batch=batch,
        height=size,
        width=size,
        dtype="float32",
        layout="nchw",
        device=torch.device("cpu"),
    )
    with FlopCounterMode(display=False) as counter:
        torch_step(images, labels)
    torch_flops = counter.get_total_flops() / batch
    assert 0.8 < xla_flops / torch_flops < 1.05, (xla_flops, torch_flops)
    assert 0.8 < counted_flops / torch_flops < 1.05, (counted_flops, torch_flops)


def test_torch_tile_is_piece_major_and_merge_inverts_it():
    """The authors' order: [all top-left, all top-right, all bottom-left, all bottom-right]."""
    images = torch.arange(3 * 2 * 4 * 6, dtype=torch.float32).reshape(3, 2, 4, 6)
    tiles = authors_torch.tile_features(images, 2)
    expected = torch.cat(
        [images[:, :, :2, :3], images[:, :, :2, 3:], images[:, :, 2:, :3], images[:, :, 2:, 3:]],
        dim=0,
    )
    assert torch.equal(tiles, expected)
    assert torch.equal(authors_torch.merge_features(tiles, 2, 3), images)


def test_torch_optimizer_reproduces_authors_groups_and_momentum():
    """Groups with lr x1/x2/x10/x20, decay on weights only, momentum = decay, Nesterov, poly lr."""
    model = torch.nn.Module()
    # The backbone: weight (pretrained_weight) and bias (pretrained_bias).
    model.model = torch.nn.BatchNorm2d(4)
    model.classifier = torch.nn.Conv2d(4, 2, 1, bias=True)  # scratch weight and bias
    optimizer = authors_torch.create_optimizer(
        model, learning_rate=0.1, weight_decay=1e-4, max_step=bench.TRAIN_TOTAL_STEPS
    )
    settings = sorted(
        (group["lr"], group["weight_decay"], group["momentum"], group["nesterov"])
        for group in optimizer.param_groups
    )
    assert settings == sorted(
        [
            (0.1, 1e-4, 1e-4, True),
            (0.2, 0.0, 1e-4, True),
            (1.0, 1e-4, 1e-4, True),
            (2.0, 0.0, 1e-4, True),
        ]
    )
    # The learning rates of a step are set by that step (no gradients here: SGD skips every parameter).
    optimizer.global_step = bench.TRAIN_TOTAL_STEPS // 2
    optimizer.step()
    factor = 0.5**0.9
    assert sorted(group["lr"] for group in optimizer.param_groups) == pytest.approx(
        [0.1 * factor, 0.2 * factor, 1.0 * factor, 2.0 * factor]
    )
    assert optimizer.global_step == bench.TRAIN_TOTAL_STEPS // 2 + 1
    standard = authors_torch.create_optimizer(
        model, learning_rate=0.1, weight_decay=1e-4, max_step=10, momentum="standard"
    )
    assert {(group["momentum"], group["nesterov"]) for group in standard.param_groups} == {(0.9, True)}
    with pytest.raises(ValueError, match="momentum"):
        authors_torch.create_optimizer(model, learning_rate=0.1, weight_decay=1e-4, max_step=10, momentum="adam")


def test_authors_classifier_groups_backbone_parameters_once_under_model():
    """The stage1..5 aliases repeat every backbone tensor in the state dict (their checkpoint format), but
    named_parameters() lists each once under ``model.``, so the optimizer's groups are theirs: every backbone
    weight (BatchNorm scales included) x1, every BatchNorm bias x2, the bias-free head x10."""
    torch.manual_seed(0)
    model = authors_torch.create_classifier("resnet_tiny", 20)
    assert any(key.startswith("stage5.0.") for key in model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    assert all(name.startswith("model.") for name in names[:-1]) and names[-1] == "classifier.weight"
    weights, biases, scratch_weights, scratch_biases = authors_torch.parameter_groups(model)
    backbone = dict(model.model.named_parameters())
    assert len(weights) == sum(name.endswith("weight") for name in backbone)
    assert len(biases) == sum(name.endswith("bias") for name in backbone)
    assert scratch_weights == [model.classifier.weight] and scratch_biases == []


@pytest.mark.parametrize(
    "loss_option, level, re_loss, re_loss_option",
    [
        ("cl_pcl_re", "feature", "l1", "masking"),  # the README setting
        ("cl_pcl_re", "cam", "l2", "selection"),
        ("cl_re", "feature", "l1", "none"),
        ("cl", "feature", "l1", "masking"),
    ],
)
def test_authors_train_step_sums_its_terms_with_the_alpha_ramp(
    single_torch_thread, loss_option, level, re_loss, re_loss_option
):
    """loss = class_loss + [puzzle_class_loss] + [alpha_t * reconstruction_loss], alpha ramping linearly over
    alpha_schedule of the steps from 0 at step 0; the optimizer counts the steps."""
    cam = types.SimpleNamespace(
        loss_option=loss_option, grid=2, level=level, re_loss=re_loss, re_loss_option=re_loss_option,
        alpha=4.0, alpha_schedule=0.5,
    )
    torch.manual_seed(0)
    model = authors_torch.create_classifier("resnet_tiny", 5)
    optimizer = authors_torch.create_optimizer(model, learning_rate=0.01, weight_decay=1e-4, max_step=8)
    train_step = authors_torch.create_puzzle_train_step(model, optimizer, cam, max_step=8, batch_size=2)
    images = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    for step, alpha in enumerate((0.0, 1.0, 2.0)):  # 4 x step / (8 x 0.5)
        metrics = train_step(images, labels)
        assert metrics["alpha"] == alpha and optimizer.global_step == step + 1
        expected = metrics["class_loss"] + metrics.get("puzzle_class_loss", 0.0)
        expected = expected + alpha * metrics.get("reconstruction_loss", 0.0)
        assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-6)
        assert ("puzzle_class_loss" in metrics) == ("pcl" in loss_option)
        assert ("reconstruction_loss" in metrics) == ("re" in loss_option)
        assert all(np.isfinite(float(value)) for value in metrics.values())
    with pytest.raises(ValueError, match="loss_option"):
        authors_torch.create_puzzle_train_step(
            model, optimizer, types.SimpleNamespace(**dict(vars(cam), loss_option="cl_conf")), max_step=8,
            batch_size=2,
        )


def test_rows_past_the_time_budget_are_skipped_and_listed(tmp_path):
    json_path = tmp_path / "bench.json"
    status = bench.main(
        [
            "--suite",
            "gpu",
            "--time-budget-s",
            "0",
            "--hard-limit-s",
            "0",
            "--started-at",
            "1",
            "--json",
            str(json_path),
        ]
    )
    assert status == 0
    document = json.loads(json_path.read_text())
    planned = bench.build_suite("gpu", bench.parse_arguments(["--suite", "gpu"]))
    assert [row["id"] for row in document["rows"]] == [spec.row_id for spec in planned]
    assert {row["status"] for row in document["rows"]} == {"skipped"}


def test_a_failing_row_is_recorded_and_the_next_row_still_runs(single_torch_thread):
    settings = bench.WorkerSettings(soft_deadline=1e12, hard_deadline=1e12)
    specs = [
        bench.RowSpec("train", "torch", "no_such_arch", 2, 32, 32, "float32", "nchw", 1, 1),
        bench.RowSpec("inference", "torch", "resnet_tiny", 1, 32, 32, "float32", "nchw", 1, 1),
    ]
    messages = []
    bench.run_rows("torch", specs, settings, messages.append)
    rows = [message["row"] for message in messages if message["type"] == "row"]
    assert rows[0]["status"] == "error" and "no_such_arch" in rows[0]["error"]
    assert rows[1]["status"] == "ok" and rows[1]["images_per_second"] > 0


def test_mfu_and_ratios_follow_from_the_measurements():
    def row(framework, dtype, images_per_second, layout, flops=None):
        return {
            "id": f"{framework}/{dtype}/{layout}",
            "kind": "train",
            "framework": framework,
            "arch": "resnest101",
            "batch": 16,
            "height": 512,
            "width": 512,
            "dtype": dtype,
            "layout": layout,
            "status": "ok",
            "images_per_second": images_per_second,
            "flops_per_image": flops,
            "devices": 1,
        }

    rows = [
        row("jax", "bfloat16", 300.0, "nhwc", flops=1e12),
        row("jax", "float32", 120.0, "nhwc", flops=1e12),
        row("torch", "bfloat16", 150.0, "channels_last"),
        row("torch", "bfloat16", 100.0, "nchw"),
        row("torch", "float32", 60.0, "nchw"),
    ]
    environments = {
        "jax": {"device_kind": "NVIDIA H100 80GB HBM3"},
        "torch": {"device_kind": "NVIDIA H100 80GB HBM3"},
    }
    bench.finalise_rows(rows, environments, "default", {"bfloat16": None, "float32": None})
    jax_bf16, jax_fp32, torch_bf16 = rows[0], rows[1], rows[2]
    assert jax_bf16["jax_over_torch"] == pytest.approx(
        2.0
    )  # against the faster PyTorch bf16 layout
    assert jax_bf16["jax_over_torch_float32"] == pytest.approx(5.0)
    assert jax_fp32["jax_over_torch"] == pytest.approx(2.0)
    assert jax_bf16["mfu"] == pytest.approx(300e12 / 989.4e12)
    assert jax_fp32["mfu"] == pytest.approx(120e12 / 494.7e12)  # float32 convolutions run as TF32
    assert torch_bf16["flops_per_image"] == 1e12  # the same model FLOPs as the JAX row
    assert torch_bf16["flops_source"].endswith("of the matching JAX step")
    assert torch_bf16["mfu"] == pytest.approx(150e12 / 989.4e12)
    peak, basis = bench.peak_tflops_for(
        "NVIDIA H100 PCIe", "bfloat16", "default", {"bfloat16": 500.0}
    )
    assert (peak, "override" in basis) == (500.0, True)
    assert bench.peak_tflops_for("cpu", "float32", "default", {})[0] is None


def test_end_to_end_script_reports_the_train_cam_rate(tmp_path):
    """benchmarks/end_to_end.py runs the real train_cam stage and reads its rate back from metrics.jsonl."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = tmp_path / "end_to_end.json"
    completed = subprocess.run(
        [sys.executable, os.path.join(repository, "benchmarks", "end_to_end.py"), "--arch", "resnet_tiny",
         "--dtype", "float32", "--crop", "64", "--rescale-min", "48", "--rescale-max", "96", "--batch", "4",
         "--steps", "8", "--skip-steps", "4", "--log-every", "2", "--train-images", "8", "--workers", "0",
         "--data-dir", str(tmp_path / "data"), "--json", str(output)],
        capture_output=True, text=True, cwd=str(tmp_path),
        # One CPU device, as on a user's machine (the test session simulates 8).
        env={key: value for key, value in os.environ.items() if key != "XLA_FLAGS"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (result,) = json.loads(output.read_text())["results"]
    # 8 steps of 4 images, one record per step after step 4.
    assert result["workers"] == 0 and result["steps"] == 8 and result["records"] == 4
    assert result["images_per_second"] > 0
    assert "| 0 |" in completed.stdout


def test_end_to_end_rate_is_the_median_after_the_skipped_steps(tmp_path):
    from benchmarks import end_to_end

    metrics = tmp_path / "metrics.jsonl"
    rates = [1.0, 2.0, 50.0, 10.0, 30.0, 20.0]
    metrics.write_text("".join(json.dumps({"step": step + 1, "images_per_second": rate}) + "\n"
                               for step, rate in enumerate(rates)))
    assert end_to_end.read_rate(str(metrics), skip_steps=2) == (25.0, 4)  # median of 50, 10, 30, 20
    with pytest.raises(ValueError, match="no images_per_second"):
        end_to_end.read_rate(str(metrics), skip_steps=6)


@pytest.mark.slow
def _run_gpu_script_on_the_cpu(script: str, tmp_path, **settings) -> str:
    """Runs ``benchmarks/<script> tmp_path/out`` on this CPU with the stack already installed; returns its stderr."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    environment.update(
        BENCH_REQUIRE_ACCELERATOR="0",
        WHEELS_DIR=str(tmp_path / "no_wheels"),  # nothing to install: this machine has the stack
        **settings,
    )
    completed = subprocess.run(
        ["bash", os.path.join(repository, "benchmarks", script), str(tmp_path / "out")],
        capture_output=True, text=True, env=environment, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stderr


def test_gpu_followup_script_runs_its_four_parts_and_leaves_their_json(tmp_path):
    """benchmarks/gpu_followup.sh (the next GPU lease's one call) runs run_gpu.sh, random_walk.py, end_to_end.py
    and memory_estimate.py in turn; here on the CPU at smoke size, with the same script and flags as on the GPU."""
    stderr = _run_gpu_script_on_the_cpu(
        "gpu_followup.sh",
        tmp_path,
        FOLLOWUP_TOTAL_S="500",
        FOLLOWUP_BENCH_BUDGET_S="150",
        FOLLOWUP_MEMORY_MIN_S="20",
        FOLLOWUP_BENCH_ARGS="--suite smoke --kinds train --frameworks jax",
        FOLLOWUP_RANDOM_WALK_ARGS="--device cpu --sizes 24x32 --repeats 1",
        FOLLOWUP_END_TO_END_ARGS="--arch resnet_tiny --dtype float32 --crop 64 --rescale-min 48 --rescale-max 96 "
        "--batch 4 --steps 8 --skip-steps 4 --log-every 2 --train-images 8 --workers 0",
        FOLLOWUP_MEMORY_ARGS="--archs resnet_tiny --batch 2 --size 64 --dtypes float32 --remat 0,1",
    )
    (row,) = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert row["kind"] == "train" and row["status"] == "ok" and row["images_per_second"] > 0
    stencil, dense = json.loads((tmp_path / "out" / "random_walk.json").read_text())["results"]
    assert stencil["framework"] == "jax stencil" and dense["mode"] == "measured"
    (result,) = json.loads((tmp_path / "out" / "end_to_end.json").read_text())["results"]
    assert result["records"] == 4 and result["images_per_second"] > 0
    estimates = json.loads((tmp_path / "out" / "memory.json").read_text())["results"]
    assert [estimate["remat"] for estimate in estimates] == [False, True]
    assert all(estimate["total_bytes"] > 0 for estimate in estimates)
    assert "memory estimate exited 0" in stderr


def test_programs_expand_the_jax_train_rows_and_reach_the_model():
    options = bench.parse_arguments(
        ["--suite", "grid", "--archs", "resnest101,resnet50", "--dtypes", "bfloat16",
         "--jax-programs", "grouped/two_pass,split/one_pass,block_diagonal/two_pass"]
    )
    rows = bench.build_suite("grid", options)
    programs = [(row.framework, row.arch, row.program) for row in rows]
    assert programs == [
        ("jax", "resnest101", "grouped/two_pass"), ("jax", "resnest101", "split/one_pass"),
        ("jax", "resnest101", "block_diagonal/two_pass"), ("torch", "resnest101", ""),
        # ResNets have no grouped convolution: each statistics program once.
        ("jax", "resnet50", "grouped/two_pass"), ("jax", "resnet50", "grouped/one_pass"), ("torch", "resnet50", ""),
    ]
    assert rows[1].row_id.endswith("/bfloat16/nhwc/split/one_pass")
    assert bench.program_options("split/one_pass") == {"grouped_conv": "split", "bn_statistics": "one_pass"}
    with pytest.raises(SystemExit):
        bench.parse_arguments(["--jax-programs", "split"])
    # The keywords reach the model of the step.
    from puzzle_jax import models

    created = []
    original = models.create_classifier

    def recording(*args, **kwargs):
        created.append(kwargs)
        return original(*args, **kwargs)

    models.create_classifier = recording
    try:
        bench.build_jax_train_step(
            "resnest50", batch_per_device=1, height=32, width=32, model_options=bench.program_options("split/one_pass")
        )
    finally:
        models.create_classifier = original
    assert created[0]["grouped_conv"] == "split" and created[0]["bn_statistics"] == "one_pass"


@pytest.mark.slow
def test_gpu_step_waste_script_measures_the_programs_profiles_the_fastest_and_summarises(tmp_path):
    """benchmarks/gpu_step_waste.sh part a on the CPU, at smoke size (ResNets: the statistics programs only)."""
    _run_gpu_script_on_the_cpu(
        "gpu_step_waste.sh",
        tmp_path,
        STEP_WASTE_TOTAL_S="560",
        STEP_WASTE_CACHE=str(tmp_path / "cache"),
        STEP_WASTE_PROGRAMS="grouped/two_pass,grouped/one_pass",
        STEP_WASTE_SHAPE="--archs resnet_tiny --batch-sizes 2 --dtypes float32 --image-size 64 --warmup-steps 1 "
        "--timed-steps 2",
        STEP_WASTE_PROFILE_SHAPE="--arch resnet_tiny --batch 2 --dtype float32 --size 64 --steps 1 --warmup 1",
    )
    out = tmp_path / "out"
    (torch_row,) = json.loads((out / "torch.json").read_text())["rows"]
    assert torch_row["framework"] == "torch" and torch_row["status"] == "ok"
    jax_rows = json.loads((out / "jax.json").read_text())["rows"]
    assert [row["program"] for row in jax_rows] == ["grouped/two_pass", "grouped/one_pass"]
    assert all(row["status"] == "ok" for row in jax_rows)
    profiles = sorted(path.name for path in out.glob("profile_*.json"))
    assert "profile_grouped_two_pass.json" in profiles
    profile = json.loads((out / profiles[0]).read_text())
    assert abs(sum(entry["share"] for entry in profile["classes"]) - 1.0) < 1e-6
    summary = (out / "summary.txt").read_text()
    assert "PyTorch autocast:" in summary and "grouped/one_pass" in summary and "profile_grouped" in summary
