"""Tests of the stage registry, the workdir layout and the command-line entry point's defaults."""

import os
import subprocess
import sys
import textwrap

import pytest

from puzzle_jax import fileio, main, pipeline, training


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
    assert events == [
        "run first", "barrier puzzle_jax stage first done", "run second", "barrier puzzle_jax stage second done"
    ]
    assert summaries["second"]["stage"] == "second"
