"""Tests of the study code: the parts dataset generator (studies/parts_dataset.py) and the Puzzle-CAM-vs-CAM runner
(studies/puzzle_vs_cam.py): its commands parse as the real command line parses them, each row changes one thing,
pretrains are shared exactly where the pretraining settings agree, and a smoke run reports and resumes."""

import json
import os
import shlex

import cv2
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from puzzle_jax.data import datasets
from studies import parts_dataset, puzzle_vs_cam
from studies.parts_dataset import PART_BODY, PART_EMBLEM, PART_NONE, PART_VOID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIZES = dict(num_pretrain=3, num_train=4, num_train_large=6, num_val=2)


def _folder_files(root) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


# --------------------------------------------------------------------------------------------------
# The parts dataset.
# --------------------------------------------------------------------------------------------------


def test_examples_are_deterministic_and_independent():
    first = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 3))
    again = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 3))
    for field in ("image", "mask", "parts", "labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    other_index = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 4))
    other_split = parts_dataset.generate_example(parts_dataset.example_rng(0, "val", 3))
    other_seed = parts_dataset.generate_example(parts_dataset.example_rng(1, "train", 3))
    for other in (other_index, other_split, other_seed):
        assert other.image.shape != first.image.shape or not np.array_equal(other.image, first.image)
    # train_large continues train's stream: its example i is train's example i.
    large = parts_dataset.generate_example(parts_dataset.example_rng(0, "train_large", 3))
    np.testing.assert_array_equal(large.image, first.image)


def test_examples_have_the_designed_structure():
    """Over 40 examples: sides off multiples of 32, labels = classes in the mask, every object an emblem inside it,
    the part mask consistent with the class mask, emblems a small share of their objects, 1-3 classes."""
    emblem_shares, sides, class_counts = [], [], []
    for index in range(40):
        example = parts_dataset.generate_example(parts_dataset.example_rng(0, "pretrain", index))
        height, width = example.mask.shape
        assert example.image.shape == (height, width, 3) and example.image.dtype == np.uint8
        sides += [height, width]
        present = sorted(set(np.unique(example.mask).tolist()) - {0, 255})
        assert np.flatnonzero(example.labels).tolist() == [c - 1 for c in present]
        class_counts.append(len(present))
        objects = (example.mask >= 1) & (example.mask <= parts_dataset.NUM_CLASSES)
        # Parts: body or emblem exactly on object pixels, void exactly where the class mask is void.
        np.testing.assert_array_equal(np.isin(example.parts, (PART_BODY, PART_EMBLEM)), objects)
        np.testing.assert_array_equal(example.parts == PART_VOID, example.mask == 255)
        np.testing.assert_array_equal(example.parts == PART_NONE, example.mask == 0)
        assert set(np.unique(example.parts).tolist()) <= {PART_NONE, PART_BODY, PART_EMBLEM, PART_VOID}
        for class_value in present:
            # Every labelled class shows its emblem, the evidence the label rests on.
            assert (example.parts[example.mask == class_value] == PART_EMBLEM).any(), (index, class_value)
        emblem_shares.append((example.parts == PART_EMBLEM).sum() / objects.sum())
        assert (example.mask == 255).any()  # the void band along object boundaries
    assert all(side % 32 for side in sides)
    assert min(sides) >= parts_dataset.GENERATION.side[0] and max(sides) <= parts_dataset.GENERATION.side[1] + 1
    assert 0.02 < np.mean(emblem_shares) < 0.2 and max(emblem_shares) < 0.5
    assert set(class_counts) <= {1, 2, 3} and len(set(class_counts)) > 1


def test_class_design_groups_bodies_and_makes_emblems_unique():
    classes = parts_dataset.CLASSES
    assert len(classes) == 12 and len({c.name for c in classes}) == 12
    # The emblem alone identifies a class; the three classes of a group differ in glyph and in colour.
    assert len({(c.glyph, c.emblem_colour) for c in classes}) == 12
    for group in range(len(parts_dataset.GROUPS)):
        members = [c for c in classes if c.group == group]
        assert len(members) == 3
        assert len({c.glyph for c in members}) == 3 and len({c.emblem_colour for c in members}) == 3
        hues = sorted(c.tint_hue for c in members)
        np.testing.assert_allclose(np.diff(hues), [1 / 3, 1 / 3])


def test_folder_is_deterministic_and_prepared_by_voc_folder(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    description = parts_dataset.write_folder(str(first), seed=0, **TINY_SIZES)
    parts_dataset.write_folder(str(second), seed=0, **TINY_SIZES)
    files = _folder_files(first)
    assert files == _folder_files(second)
    assert description["sizes"] == {"pretrain": 3, "train": 4, "val": 2, "train_large": 6}
    lists = {
        split: (first / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for split in ("pretrain", "train", "train_large", "val")
    }
    assert lists["train_large"][:4] == lists["train"]
    assert len(set(lists["pretrain"]) | set(lists["train_large"]) | set(lists["val"])) == 3 + 6 + 2
    parts_png = np.asarray(Image.open(first / "SegmentationParts" / f"{lists['val'][0]}.png"))
    assert parts_png.dtype == np.uint8 and parts_png.ndim == 2

    data_dir = str(tmp_path / "tfds")
    for split, ids in lists.items():
        source, info = datasets.load_split("voc_folder", split, data_dir=data_dir, root=str(first))
        assert info.class_names == tuple(c.name for c in parts_dataset.CLASSES)
        assert info.split_sizes == {name: len(value) for name, value in lists.items()}
        assert [record["id"] for record in source] == ids
    record = source[0]  # val's first example, as generated
    example = parts_dataset.generate_example(parts_dataset.example_rng(0, "val", 0))
    np.testing.assert_array_equal(record["image"], example.image)
    np.testing.assert_array_equal(record["mask"], example.mask)
    np.testing.assert_array_equal(record["labels"], example.labels)

    # The folder is reused as it is, and never mixed with another seed or size.
    assert parts_dataset.write_folder(str(first), seed=0, **TINY_SIZES) == description
    with pytest.raises(ValueError, match="another parts dataset"):
        parts_dataset.write_folder(str(first), seed=1, **TINY_SIZES)
    with pytest.raises(ValueError, match="train_large"):
        parts_dataset.write_folder(str(tmp_path / "c"), **dict(TINY_SIZES, num_train_large=2))


def test_preview_sheet(tmp_path):
    path = tmp_path / "sheet.png"
    parts_dataset.main(["--preview", str(path), "--preview-count", "3"])
    sheet = cv2.imread(str(path))
    assert sheet.shape[0] >= 2 * 192 and sheet.shape[1] >= 2 * 3 * 192
    assert sheet.std() > 10


# --------------------------------------------------------------------------------------------------
# The runner.
# --------------------------------------------------------------------------------------------------


def _parse(command: str) -> dict:
    """The config a printed command line gives, parsed the way puzzle_jax.main parses it, flattened."""
    argv = shlex.split(command)
    argv = [argv[0]] + argv[argv.index("puzzle_jax.main") + 1 :]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values([a for a in argv if not a.startswith("--workdir")])
    flat = {}

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict) and key != "builder_kwargs":
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    walk("", values.config.to_dict())
    return flat


def _dry_run(capsys, root, *extra) -> tuple[dict[str, str], dict[str, str], str]:
    """(pretrain command by the rows sharing it, run command by "row loss seed", the whole output)."""
    assert puzzle_vs_cam.main(["--root", str(root), "--dry-run", *extra]) == 0
    output = capsys.readouterr().out
    lines = output.splitlines()
    pretrains, runs = {}, {}
    for comment, command in zip(lines, lines[1:]):
        if comment.startswith("# pretrain shared by "):
            pretrains[comment[len("# pretrain shared by ") : -1]] = command
        elif comment.startswith("# ") and " seed " in comment:
            runs[comment[2:-1]] = command
    return pretrains, runs, output


def test_dry_run_commands_share_pretrains_and_change_one_thing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the commands name configs/demo.py relative to the repository
    pretrains, runs, output = _dry_run(capsys, tmp_path)
    assert not os.path.exists(tmp_path / "data")  # a dry run writes nothing, not even the dataset
    assert "16 rows: 12 distinct pretrains (12 to run) and 64 runs (64 to run); estimated" in output
    assert "python -m studies.parts_dataset --out" in output
    # base and more_images share one pretrain per dataset, standard_momentum and pretrain_momentum another; every
    # other recipe pretrains on its own.
    assert set(pretrains) == {
        f"{dataset}/{recipe}" for dataset in ("demo", "parts")
        for recipe in ("small_backbone", "long_pretrain", "output_stride_8", "combined")
    } | {f"{dataset}/base, {dataset}/more_images" for dataset in ("demo", "parts")} | {
        f"{dataset}/standard_momentum, {dataset}/pretrain_momentum" for dataset in ("demo", "parts")
    }
    assert len(runs) == 64
    pretrain_configs = {names: _parse(command) for names, command in pretrains.items()}
    run_configs = {name: _parse(command) for name, command in runs.items()}
    for name, config in run_configs.items():
        row, loss_option, _, seed = name.split()
        assert config["cam.loss_option"] == loss_option and config["seed"] == int(seed)
        assert config["eval.threshold_range"] == (0.01, 0.95, 0.01)
        assert config["stages"] == ("train_cam,infer_cam,eval_cam",)
        # The run starts from its row's pretrain, made with the same model and pretraining settings.
        (names, pretrain_config), = [(n, c) for n, c in pretrain_configs.items() if row in n.split(", ")]
        workdir = shlex.split(pretrains[names])[4].split("=", 1)[1]
        assert config["train_cam.init_from"] == os.path.join(workdir, "pretrain", "model")
        assert pretrain_config["stages"] == ("pretrain",) and pretrain_config["seed"] == 0
        for field, value in pretrain_config.items():
            # (demo/more_images only asks for a larger train split, which leaves the pretrain split as it is.)
            if field.startswith(("model.", "pretrain.", "data.")) and (
                field != "data.builder_kwargs" or row not in ("demo/more_images", "demo/combined")
            ):
                assert config[field] == value, (name, field)
        dataset = row.split("/")[0]
        assert config["data.dataset"] == ("puzzle_demo" if dataset == "demo" else "voc_folder")
        assert config["train_cam.crop_size"] == (128 if dataset == "demo" else 192)
        assert config["pretrain.rescale_range"] == ((96, 160) if dataset == "demo" else (144, 240))
    # One factor at a time: each recipe's cl seed-0 run differs from base's in exactly the fields it names.
    expected = {
        "small_backbone": {"model.arch"},
        "long_pretrain": {"pretrain.epochs"},
        # (momentum=0.9 is passed too, but it is the sections' default, read in "standard" mode only.)
        "standard_momentum": {
            f"{section}.{field}"
            for section in ("pretrain", "train_cam")
            for field in ("momentum_mode", "learning_rate")
        },
        "pretrain_momentum": {"pretrain.momentum_mode", "pretrain.learning_rate"},
        "output_stride_8": {"model.output_stride"},
    }
    for dataset in ("demo", "parts"):
        base = run_configs[f"{dataset}/base cl seed 0"]
        expected["more_images"] = {"data.builder_kwargs"} if dataset == "demo" else {"train_cam.split"}
        expected["combined"] = set().union(*(expected[recipe] for recipe in (
            "small_backbone", "long_pretrain", "standard_momentum", "more_images"
        )))
        for recipe, fields in expected.items():
            config = run_configs[f"{dataset}/{recipe} cl seed 0"]
            changed = {field for field in config if config[field] != base[field]} - {"train_cam.init_from"}
            assert changed == fields, (dataset, recipe, changed)
    demo_more = run_configs["demo/more_images cl seed 0"]
    assert demo_more["data.builder_kwargs"] == {"num_train": 1200}
    standard = run_configs["demo/standard_momentum cl_pcl_re seed 1"]
    for section in ("pretrain", "train_cam"):
        assert standard[f"{section}.momentum_mode"] == "standard" and standard[f"{section}.momentum"] == 0.9
        assert standard[f"{section}.learning_rate"] == 0.01
    assert run_configs["parts/base cl_pcl_re seed 0"]["eval.compare_workdir"].endswith(
        os.path.join("parts", "base", "cl_seed0")
    )


def test_dry_run_selects_rows_and_seeds(capsys, tmp_path):
    pretrains, runs, output = _dry_run(capsys, tmp_path, "--only", "parts/base,output_stride_8", "--seeds", "3")
    assert sorted(runs) == [
        f"{row} {loss} seed 3" for row in ("demo/output_stride_8", "parts/base", "parts/output_stride_8")
        for loss in ("cl", "cl_pcl_re")
    ]
    assert len(pretrains) == 3
    with pytest.raises(SystemExit):
        puzzle_vs_cam.main(["--root", str(tmp_path), "--dry-run", "--only", "nothing/here"])


def test_cost_estimate_follows_the_settings(tmp_path):
    rows = {row.name: row for row in puzzle_vs_cam.build_rows(str(tmp_path), [0], parts_folder="/parts")}

    def minutes(name, index):
        row = rows[name]
        return puzzle_vs_cam.estimate_minutes(row.runs[index] if index >= 0 else row.pretrain, row.dataset)

    # The demo's pretrain and Puzzle-CAM run near the README's 2.1 and 2.9 + 0.4 minutes (plus start-up).
    assert 2.1 < minutes("demo/base", -1) < 3.5 and 3.3 < minutes("demo/base", 1) < 5
    assert minutes("demo/base", 0) < minutes("demo/base", 1)  # plain CAM has no tiles to train
    assert minutes("demo/long_pretrain", -1) > 3 * minutes("demo/base", -1)
    for recipe in ("small_backbone", "output_stride_8", "more_images"):
        assert minutes(f"demo/{recipe}", 1) > 1.3 * minutes("demo/base", 1), recipe
    assert minutes("parts/base", 1) > 1.8 * minutes("demo/base", 1)  # 192 px crops, larger images


@pytest.mark.slow
def test_smoke_run_reports_and_resumes(capsys, tmp_path):
    root = tmp_path / "study"
    arguments = ["--root", str(root), "--only", "parts/base", "--seeds", "0", "--smoke",
                 "--data-dir", str(tmp_path / "tfds")]
    assert puzzle_vs_cam.main(arguments) == 0
    first = capsys.readouterr().out
    assert first.count("running (log:") == 3  # the pretrain, then cl and cl_pcl_re
    assert "| parts | base |" in first
    results = json.loads((root / "results.json").read_text())
    (row,) = results["rows"]
    assert row["complete"] and set(row["miou"]) == {"cl", "cl_pcl_re"}
    assert all(0.0 < row["miou"][option]["0"] <= 100.0 for option in ("cl", "cl_pcl_re"))
    assert row["mean_gain"] == pytest.approx(row["miou"]["cl_pcl_re"]["0"] - row["miou"]["cl"]["0"])
    assert all(run["num_images"] == 8 for run in row["runs"])  # the smoke folder's train split
    assert row["pretrain"]["done"] and "validation_map" in row["pretrain"]
    assert results["parts_dataset"]["sizes"]["train"] == 8 and results["machine"]["cores"]
    assert row["reproduce"].endswith(f"--only parts/base --seeds 0 --data-dir {tmp_path / 'tfds'} --smoke")
    markdown = (root / "results.md").read_text()
    assert "| parts | base |" in markdown and "--config.cam.loss_option=cl_pcl_re" in markdown
    assert "--config.train_cam.init_from=" in markdown and "python -m studies.parts_dataset" in markdown
    # The CAM gallery of the Puzzle-CAM run shows the plain-CAM run beside it.
    pcl_eval = json.loads((root / "parts" / "base" / "cl_pcl_re_seed0" / "eval_cam" / "summary.json").read_text())
    assert os.path.exists(pcl_eval["gallery"])

    # A second invocation finds everything done: no process is started, the results stay the same.
    logs = sorted(root.rglob("study.log"))
    assert len(logs) == 3
    before = {log: log.read_text() for log in logs}
    assert puzzle_vs_cam.main(arguments) == 0
    second = capsys.readouterr().out
    assert "running" not in second and "0 to run" in second
    assert {log: log.read_text() for log in logs} == before
    assert json.loads((root / "results.json").read_text())["rows"][0]["miou"] == row["miou"]


def test_a_failed_pretrain_is_reported_and_its_runs_skipped(capsys, monkeypatch, tmp_path):
    """A command that fails (here: an unknown config field, which stops puzzle_jax.main at once) is reported with
    its log, the row's runs are not started, the table is still written, and the exit status says so."""
    monkeypatch.setitem(puzzle_vs_cam.SMOKE_OVERRIDES, "pretrain.no_such_field", "1")
    root = tmp_path / "study"
    arguments = ["--root", str(root), "--only", "demo/base", "--seeds", "0", "--smoke", "--data-dir", str(tmp_path)]
    assert puzzle_vs_cam.main(arguments) == 1
    output = capsys.readouterr().out
    assert "[demo/base pretrain] FAILED" in output and "no_such_field" in output
    assert "running" not in output.split("FAILED", 1)[1]
    assert "1 failed command(s)" in output
    (row,) = json.loads((root / "results.json").read_text())["rows"]
    assert not row["complete"] and row["mean_gain"] is None and not row["pretrain"]["done"]
    assert "| demo | base | - | - | - |" in (root / "results.md").read_text()
