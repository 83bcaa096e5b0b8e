"""Runs with two real JAX processes on loopback (gloo collectives over CPU devices), as a pod or a Slurm job runs.

Each test starts ``python -m puzzle_jax.main`` (or a small script) in two processes with ``--coordinator_address``,
``--num_processes`` and ``--process_id``, and checks what a multi-host user relies on: the same model as one process
with as many devices, a resume after one process was killed that ends where an uninterrupted run ends, SIGTERM on
one process stopping every process at the same saved step, inference that writes every image once, and a failure of
one process (or its absence) failing the others with its message instead of hanging.
"""

import glob
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from puzzle_jax import checkpointing, main, pipeline
from puzzle_jax.data import datasets

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SIZES = {"num_pretrain": 2, "num_train": 16, "num_val": 2}
# 16 images, batch 8: 2 steps an epoch, 12 steps in all (long enough to be killed in the middle).
TRAIN_CAM = [
    "--config.stages=train_cam", "--config.train_cam.init_from=", "--config.train_cam.crop_size=64",
    "--config.train_cam.rescale_range=(48, 80)", "--config.train_cam.batch_size=8", "--config.train_cam.epochs=6",
    "--config.train_cam.validation_split=", "--config.train_cam.log_every_steps=1",
    "--config.train_cam.checkpoint_every_steps=2", "--config.train_cam.max_to_keep=20",
    # Float differences of the all-reduce (gloo between processes) must stay float differences over 12 steps: L1
    # reconstruction's gradient jumps where the full and the tiled CAM are both exactly 0 after their ReLU (so the
    # tiniest difference flips its sign there), L2's is continuous; and a learning rate that does not make the loss
    # explode.
    "--config.cam.re_loss=l2", "--config.train_cam.learning_rate=0.005",
]
# Metrics that differ between runs by nature.
_TIMING = {"images_per_second"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict:
    # The test process forces 8 host devices (conftest); each process here sets its own with --num_cpu_devices.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)


def _start(count: int, devices: int, arguments: list[str], logs: str) -> list[subprocess.Popen]:
    """``count`` processes of ``python -m puzzle_jax.main`` (``devices`` CPU devices each), output in ``logs``."""
    os.makedirs(logs, exist_ok=True)
    port = _free_port()
    processes = []
    for index in range(count):
        distributed = (
            [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={index}"]
            if count > 1
            else []
        )
        log = open(os.path.join(logs, f"process_{index}.log"), "w")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "puzzle_jax.main", *arguments, *distributed, f"--num_cpu_devices={devices}"],
                cwd=REPO, env=_environment(), stdout=log, stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return processes


def _finish(processes: list[subprocess.Popen], logs: str, timeout: float = 600) -> list[tuple[int, str]]:
    """Waits for every process; ``(exit code, log)`` each. Stragglers are killed at the deadline."""
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            process.wait()
    return [
        (process.returncode, open(os.path.join(logs, f"process_{index}.log")).read())
        for index, process in enumerate(processes)
    ]


def _run(count: int, devices: int, arguments: list[str], logs: str) -> list[str]:
    results = _finish(_start(count, devices, arguments, logs), logs)
    for code, log in results:
        assert code == 0, log[-4000:]
    return [log for _, log in results]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny demo dataset, prepared once here (the dataset tests prepare one in the processes themselves)."""
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path_factory.mktemp("data"))
    config.data.builder_kwargs = ml_collections.ConfigDict(DEMO_SIZES)
    for split in ("train", "val"):
        datasets.load_split_from_config(config.data, split)
    return config.data.data_dir


def _arguments(workdir: str, data_dir: str, *overrides: str) -> list[str]:
    return [
        "--config=configs/demo.py", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
        f"--config.data.builder_kwargs={DEMO_SIZES}", "--config.compilation_cache_dir=", *overrides,
    ]


def _exported(workdir: str, stage: str = "train_cam") -> dict:
    """The exported model's parameters and batch statistics, as a flat ``path -> array``."""
    model, _ = checkpointing.load_exported(pipeline.Workdir(workdir).exported_model(stage), family="classifier")
    from flax import nnx

    state = nnx.state(model)
    return {"/".join(map(str, path)): np.asarray(value) for path, value in nnx.to_flat_state(state)}


def _metrics(workdir: str, stage: str = "train_cam") -> dict[int, dict]:
    records = {}
    with open(pipeline.Workdir(workdir).training(stage).metrics) as handle:
        for line in handle:
            record = json.loads(line)
            records[record["step"]] = {k: v for k, v in record.items() if k not in _TIMING}
    return records


def _checkpoint(workdir: str, step: int, stage: str = "train_cam") -> dict:
    """A training checkpoint's state (parameters, batch statistics, optimizer state) as a flat ``path -> array``,
    restored onto this process's first device whatever devices saved it."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(pipeline.Workdir(workdir).training(stage).checkpoints, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree)
        restored = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(key): np.asarray(leaf) for key, leaf in jax.tree.leaves_with_path(restored)}


def _assert_close(ours: dict, theirs: dict, *, tolerance: float) -> None:
    """Every array within ``tolerance`` of the other's, relative to the array's largest magnitude (an element-wise
    relative test fails on elements that happen to be near 0)."""
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        scale = max(float(np.max(np.abs(theirs[name]), initial=0.0)), 1e-3)
        difference = float(np.max(np.abs(ours[name] - theirs[name]), initial=0.0))
        assert difference <= tolerance * scale, (name, difference, scale)


def _assert_same_metrics(workdir: str, reference: str, steps: range, *, rtol: float, atol: float) -> None:
    our_metrics, their_metrics = _metrics(workdir), _metrics(reference)
    assert sorted(our_metrics) == sorted(their_metrics) == list(range(1, 13))
    for step in steps:
        record = our_metrics[step]
        assert record.keys() == their_metrics[step].keys()
        for name, value in record.items():
            np.testing.assert_allclose(value, their_metrics[step][name], rtol=rtol, atol=atol, err_msg=(step, name))


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
    """train_cam on 1 process x 4 CPU devices: the reference of the two-process runs."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    _run(1, 4, _arguments(workdir, data_dir, *TRAIN_CAM), os.path.join(workdir, "logs"))
    return workdir


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """train_cam on 2 processes x 2 CPU devices."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    logs = _run(2, 2, _arguments(workdir, data_dir, *TRAIN_CAM), os.path.join(workdir, "logs"))
    return workdir, logs


def test_two_processes_train_the_model_of_one_process_with_as_many_devices(one_process_run, two_process_run):
    """The same global batches in the same order, the same updates, the same batch statistics; only the all-reduce
    differs (gloo between processes), hence a float tolerance. Compared up to step 4: from random weights at this
    learning rate the gradient norm grows to ~50 by step 7 and the run amplifies float differences of 1e-7 to 1e-2
    within a few steps (measured), which says nothing about the processes; an exact comparison of whole runs is the
    kill-and-resume test's, between two runs of two processes."""
    workdir, _ = two_process_run
    _assert_same_metrics(workdir, one_process_run, range(1, 5), rtol=2e-5, atol=1e-6)
    _assert_close(_checkpoint(workdir, 4), _checkpoint(one_process_run, 4), tolerance=1e-4)
    # The export of a pod run loads on one machine (this test process: 8 devices, none of the run's).
    assert {name: value.shape for name, value in _exported(workdir).items()} == {
        name: value.shape for name, value in _exported(one_process_run).items()
    }
    # Every process's place in the data stream is in the checkpoint, one state per process: process p's last
    # example of step 12 is its 48th, sampler index 47 * 2 + p.
    checkpoints = pipeline.Workdir(workdir).training("train_cam").checkpoints
    states = json.load(open(os.path.join(checkpoints, "12", "data", "metadata")))["iterators"]
    assert [json.loads(state)["last_seen_indices"] for state in states] == [{"0": 94}, {"0": 95}]


def test_a_killed_process_and_a_restart_of_both_end_where_an_uninterrupted_run_ends(data_dir, two_process_run,
                                                                                    tmp_path):
    workdir = str(tmp_path / "run")
    arguments = _arguments(workdir, data_dir, *TRAIN_CAM)
    processes = _start(2, 2, arguments, str(tmp_path / "logs_first"))
    checkpoints = pipeline.Workdir(workdir).training("train_cam").checkpoints
    deadline = time.time() + 400
    killed_after = None
    while time.time() < deadline and all(process.poll() is None for process in processes):
        steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()] if os.path.isdir(checkpoints) else []
        if steps and max(steps) >= 4:
            processes[1].send_signal(signal.SIGKILL)  # the other one is stopped as a launcher would
            processes[0].send_signal(signal.SIGKILL)
            killed_after = max(steps)
            break
        time.sleep(0.02)
    for process in processes:
        process.wait(timeout=60)
    assert killed_after is not None and killed_after < 12, "the run ended before it could be killed"
    assert not os.path.exists(pipeline.Workdir(workdir).exported_model("train_cam"))

    _run(2, 2, arguments, str(tmp_path / "logs_second"))
    # The second run resumed from a checkpoint saved before the kill, not from the start.
    summary = json.load(open(os.path.join(pipeline.Workdir(workdir).stage_dir("train_cam"), "summary.json")))
    assert killed_after <= summary["start_step"] < 12
    uninterrupted, _ = two_process_run
    _assert_same_metrics(workdir, uninterrupted, range(1, 13), rtol=0, atol=0)
    _assert_close(_checkpoint(workdir, 12), _checkpoint(uninterrupted, 12), tolerance=0)


