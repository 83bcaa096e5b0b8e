"""Tests of the stage registry, the workdir layout and the command-line entry point's defaults."""

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest

from puzzle_jax import config_checks, fileio, main, pipeline, training


def test_stage_names_are_checked():
    assert pipeline.check_stages("train_cam, eval_cam") == ["train_cam", "eval_cam"]
    assert pipeline.check_stages(("train_cam,infer_cam",)) == ["train_cam", "infer_cam"]
    with pytest.raises(ValueError, match="allowed stage names"):
        pipeline.check_stages(["train_cam", "train_everything"])
    with pytest.raises(ValueError, match="unknown or empty"):
        pipeline.check_stages([])


def test_workdir_layout(tmp_path):
    layout = pipeline.Workdir(str(tmp_path))
    assert layout.config_file() == str(tmp_path / "config.txt")
    assert layout.summary_path("eval_cam") == str(tmp_path / "eval_cam" / "summary.json")
    assert layout.exported_model("train_cam") == str(tmp_path / "train_cam" / "model")
    assert layout.training("pretrain") == training.TrainingPaths(
        checkpoints=str(tmp_path / "pretrain" / "checkpoints"),
        metrics=str(tmp_path / "pretrain" / "metrics.jsonl"),
        tensorboard=str(tmp_path / "pretrain" / "tensorboard"),
        export=str(tmp_path / "pretrain" / "model"),
    )
    assert layout.cam_dir() == str(tmp_path / "infer_cam" / "cams")
    assert layout.gallery_dir("eval_cam") == str(tmp_path / "eval_cam" / "gallery")
    assert layout.affinity_label_dir() == str(tmp_path / "aff_labels" / "labels")
    assert layout.random_walk_dir() == str(tmp_path / "infer_rw" / "rw")
    assert layout.pseudo_label_dir() == str(tmp_path / "pseudo_labels" / "labels")
    assert layout.segmentation_dir("val") == str(tmp_path / "infer_seg" / "val")
    # A stage's name as init_from stands for that stage's export here; anything else is a path.
    assert layout.resolve_init_from("pretrain") == str(tmp_path / "pretrain" / "model")
    assert layout.resolve_init_from("weights/resnet50") == "weights/resnet50"
    assert layout.resolve_init_from("") == ""


def test_overrides_of_moved_fields_are_named_with_their_new_place():
    assert main.renamed_field_error(["--config=configs/demo.py", "--config.train_cam.epochs=2"]) is None
    message = main.renamed_field_error(["--config=configs/demo.py", "--config.data.crop_size=64"])
    assert "--config.data.crop_size has moved: use --config.train_cam.crop_size (and pretrain.crop_size)" in message
    assert "use --config.train_cam.split" in main.renamed_field_error(["--config.data.train_split=train"])
    assert "use --config.train_cam.init_from" in main.renamed_field_error(["--config.model.init_from=x"])


def test_multi_process_flags_come_together_and_in_range():
    from absl import app

    assert main.distributed_arguments(None, None, None) is None
    assert main.distributed_arguments("10.0.0.1:1234", 4, 3) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3
    }
    with pytest.raises(app.UsageError, match="missing --num_processes, --process_id"):
        main.distributed_arguments("10.0.0.1:1234", None, None)
    with pytest.raises(app.UsageError, match="must be HOST:PORT"):
        main.distributed_arguments("10.0.0.1", 2, 0)
    with pytest.raises(app.UsageError, match="--num_processes=2 --process_id=2"):
        main.distributed_arguments("10.0.0.1:1234", 2, 2)


def test_default_workdir_is_named_after_the_config():
    assert main.default_workdir("configs/resnest101.py") == "runs/resnest101"
    assert main.default_workdir("/abs/configs/demo.py") == "runs/demo"