def test_sigterm_on_one_process_saves_the_same_step_on_every_process_and_exits_75(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    long_run = [*TRAIN_CAM, "--config.train_cam.epochs=1000", "--config.train_cam.checkpoint_every_steps=1000"]
    logs = str(tmp_path / "logs")
    processes = _start(2, 2, _arguments(workdir, data_dir, *long_run), logs)
    checkpoints = pipeline.Workdir(workdir).training("train_cam").checkpoints
    deadline = time.time() + 400
    while time.time() < deadline and all(process.poll() is None for process in processes):
        # The first step is always saved: training is under way once its checkpoint is there.
        if os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
            processes[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    results = _finish(processes, logs, timeout=300)
    for code, log in results:
        assert code == main.PREEMPTED_EXIT_CODE, log[-4000:]
        assert "Traceback" not in log
    lines = [[line for line in log.splitlines() if "stopped at step" in line] for _, log in results]
    steps = {int(found[0].split("stopped at step ")[1].split()[0]) for found in lines}
    assert len(steps) == 1 and all(len(found) == 1 for found in lines)
    (step,) = steps
    assert 1 < step < 2000
    assert max(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == step


def test_inference_and_the_cpu_stage_on_two_processes_write_every_image_once(data_dir, two_process_run, tmp_path):
    trained, _ = two_process_run
    stages = "--config.stages=train_cam,infer_cam,eval_cam,aff_labels"
    common = [*TRAIN_CAM, stages, "--config.infer.split=train", "--config.infer.scales=(1.0,)",
              "--config.refine.workers=1"]
    results = {}
    for count, devices in ((2, 1), (1, 2)):
        workdir = str(tmp_path / f"processes_{count}")
        shutil.copytree(os.path.join(trained, "train_cam"), os.path.join(workdir, "train_cam"))
        shutil.copy(os.path.join(trained, "train_cam", "stage_config.json"), os.path.join(workdir, "train_cam"))
        _run(count, devices, _arguments(workdir, data_dir, *common), os.path.join(workdir, "logs"))
        results[count] = pipeline.Workdir(workdir)
    two, one = results[2], results[1]
    summary = json.load(open(os.path.join(two.stage_dir("infer_cam"), "summary.json")))
    # 16 images, every 2nd to each process: 8 + 8 written, none twice.
    assert summary["written"] == 16 and summary["written_by_process"] == [8, 8]
    labels = json.load(open(os.path.join(two.stage_dir("aff_labels"), "summary.json")))
    assert labels["written"] == 16 and labels["written_by_process"] == [8, 8]
    for stage_folder, pattern in (("infer_cam", "cams/*.npz"), ("aff_labels", "labels/*.png")):
        ours = sorted(os.path.basename(path) for path in glob.glob(os.path.join(two.stage_dir(stage_folder), pattern)))
        theirs = sorted(os.path.basename(path) for path in glob.glob(os.path.join(one.stage_dir(stage_folder),
                                                                                   pattern)))
        assert len(ours) == 16 and ours == theirs
    # The evaluation of the two-process CAMs equals the one-process run's.
    scores = [json.load(open(os.path.join(w.stage_dir("eval_cam"), "summary.json"))) for w in (two, one)]
    assert scores[0]["miou"] == pytest.approx(scores[1]["miou"], abs=1e-6)
    for path in glob.glob(os.path.join(two.stage_dir("aff_labels"), "labels", "*.png")):
        other = os.path.join(one.stage_dir("aff_labels"), "labels", os.path.basename(path))
        assert open(path, "rb").read() == open(other, "rb").read(), path


_COORDINATION_SCRIPT = """
import os, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
mode, port, index, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, index)
jax.devices()  # the backend's start-up is itself a meeting of the processes: done before the tests' waits
from puzzle_jax import sharding
sharding.configure_barriers(float(sys.argv[5]) if len(sys.argv) > 5 else 60.0)
marker = os.path.join(folder, "prepared")

def prepare():
    if index == 0:
        time.sleep(2)  # a slow preparation: the other process must wait for it
        if mode == "fail":
            raise FileNotFoundError("/data/VOC2012/JPEGImages: no such folder (set --config.data.root)")
        open(marker, "w").write("done")
    # every process opens what process 0 prepared
    return open(marker).read()

try:
    if mode == "absent":
        if index == 1:
            time.sleep(8)  # never reaches the barrier in time
        sharding.wait_for_all_processes("stage train_cam done")
    else:
        print("opened", sharding.first_on_process_zero("dataset prepared", prepare), flush=True)
        print("texts", sharding.gather_texts("states", f"state of {index}"), flush=True)
        sharding.wait_for_all_processes("stage done")
except Exception as error:
    print(f"{type(error).__name__}: {error}", flush=True)
    os._exit(3)
os._exit(0)
"""


def _coordinate(tmp_path, mode: str, *extra: str) -> list[tuple[int, str]]:
    script = tmp_path / "coordinate.py"
    script.write_text(_COORDINATION_SCRIPT)
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), mode, port, str(index), str(tmp_path), *extra],
            cwd=REPO, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for index in range(2)
    ]
    return [(process.wait(timeout=120), process.stdout.read()) for process in processes]


def test_process_zero_prepares_while_the_other_waits_and_texts_gather_in_process_order(tmp_path):
    for code, output in _coordinate(tmp_path, "ok"):
        assert code == 0, output[-3000:]
        assert "opened done" in output and "texts ['state of 0', 'state of 1']" in output


def test_a_failed_preparation_fails_every_process_with_its_message(tmp_path):
    message = "FileNotFoundError: /data/VOC2012/JPEGImages: no such folder (set --config.data.root)"
    (code_0, output_0), (code_1, output_1) = _coordinate(tmp_path, "fail")
    assert code_0 == code_1 == 3
    assert message in output_0
    assert f"ProcessesOutOfStepError: process 0 failed at 'dataset prepared': {message}" in output_1


def test_a_process_that_never_arrives_fails_the_barrier_after_the_timeout(tmp_path):
    started = time.time()
    (code_0, output_0), _ = _coordinate(tmp_path, "absent", "3")
    assert code_0 == 3 and time.time() - started < 60
    assert "process 0 of 2 waited 3 s at 'stage train_cam done' for every process" in output_0


def test_a_dataset_that_fails_to_prepare_fails_both_processes_of_a_run_with_its_message(tmp_path):
    workdir, missing = str(tmp_path / "run"), str(tmp_path / "no_such_folder")
    arguments = [
        "--config=configs/demo.py", f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'data'}",
        "--config.compilation_cache_dir=", "--config.stages=train_cam", "--config.train_cam.init_from=",
        "--config.data.dataset=voc_folder", f"--config.data.root={missing}",
    ]
    logs = str(tmp_path / "logs")
    started = time.time()
    results = _finish(_start(2, 1, arguments, logs), logs, timeout=300)
    message = f"Dataset 'voc_folder': root {missing} is not a directory."
    (code_0, log_0), (code_1, log_1) = results
    assert code_0 != 0 and code_1 != 0 and time.time() - started < 240
    assert f"FileNotFoundError: {message}" in log_0
    assert f"ProcessesOutOfStepError: process 0 failed at 'dataset voc_folder train prepared': FileNotFoundError: " \
           f"{message}" in log_1