def test_compilation_cache_keeps_compiled_programs_on_disk(tmp_path):
    # A fresh process: JAX fixes its cache folder at the first compilation of a process.
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp
        from puzzle_jax import main
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        main.enable_compilation_cache({str(cache)!r})
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
        """
    )
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], check=True, cwd=repo_root, timeout=120)
    assert any(name.startswith("jit__lambda") for name in os.listdir(cache))


def test_compilation_cache_is_off_for_an_empty_folder(monkeypatch):
    import jax

    monkeypatch.setattr(jax.config, "update", lambda *args: pytest.fail(f"unexpected jax.config.update{args}"))
    main.enable_compilation_cache("")


def test_atomic_writes_leave_no_partial_file(tmp_path):
    path = str(tmp_path / "out.json")
    fileio.write_json(path, {"a": 1})
    assert fileio.read_json(path) == {"a": 1}
    with pytest.raises(TypeError):
        fileio.write_json(path, {"a": object()})  # not serialisable: fails half-way
    assert fileio.read_json(path) == {"a": 1}  # the earlier result is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(ValueError, match="must end in '.npz'"):
        fileio.write_npz(str(tmp_path / "cams.npy"), cam=None)


def test_every_process_finishes_a_stage_before_any_starts_the_next(tmp_path, monkeypatch):
    """Multi-host: a barrier after each stage (infer_cam's CAM files come from all processes; eval_cam reads them)."""
    import types

    import jax

    from puzzle_jax import sharding

    events = []
    for name in ("first", "second"):
        module = types.ModuleType(f"fake_stage_{name}")
        module.run = lambda config, workdir, name=name: events.append(f"run {name}") or {"stage": name}
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(pipeline, "STAGES", {"first": "fake_stage_first", "second": "fake_stage_second"})
    monkeypatch.setattr(sharding, "wait_for_all_processes", lambda name: events.append(f"barrier {name}"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    import ml_collections

    config = ml_collections.ConfigDict({"stages": ("first", "second")})
    summaries = pipeline.run_stages(config, str(tmp_path / "run"))
    # Also before each stage: no process starts it before process 0 has deleted (force_stages) and recorded it.
    assert events == [
        "barrier puzzle_jax stage first recorded", "run first", "barrier puzzle_jax stage first done",
        "barrier puzzle_jax stage second recorded", "run second", "barrier puzzle_jax stage second done",
    ]
    assert summaries["second"]["stage"] == "second"


def test_every_stage_declares_what_its_outputs_depend_on():
    assert set(pipeline.STAGE_CONFIG) == set(pipeline.STAGES)
    for name, declared in pipeline.STAGE_CONFIG.items():
        assert set(declared.inputs) <= set(pipeline.STAGES) - {name}, name


def test_a_stage_s_config_holds_its_fields_and_those_of_its_inputs():
    config = importlib.import_module("configs.demo").get_config()  # train_cam and train_aff start from pretrain
    infer_cam = pipeline.stage_config(config, "infer_cam")
    # Its own fields, train_cam's section and, through train_cam.init_from="pretrain", pretrain's.
    assert infer_cam["infer.scales"] == [0.5, 1.0, 1.5, 2.0] and infer_cam["infer.split"] == "train"
    assert infer_cam["train_cam.learning_rate"] == 0.05 and infer_cam["train_cam.epochs"] == 15
    assert infer_cam["pretrain.epochs"] == 8 and infer_cam["cam.alpha"] == 4.0 and infer_cam["seed"] == 0
    assert infer_cam["data.dataset"] == "puzzle_demo"
    # Fields that change no result are left out: intervals, worker counts, devices, the cache folders.
    for field in ("train_cam.log_every_steps", "train_cam.checkpoint_every_steps", "train_cam.max_to_keep",
                  "train_cam.validation_split", "model.remat", "data.worker_count", "data.data_dir",
                  "mesh.num_devices", "infer.host_threads", "infer.images_per_call", "compilation_cache_dir"):
        assert field not in infer_cam, field
    # aff_labels does not depend on train_aff or on the walk's settings; pseudo_labels does, through infer_rw.
    assert "refine.aff_fg_threshold" in pipeline.stage_config(config, "aff_labels")
    assert not any(field.startswith(("train_aff.", "refine.rw_")) for field in pipeline.stage_config(config,
                                                                                                      "aff_labels"))
    pseudo = pipeline.stage_config(config, "pseudo_labels")
    assert {"refine.rw_threshold", "refine.rw_radius", "train_aff.radius", "refine.aff_bg_threshold"} <= set(pseudo)
    config.train_cam.init_from = "weights/resnet50"  # a path, not a stage: pretrain no longer counts
    assert not any(field.startswith("pretrain.") for field in pipeline.stage_config(config, "infer_cam"))


def _fake_stages(monkeypatch, runs):
    """train_cam and infer_cam as fakes with the real names (so STAGE_CONFIG applies): each writes a file into its
    folder, as a partial or finished stage leaves outputs, and counts its runs."""
    for name in ("train_cam", "infer_cam"):
        module = types.ModuleType(f"fake_{name}")

        def run(config, workdir, name=name):
            runs.append(name)
            path = os.path.join(workdir.stage_dir(name), "output.txt")
            count = int(open(path).read()) + 1 if os.path.exists(path) else 1
            fileio.write_text(path, str(count))
            return {"runs_of_this_output": count}

        module.run = run
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(pipeline, "STAGES", {"train_cam": "fake_train_cam", "infer_cam": "fake_infer_cam"})


def _two_stage_config():
    config = importlib.import_module("configs.default").get_config()
    config.stages = ("train_cam", "infer_cam")
    return config


def test_a_rerun_with_another_config_refuses_and_names_the_fields(tmp_path, monkeypatch):
    """The issue's row: a finished stage kept its old model while config.txt took the new config. Now the run stops
    before any stage, names each stage and field that differs, and says how to start afresh."""
    runs = []
    _fake_stages(monkeypatch, runs)
    workdir = str(tmp_path / "run")
    pipeline.run_stages(_two_stage_config(), workdir)
    assert fileio.read_json(os.path.join(workdir, "train_cam", "stage_config.json"))["train_cam.epochs"] == 15
    changed = _two_stage_config()
    changed.train_cam.epochs = 1
    changed.train_cam.log_every_steps = 1  # changes no result: not named
    with pytest.raises(config_checks.ConfigError) as raised:
        pipeline.run_stages(changed, workdir)
    message = str(raised.value)
    assert f"train_cam ({workdir}/train_cam): train_cam.epochs: 15 -> 1" in message
    assert f"infer_cam ({workdir}/infer_cam): train_cam.epochs: 15 -> 1" in message
    assert "log_every_steps" not in message
    assert "--config.force_stages=train_cam,infer_cam" in message and "a new --workdir" in message
    assert runs == ["train_cam", "infer_cam"]  # nothing ran the second time ...
    assert "epochs: 15" in open(os.path.join(workdir, "config.txt")).read()  # ... nor was config.txt replaced
    # A change of only result-neutral fields runs (and resumes) as before.
    neutral = _two_stage_config()
    neutral.train_cam.log_every_steps = 1
    neutral.data.worker_count = 0
    pipeline.run_stages(neutral, workdir)
    assert runs[2:] == ["train_cam", "infer_cam"]


def test_force_stages_deletes_outputs_of_another_config_once(tmp_path, monkeypatch):
    runs = []
    _fake_stages(monkeypatch, runs)
    workdir = str(tmp_path / "run")
    pipeline.run_stages(_two_stage_config(), workdir)
    pipeline.run_stages(_two_stage_config(), workdir)  # the same config: outputs kept (a fake "resume")
    output = os.path.join(workdir, "train_cam", "output.txt")
    assert open(output).read() == "2"
    changed = _two_stage_config()
    changed.train_cam.learning_rate = 0.05
    changed.force_stages = ("train_cam",)
    with pytest.raises(config_checks.ConfigError, match="force_stages=train_cam,infer_cam"):  # infer_cam too
        pipeline.run_stages(changed, workdir)
    changed.force_stages = ("train_cam,infer_cam",)  # as "--config.force_stages=train_cam,infer_cam" arrives
    summaries = pipeline.run_stages(changed, workdir)
    assert summaries["train_cam"]["runs_of_this_output"] == 1 and summaries["infer_cam"]["runs_of_this_output"] == 1
    assert fileio.read_json(os.path.join(workdir, "train_cam", "stage_config.json"))["train_cam.learning_rate"] == 0.05
    # The same command again (e.g. after a preemption) keeps what this config made: it resumes, deletes nothing.
    summaries = pipeline.run_stages(changed, workdir)
    assert summaries["train_cam"]["runs_of_this_output"] == 2
    changed.stages, changed.force_stages = ("train_cam",), ("infer_cam",)
    with pytest.raises(config_checks.ConfigError, match=r"\['infer_cam'\] are not in config.stages"):
        pipeline.run_stages(changed, workdir)
    changed.force_stages = ("train_everything",)
    with pytest.raises(config_checks.ConfigError, match=r"config.force_stages=\['train_everything'\]: unknown"):
        pipeline.run_stages(changed, workdir)


def test_a_resumed_training_stage_with_another_section_is_refused(tmp_path, monkeypatch):
    """The issue's rows: a training stage stopped at step 100 resumed with fewer epochs (and exported the step-100
    model as final) or another batch size (and continued at step 100 of 160). Its record is written when it starts,
    so the stopped stage's checkpoints are protected."""
    from puzzle_jax import training

    module = types.ModuleType("fake_stopped_train_cam")

    def stopped(config, workdir):
        os.makedirs(workdir.training("train_cam").checkpoints + "/100")
        raise training.Preempted("train_cam", 100, 200)

    module.run = stopped
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(pipeline, "STAGES", {"train_cam": module.__name__})
    config = importlib.import_module("configs.default").get_config()
    config.stages = ("train_cam",)
    workdir = str(tmp_path / "run")
    with pytest.raises(training.Preempted):
        pipeline.run_stages(config, workdir)
    for field, value in (("epochs", 5), ("batch_size", 16)):
        changed = importlib.import_module("configs.default").get_config()
        changed.stages = ("train_cam",)
        changed.train_cam[field] = value
        with pytest.raises(config_checks.ConfigError, match=rf"train_cam\.{field}: {config.train_cam[field]} -> "):
            pipeline.run_stages(changed, workdir)
    # A stage that failed before writing anything (e.g. a misspelt split) is not protected: the fix just runs.
    module.run = lambda config, workdir: {}
    shutil.rmtree(workdir + "/train_cam/checkpoints")
    changed.train_cam.split = "train"
    pipeline.run_stages(changed, workdir)


def test_each_run_start_keeps_its_config(tmp_path, monkeypatch):
    runs = []
    _fake_stages(monkeypatch, runs)
    workdir = str(tmp_path / "run")
    first = _two_stage_config()
    pipeline.run_stages(first, workdir)
    second = _two_stage_config()
    second.train_cam.log_every_steps = 3
    pipeline.run_stages(second, workdir)
    history = sorted(os.listdir(os.path.join(workdir, "config_history")))
    assert len(history) == 2 and all(name.endswith(".txt") for name in history)
    texts = [open(os.path.join(workdir, "config_history", name)).read() for name in history]
    assert texts == [str(first), str(second)]
    assert open(os.path.join(workdir, "config.txt")).read() == str(second)


@pytest.mark.slow
def test_the_command_line_exits_75_on_sigterm_and_2_on_a_config_error_with_one_message(tmp_path):
    """The issue's rows through ``python -m puzzle_jax.main``: SIGTERM during training used to exit 1 with a full
    traceback; now the checkpoint is saved and one line says where and how to resume, with exit status 75. A bad
    value, and a rerun whose config differs from the stopped stage's, exit 2 with the message and no traceback."""
    import signal
    import time

    import ml_collections

    from puzzle_jax.data import datasets

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kwargs = {"num_pretrain": 4, "num_train": 2, "num_val": 2}
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = ml_collections.ConfigDict(kwargs)
    datasets.load_split_from_config(config.data, "pretrain")  # prepared here, once
    workdir = pipeline.Workdir(str(tmp_path / "run"))

    def command(*overrides):
        return [
            sys.executable, "-m", "puzzle_jax.main", "--config=configs/demo.py", f"--workdir={workdir.root}",
            f"--config.data.data_dir={config.data.data_dir}", f"--config.data.builder_kwargs={kwargs}",
            "--config.stages=pretrain", "--config.compilation_cache_dir=", "--config.pretrain.batch_size=2",
            "--config.pretrain.crop_size=64", "--config.pretrain.rescale_range=(48, 80)",
            "--config.pretrain.validation_split=", *overrides,
        ]

    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    bad = subprocess.run(
        command("--config.pretrain.learning_rate=-0.1"), cwd=repo, env=environment, capture_output=True, text=True,
        timeout=300,
    )
    assert bad.returncode == main.CONFIG_ERROR_EXIT_CODE, bad.stderr[-3000:]
    assert "pretrain.learning_rate=-0.1: must be a finite number > 0" in bad.stderr
    assert "Traceback" not in bad.stderr and not os.path.exists(workdir.root)

    # 2 steps per epoch: the run is far from done when the signal arrives.
    process = subprocess.Popen(
        command("--config.pretrain.epochs=1000"), cwd=repo, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    checkpoints = workdir.training("pretrain").checkpoints
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints)):
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == main.PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "stopped at step" in line]
    step = int(line.split("stopped at step ")[1].split()[0])
    assert line == (
        f"[pretrain] stopped at step {step} of 2000 (SIGTERM or preemption); checkpoint saved in {workdir.root}. "
        "Run the same command again to resume."
    )
    assert max(int(name) for name in os.listdir(checkpoints) if name.isdigit()) == step

    changed = subprocess.run(
        command("--config.pretrain.epochs=999"), cwd=repo, env=environment, capture_output=True, text=True,
        timeout=300,
    )
    assert changed.returncode == main.CONFIG_ERROR_EXIT_CODE, changed.stderr[-3000:]
    assert "pretrain.epochs: 1000 -> 999" in changed.stderr and "--config.force_stages=pretrain" in changed.stderr
    assert "Traceback" not in changed.stderr
