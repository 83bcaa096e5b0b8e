"""The Puzzle-CAM-vs-plain-CAM study: what decides the sign of Puzzle-CAM's gain.

This module owns the study's grid (`DATASETS`, `RECIPES`), the command lines it runs, their sharing of pretrained
backbones, its cost estimate and its report. Run it from the repository root::

    python -m studies.puzzle_vs_cam --root DIR [--only ROW_PATTERN] [--seeds 0,1] [--dry-run]

A row is (dataset, recipe). For each row and seed it trains plain CAM (``cl``) and Puzzle-CAM (``cl_pcl_re``) from
the same pretrained backbone through the real command line (``python -m puzzle_jax.main --config=configs/demo.py
...`` in a subprocess, ``JAX_PLATFORMS=cpu``), scores the CAMs on the training split with a wide background
threshold sweep, and reports the gain. Each recipe but the last changes one thing from the demo recipe
(configs/demo.py):

* ``base``: the demo recipe as it is;
* ``small_backbone``: ``resnet_small`` (two bottleneck blocks per stage) instead of ``resnet_tiny`` (pretrain too);
* ``long_pretrain``: 30 pretraining epochs instead of 8;
* ``standard_momentum``: momentum 0.9 and learning rate 0.01 in both training stages instead of the authors'
  effective momentum (= weight decay) and 0.05;
* ``pretrain_momentum``: the same in the pretrain stage only (the stand-in for ImageNet weights, which are trained
  with momentum 0.9), train_cam with the authors' optimizer; it shares ``standard_momentum``'s pretrain;
* ``more_images``: train_cam on 1,200 images instead of 600 (the first 600 are the same images);
* ``output_stride_8``: output stride 8 instead of 16 (pretrain too);
* ``combined``: ``small_backbone``, ``long_pretrain``, ``standard_momentum`` and ``more_images`` at once (the one row
  that is not a single change).

The datasets: ``demo`` (the built-in ``puzzle_demo``) and ``parts`` (``studies.parts_dataset``, written on first use
under ``DIR/data/parts`` and read through the ``voc_folder`` builder).

Pretraining runs once per distinct pretraining recipe (``--config.stages=pretrain``, seed 0, in
``DIR/<dataset>/pretrain_<hash>``); every run whose pretraining settings are the same starts from that export
(``--config.train_cam.init_from``): ``base`` and ``more_images`` share one, as do all seeds of a row. Runs live in
``DIR/<dataset>/<recipe>/<loss option>_seed<seed>``. Everything resumes: a pretrain with its ``summary.json`` and a
run with its ``eval_cam/summary.json`` are not started again, and a started one continues from its checkpoints (the
pipeline skips finished stages). ``DIR/results.json`` and ``DIR/results.md`` are rewritten after every row, with
every row of the grid that has results on disk; each finished row is also printed at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from puzzle_jax import fileio
from puzzle_jax.evaluation import report
from studies import parts_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/demo.py"
LOSS_OPTIONS = ("cl", "cl_pcl_re")
# Every run sweeps the background threshold this widely (the demo config sweeps 0.05-0.75), so that no best
# threshold sits at an end of the sweep; the report flags any that still does.
THRESHOLD_RANGE = "(0.01, 0.95, 0.01)"
# Fields whose value changes what the pretrain stage produces: a recipe override of one of these gets a pretrain of
# its own; any other override (train_cam., cam., infer., eval.) shares the pretrain of the recipe without it.
_PRETRAIN_FIELD_PREFIXES = ("model.", "pretrain.", "data.")

Overrides = dict[str, str]


# --------------------------------------------------------------------------------------------------
# The grid.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row's change from the demo recipe.

    Attributes:
      name: row name.
      what: what it changes, in words.
      overrides: config field -> value; fields of ``_PRETRAIN_FIELD_PREFIXES`` give it its own pretrain.
      more_images: train_cam on the dataset's larger training split (`Dataset.overrides`).
    """

    name: str
    what: str
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    more_images: bool = False


def _standard_momentum(*sections: str) -> Overrides:
    """Momentum 0.9 and learning rate 0.01 in these training sections, instead of the authors' effective momentum."""
    return {
        f"{section}.{field}": value
        for section in sections
        for field, value in (("momentum_mode", "standard"), ("momentum", "0.9"), ("learning_rate", "0.01"))
    }


_ONE_FACTOR_RECIPES: tuple[Recipe, ...] = (
    Recipe("base", "configs/demo.py as it is"),
    Recipe(
        "small_backbone", "resnet_small (2 blocks per stage) instead of resnet_tiny", {"model.arch": "resnet_small"}
    ),
    Recipe("long_pretrain", "pretrain 30 epochs instead of 8", {"pretrain.epochs": "30"}),
    Recipe(
        "standard_momentum",
        "momentum 0.9 and lr 0.01 in both stages instead of the authors' effective momentum and lr 0.05",
        _standard_momentum("pretrain", "train_cam"),
    ),
    Recipe(
        "pretrain_momentum",
        "momentum 0.9 and lr 0.01 in the pretrain stage only (as ImageNet backbones are trained); train_cam as the "
        "authors",
        _standard_momentum("pretrain"),
    ),
    Recipe("more_images", "train_cam on 1,200 images instead of 600 (the first 600 the same)", more_images=True),
    Recipe("output_stride_8", "output stride 8 instead of 16 (pretrain too)", {"model.output_stride": "8"}),
)


def _combined_recipe(name: str, recipe_names: Sequence[str]) -> Recipe:
    """The one-factor recipes ``recipe_names`` applied together (each sets fields of its own); a name that is not
    one of them is a KeyError."""
    by_name = {recipe.name: recipe for recipe in _ONE_FACTOR_RECIPES}
    parts = [by_name[name] for name in recipe_names]
    overrides = {field: value for recipe in parts for field, value in recipe.overrides.items()}
    return Recipe(
        name, f"{', '.join(recipe_names)} together", overrides, more_images=any(recipe.more_images for recipe in parts)
    )


RECIPES: tuple[Recipe, ...] = (
    *_ONE_FACTOR_RECIPES,
    # Not one factor: the setting nearest an independent PyTorch transcription of the authors' step that saw
    # Puzzle-CAM gain 2-3 points on another synthetic dataset (a deeper narrow ResNet, a long warm start, momentum
    # 0.9, more images), to tell whether the factors only act together.
    _combined_recipe("combined", ("small_backbone", "long_pretrain", "standard_momentum", "more_images")),
)

# The hidden --smoke option: a few steps on tiny images, for the runner's own test. Applied after the recipe (so
# that, e.g., long_pretrain's smoke pretrain is as short as base's).
SMOKE_OVERRIDES: Overrides = {
    **{
        f"{section}.{field}": value
        for section in ("pretrain", "train_cam")
        for field, value in (("epochs", "1"), ("batch_size", "8"), ("crop_size", "64"), ("rescale_range", "(48, 96)"))
    },
    "infer.scales": "(1.0,)",
    "eval.gallery_images": "2",
}
SMOKE_PARTS_SIZES = dict(num_pretrain=16, num_train=8, num_train_large=16, num_val=4)
SMOKE_DEMO_SIZES = {"num_pretrain": 16, "num_train": 8, "num_val": 4}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset of the study and what its runs need to read it.

    Attributes:
      name: ``demo`` or ``parts``.
      what: the dataset, in words.
      mean_image_side: mean image side in pixels (for the cost estimate).
    """

    name: str
    what: str
    mean_image_side: float

    def overrides(self, *, folder: str, smoke: bool, more_images: bool) -> tuple[Overrides, Overrides]:
        """The dataset's config overrides: (those of every stage, those of train_cam and after only).

        Args:
          folder: the parts folder (``parts`` only).
          smoke: tiny splits for the smoke test.
          more_images: train_cam on the larger training split.
        """
        if self.name == "demo":
            shared: Overrides = {}
            train_only: Overrides = {}
            if smoke:
                shared["data.builder_kwargs"] = repr(SMOKE_DEMO_SIZES)
            if more_images:
                # The demo renders example i of a split from its own generator (seed, split, i), so a larger train
                # split keeps the first 600 images and leaves the pretrain and val splits as they are: the base
                # pretrain export serves this row too, hence "train_only". Its CAMs are scored on the whole larger
                # split (the demo has no split of the first 600 alone); the report shows the image count.
                sizes = dict(SMOKE_DEMO_SIZES, num_train=2 * SMOKE_DEMO_SIZES["num_train"]) if smoke else {
                    "num_train": 1200
                }
                train_only["data.builder_kwargs"] = repr(sizes)
            return shared, train_only
        shared = {
            "data.dataset": "voc_folder",
            "data.root": folder,
            "pretrain.split": "pretrain",
            "pretrain.validation_split": "val",
            "train_cam.split": "train",
            "train_cam.validation_split": "val",
            "infer.split": "train",
        }
        # The demo's crop (128) and rescale range (96-160) are its largest image side (128) x 1 and x 0.75-1.25;
        # the same ratios for 150-190 px images (the crop rounded up to a multiple of 32).
        for section in ("pretrain", "train_cam"):
            shared[f"{section}.crop_size"] = "192"
            shared[f"{section}.rescale_range"] = "(144, 240)"
        # train_large starts with train's 600 images; CAMs are still scored on train, as in every other row.
        train_only = {"train_cam.split": "train_large"} if more_images else {}
        return shared, train_only


DATASETS: tuple[Dataset, ...] = (
    Dataset("demo", "built-in puzzle_demo (configs/demo.py defaults; 80-128 px)", mean_image_side=104.0),
    Dataset("parts", "studies.parts_dataset folder via voc_folder (150-190 px)", mean_image_side=170.0),
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One subprocess: a pretrain (``loss_option`` None) or a cl / cl_pcl_re run."""

    workdir: str
    overrides: Overrides
    loss_option: str | None = None
    seed: int = 0

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "puzzle_jax.main", f"--config={CONFIG}", f"--workdir={self.workdir}",
            *(f"--config.{field}={value}" for field, value in self.overrides.items()),
        ]

    def done_marker(self) -> str:
        stage = "pretrain" if self.loss_option is None else "eval_cam"
        return os.path.join(self.workdir, stage, "summary.json")


@dataclasses.dataclass(frozen=True)
class Row:
    """A (dataset, recipe) row: its shared pretrain and its runs, cl before cl_pcl_re for each seed."""

    dataset: Dataset
    recipe: Recipe
    pretrain: Run
    runs: tuple[Run, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset.name}/{self.recipe.name}"


def _pretrain_workdir(root: str, dataset: str, overrides: Overrides) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(root, dataset, f"pretrain_{digest}")


def build_rows(
    root: str,
    seeds: Sequence[int],
    *,
    parts_folder: str,
    data_dir: str = "",
    smoke: bool = False,
    patterns: Sequence[str] = (),
) -> list[Row]:
    """The grid's rows (those matching `patterns`, all when empty), with their commands.

    Args:
      root: the study folder (absolute).
      seeds: training seeds of every row.
      parts_folder: the parts dataset folder.
      data_dir: ``data.data_dir`` of every run ("" = the config's).
      smoke: tiny settings (the runner's test).
      patterns: fnmatch patterns of ``dataset/recipe``; one without "/" matches the recipe or the dataset name.
    """
    rows = []
    for dataset in DATASETS:
        for recipe in RECIPES:
            name = f"{dataset.name}/{recipe.name}"
            if patterns and not any(_matches(pattern, name) for pattern in patterns):
                continue
            shared, train_only = dataset.overrides(folder=parts_folder, smoke=smoke, more_images=recipe.more_images)
            common = dict(shared)
            if data_dir:
                common["data.data_dir"] = data_dir
            pretrain_fields = {k: v for k, v in recipe.overrides.items() if k.startswith(_PRETRAIN_FIELD_PREFIXES)}
            train_fields = {k: v for k, v in recipe.overrides.items() if k not in pretrain_fields}
            pretrain_overrides = {**common, **pretrain_fields, **(SMOKE_OVERRIDES if smoke else {})}
            pretrain_workdir = _pretrain_workdir(root, dataset.name, pretrain_overrides)
            pretrain = Run(pretrain_workdir, {"stages": "pretrain", "seed": "0", **pretrain_overrides})
            runs = []
            for seed in seeds:
                for loss_option in LOSS_OPTIONS:
                    workdir = os.path.join(root, dataset.name, recipe.name, f"{loss_option}_seed{seed}")
                    overrides = {
                        "stages": "train_cam,infer_cam,eval_cam",
                        "seed": str(seed),
                        "cam.loss_option": loss_option,
                        "train_cam.init_from": os.path.join(pretrain_workdir, "pretrain", "model"),
                        "eval.threshold_range": THRESHOLD_RANGE,
                        **common,
                        **pretrain_fields,
                        **train_fields,
                        **train_only,
                        **(SMOKE_OVERRIDES if smoke else {}),
                    }
                    if loss_option != "cl":
                        # The gallery puts the plain-CAM run's CAMs of the same images beside these (paper Fig. 3).
                        overrides["eval.compare_workdir"] = os.path.join(
                            root, dataset.name, recipe.name, f"cl_seed{seed}"
                        )
                    runs.append(Run(workdir, overrides, loss_option, seed))
            rows.append(Row(dataset, recipe, pretrain, tuple(runs)))
    return rows


def _matches(pattern: str, name: str) -> bool:
    if "/" in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return any(fnmatch.fnmatchcase(part, pattern) for part in name.split("/"))


# --------------------------------------------------------------------------------------------------
# Cost estimate.
# --------------------------------------------------------------------------------------------------

# Minutes on 2 quiet CPU cores for the demo recipe (README: pretrain 600 steps 2.1 min, Puzzle-CAM train_cam 555
# steps 2.9 min, multi-scale inference of 600 images 25 s). A plain-CAM step is taken as a pretrain step (both are
# one forward and backward of the full image; Puzzle-CAM adds the tiles' forward and backward).
_MINUTES_PER_CLASSIFICATION_STEP = 2.1 / 600
_MINUTES_PER_PUZZLE_STEP = 2.9 / 555
_MINUTES_PER_INFERRED_IMAGE = 25 / 60 / 600
# Per process: start-up, dataset opening, compilations, the threshold sweep and the gallery.
_MINUTES_PER_PROCESS = 0.7
# Forward FLOPs relative to resnet_tiny at output stride 16 (counted with benchmarks.flops on a 128 px classifier:
# resnet_small 1.56x, output stride 8 2.63x; 192 px is (192/128)^2 x within 1%). The README measured output stride
# 8 at about 2x the CPU time, so the estimate is on the high side there.
_ARCH_COST = {"resnet_tiny": 1.0, "resnet_small": 1.56}
_OUTPUT_STRIDE_COST = {16: 1.0, 8: 2.63}
# Split sizes of both datasets (the parts dataset was designed with the demo's); more_images trains on 1,200.
_SPLIT_SIZES = {"pretrain": 1200, "train": 600, "train_large": 1200, "val": 200}
# configs/demo.py's values of the fields the estimate reads.
_DEMO_DEFAULTS = {
    "model.arch": "resnet_tiny", "model.output_stride": "16", "pretrain.epochs": "8", "pretrain.batch_size": "16",
    "pretrain.crop_size": "128", "train_cam.epochs": "15", "train_cam.batch_size": "16", "train_cam.crop_size": "128",
    "train_cam.split": "train", "infer.split": "train",
}


def estimate_minutes(run: Run, dataset: Dataset) -> float:
    """Estimated wall minutes of a run on 2 quiet CPU cores (full-size settings; the smoke runs are far shorter)."""

    def setting(field: str) -> str:
        return run.overrides.get(field, _DEMO_DEFAULTS[field])

    model_cost = _ARCH_COST.get(setting("model.arch"), 1.0) * _OUTPUT_STRIDE_COST.get(
        int(setting("model.output_stride")), 1.0
    )
    builder_kwargs = run.overrides.get("data.builder_kwargs", "")
    demo_num_train = int(m.group(1)) if (m := re.search(r"'num_train': (\d+)", builder_kwargs)) else 600
    if run.loss_option is None:
        steps = int(setting("pretrain.epochs")) * (_SPLIT_SIZES["pretrain"] // int(setting("pretrain.batch_size")))
        crop_cost = (int(setting("pretrain.crop_size")) / 128) ** 2
        return _MINUTES_PER_PROCESS + steps * _MINUTES_PER_CLASSIFICATION_STEP * model_cost * crop_cost
    train_images = demo_num_train if dataset.name == "demo" else _SPLIT_SIZES[setting("train_cam.split")]
    infer_images = demo_num_train if dataset.name == "demo" else _SPLIT_SIZES[setting("infer.split")]
    steps = int(setting("train_cam.epochs")) * (train_images // int(setting("train_cam.batch_size")))
    crop_cost = (int(setting("train_cam.crop_size")) / 128) ** 2
    per_step = _MINUTES_PER_CLASSIFICATION_STEP if run.loss_option == "cl" else _MINUTES_PER_PUZZLE_STEP
    area_cost = (dataset.mean_image_side / DATASETS[0].mean_image_side) ** 2
    return (
        _MINUTES_PER_PROCESS
        + steps * per_step * model_cost * crop_cost
        + infer_images * _MINUTES_PER_INFERRED_IMAGE * model_cost * area_cost
    )


# --------------------------------------------------------------------------------------------------
# Running.
# --------------------------------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    """The subprocesses' environment: CPU only, and without a forced host device count (the test suite's
    ``--xla_force_host_platform_device_count=8`` would shard the runs over 8 virtual devices); other XLA flags
    are kept."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in flag]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def _machine() -> dict[str, str]:
    """What the numbers depend on: XLA compiles for the host processor, so another one rounds differently."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": str(os.cpu_count()), "xla_flags": _environment()["XLA_FLAGS"]}


def _execute(run: Run, label: str) -> dict[str, Any]:
    """Runs one command (output appended to ``<workdir>/study.log``) unless its done marker exists.

    Returns:
      {"status": "done" | "reused" | "failed", "seconds": wall seconds of this call, "log": path}.
    """
    command = run.command()
    log_path = os.path.join(run.workdir, "study.log")
    record_path = os.path.join(run.workdir, "study_command.json")
    if os.path.exists(run.done_marker()):
        if os.path.exists(record_path) and fileio.read_json(record_path)["command"] != shlex.join(command[1:]):
            print(f"  [{label}] WARNING: reused, but it was run with another command (see {record_path}); delete "
                  f"{run.workdir} to rerun it", flush=True)
        return {"status": "reused", "seconds": 0.0, "log": log_path}
    os.makedirs(run.workdir, exist_ok=True)
    fileio.write_json(record_path, {"command": shlex.join(command[1:])})
    print(f"  [{label}] running (log: {log_path})", flush=True)
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.run(command, cwd=REPO, env=_environment(), stdout=log, stderr=subprocess.STDOUT)
    returncode = process.returncode
    seconds = time.monotonic() - start
    if returncode != 0 or not os.path.exists(run.done_marker()):
        with open(log_path) as log:
            tail = log.read()[-2000:]
        print(f"  [{label}] FAILED (exit {returncode}) after {seconds / 60:.1f} min; log tail:\n{tail}", flush=True)
        return {"status": "failed", "seconds": seconds, "log": log_path, "returncode": returncode}
    print(f"  [{label}] done in {seconds / 60:.1f} min", flush=True)
    return {"status": "done", "seconds": seconds, "log": log_path}


# --------------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------------


def _part_recall_numbers(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of an eval summary's ``part_recall`` (body/part recall, when eval_cam reports it), flattened to
    ``key`` or ``key.subkey``; {} when absent."""
    value = summary.get("part_recall")
    numbers: dict[str, float] = {}
    if isinstance(value, Mapping):
        for key, entry in value.items():
            if isinstance(entry, (int, float)) and not isinstance(entry, bool):
                numbers[str(key)] = float(entry)
            elif isinstance(entry, Mapping):
                for subkey, subentry in entry.items():
                    if isinstance(subentry, (int, float)) and not isinstance(subentry, bool):
                        numbers[f"{key}.{subkey}"] = float(subentry)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers["recall"] = float(value)
    return numbers


def _training_summary(path: str) -> dict[str, Any]:
    """What a training stage's summary says about whether it learned: validation mAP and class loss against the
    label prior's, and its warnings ({} when the summary does not exist)."""
    if not os.path.exists(path):
        return {}
    summary = fileio.read_json(path)
    fields = ("validation_map", "validation_class_loss", "validation_label_prior_loss", "warnings")
    return {field: summary[field] for field in fields if field in summary}


def _run_result(run: Run, execution: Mapping[str, Any] | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "loss_option": run.loss_option,
        "seed": run.seed,
        "workdir": run.workdir,
        "command": shlex.join(run.command()),
        "estimated_minutes": None,
    }
    if execution:
        result.update(status=execution["status"], seconds=round(execution["seconds"], 1))
    if os.path.exists(run.done_marker()):
        summary = fileio.read_json(run.done_marker())
        thresholds = sorted(float(t) for t in summary.get("per_threshold_miou", {}))
        at_edge = summary.get("best_threshold_at_sweep_edge")
        if at_edge is None and thresholds:
            at_edge = summary["best_threshold"] in (thresholds[0], thresholds[-1])
        result.update(
            miou=summary["miou"],
            best_threshold=summary["best_threshold"],
            best_threshold_at_sweep_edge=bool(at_edge),
            num_images=summary.get("num_images"),
            per_class_iou=summary.get("per_class_iou"),
            part_recall=summary.get("part_recall"),
        )
    result["train_cam"] = _training_summary(os.path.join(run.workdir, "train_cam", "summary.json"))
    return result


def row_result(
    row: Row, executions: Mapping[str, Mapping[str, Any]], root: str, seeds: Sequence[int],
    options: Sequence[str] = (),
) -> dict:
    """The row's entry of results.json, from what is on disk (and this invocation's executions).

    Args:
      row: the row.
      executions: `_execute`'s results of this invocation, by workdir.
      root: the study folder.
      seeds: the seeds of this invocation.
      options: the runner's other options that the row's reproducing command needs (--data-dir, ...).
    """
    runs = []
    for run in row.runs:
        result = _run_result(run, executions.get(run.workdir))
        result["estimated_minutes"] = round(estimate_minutes(run, row.dataset), 1)
        runs.append(result)
    by_option = {
        option: {r["seed"]: r for r in runs if r["loss_option"] == option and "miou" in r} for option in LOSS_OPTIONS
    }
    paired = sorted(set(by_option["cl"]) & set(by_option["cl_pcl_re"]))
    gains = {seed: by_option["cl_pcl_re"][seed]["miou"] - by_option["cl"][seed]["miou"] for seed in paired}
    pretrain = {
        "workdir": row.pretrain.workdir,
        "command": shlex.join(row.pretrain.command()),
        "done": os.path.exists(row.pretrain.done_marker()),
        "estimated_minutes": round(estimate_minutes(row.pretrain, row.dataset), 1),
    }
    if row.pretrain.workdir in executions:
        pretrain.update(status=executions[row.pretrain.workdir]["status"])
    if pretrain["done"]:
        pretrain.update(_training_summary(os.path.join(row.pretrain.workdir, "pretrain", "summary.json")))
    return {
        "dataset": row.dataset.name,
        "recipe": row.recipe.name,
        "what": row.recipe.what,
        "pretrain": pretrain,
        "runs": runs,
        "miou": {
            option: {str(seed): r["miou"] for seed, r in sorted(by_option[option].items())} for option in LOSS_OPTIONS
        },
        "gain_per_seed": {str(seed): gain for seed, gain in gains.items()},
        "mean_gain": statistics.fmean(gains.values()) if gains else None,
        "complete": all("miou" in r for r in runs),
        "reproduce": shlex.join(
            ["python", "-m", "studies.puzzle_vs_cam", "--root", root, "--only", row.name,
             "--seeds", ",".join(map(str, seeds)), *options]
        ),
    }


def _mean_recall(results: Sequence[Mapping[str, Any]]) -> str:
    numbers = [_part_recall_numbers(r) for r in results if r.get("part_recall") is not None]
    if not numbers:
        return "-"
    keys = sorted(set().union(*numbers))
    return ", ".join(
        f"{key} {statistics.fmean(n[key] for n in numbers if key in n):.1f}" for key in keys
    )


TABLE_HEADER = (
    "| dataset | recipe | `cl` seeds | `cl_pcl_re` seeds | mean gain (per seed) | seed spread cl / pcl "
    "| best thresholds cl / pcl | body/part recall cl / pcl | pretrain val mAP | images | reproduce |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(result: Mapping[str, Any]) -> str:
    """One Markdown table line of a row's result; thresholds at an end of the sweep are marked "(edge)"."""
    runs = {option: [r for r in result["runs"] if r["loss_option"] == option] for option in LOSS_OPTIONS}

    def scores(option: str) -> str:
        return " / ".join(f"{r['miou']:.2f}" if "miou" in r else "-" for r in runs[option])

    def spread(option: str) -> str:
        values = [r["miou"] for r in runs[option] if "miou" in r]
        return f"{max(values) - min(values):.2f}" if len(values) > 1 else "-"

    def thresholds(option: str) -> str:
        return ",".join(
            report.threshold_text(r["best_threshold"]) + (" (edge)" if r.get("best_threshold_at_sweep_edge") else "")
            for r in runs[option] if "miou" in r
        ) or "-"

    gain = "-"
    if result["mean_gain"] is not None:
        per_seed = "/".join(f"{value:+.2f}" for value in result["gain_per_seed"].values())
        gain = f"**{result['mean_gain']:+.2f}** ({per_seed})"
    images = sorted({r["num_images"] for r in result["runs"] if r.get("num_images") is not None})
    cells = [
        result["dataset"], result["recipe"], scores("cl"), scores("cl_pcl_re"), gain,
        f"{spread('cl')} / {spread('cl_pcl_re')}", f"{thresholds('cl')} / {thresholds('cl_pcl_re')}",
        f"{_mean_recall(runs['cl'])} / {_mean_recall(runs['cl_pcl_re'])}",
        f"{result['pretrain']['validation_map']:.1f}" if "validation_map" in result["pretrain"] else "-",
        ",".join(map(str, images)) or "-", f"`{result['reproduce']}`",
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(root: str, results: Sequence[Mapping[str, Any]], header: Mapping[str, Any]) -> None:
    """Writes ``results.json`` and ``results.md`` (the table, then every row's exact commands)."""
    fileio.write_json(os.path.join(root, "results.json"), {**header, "rows": list(results)})
    lines = [
        "# Puzzle-CAM (`cl_pcl_re`) vs plain CAM (`cl`)",
        "",
        f"CAM mIoU (%) on each dataset's training split, background threshold swept {THRESHOLD_RANGE}; one row "
        "changes one thing from configs/demo.py; all runs of a row start from the same pretrain export. "
        f"Machine: {header['machine']['cpu']} ({header['machine']['cores']} cores). Seeds: {header['seeds']}.",
        "",
        TABLE_HEADER,
        *(format_row(result) for result in results),
        "",
        "## Commands",
    ]
    for result in results:
        lines += [
            "",
            f"### {result['dataset']}/{result['recipe']}: {result['what']}",
            "",
            "```bash",
            f"# pretrain (shared by every row with the same pretraining settings): {result['pretrain']['workdir']}",
            result["pretrain"]["command"],
            *(f"# {r['loss_option']} seed {r['seed']}\n{r['command']}" for r in result["runs"]),
            "```",
        ]
    if header.get("parts_dataset"):
        lines += ["", f"The parts dataset: `{header['parts_dataset']['command']}`."]
    fileio.write_text(os.path.join(root, "results.md"), "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------


def _parts_command(folder: str, smoke: bool) -> str:
    sizes = SMOKE_PARTS_SIZES if smoke else {}
    options = [f"--{name.replace('_', '-')}={value}" for name, value in sizes.items()]
    return shlex.join(["python", "-m", "studies.parts_dataset", "--out", folder, "--seed", "0", *options])


def print_plan(rows: Sequence[Row], parts_folder: str, smoke: bool, *, commands: bool) -> None:
    """Prints the pretrains and runs still to do, their estimated CPU time, and (with `commands`) every command."""
    pretrains: dict[str, list[str]] = {}
    for row in rows:
        pretrains.setdefault(row.pretrain.workdir, []).append(row.name)
    first_row = {workdir: next(row for row in rows if row.pretrain.workdir == workdir) for workdir in pretrains}
    runs = [(row, run) for row in rows for run in row.runs]
    todo_pretrains = [w for w in pretrains if not os.path.exists(first_row[w].pretrain.done_marker())]
    todo_runs = [(row, run) for row, run in runs if not os.path.exists(run.done_marker())]
    minutes = sum(estimate_minutes(first_row[w].pretrain, first_row[w].dataset) for w in todo_pretrains)
    minutes += sum(estimate_minutes(run, row.dataset) for row, run in todo_runs)
    for row in rows:
        row_minutes = sum(estimate_minutes(run, row.dataset) for run in row.runs)
        print(f"  {row.name:26s} {len(row.runs)} runs {row_minutes:5.1f} min, pretrain "
              f"{estimate_minutes(row.pretrain, row.dataset):5.1f} min ({os.path.basename(row.pretrain.workdir)})")
    if commands:
        if any(row.dataset.name == "parts" for row in rows):
            print(f"# parts dataset (written on first use unless it exists):\n{_parts_command(parts_folder, smoke)}\n")
        for workdir, names in pretrains.items():
            print(f"# pretrain shared by {', '.join(names)}:\n{shlex.join(first_row[workdir].pretrain.command())}\n")
        for row, run in runs:
            print(f"# {row.name} {run.loss_option} seed {run.seed}:\n{shlex.join(run.command())}\n")
    print(
        f"{len(rows)} rows: {len(pretrains)} distinct pretrains ({len(todo_pretrains)} to run) and {len(runs)} runs "
        f"({len(todo_runs)} to run); estimated {minutes / 60:.1f} h of wall time on 2 quiet CPU cores for what is "
        "left (one run at a time; full-size settings)",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.puzzle_vs_cam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="study folder: runs, pretrains, results.json, results.md")
    parser.add_argument(
        "--only", default="",
        help="comma-separated fnmatch patterns of dataset/recipe rows (e.g. 'demo/*,parts/base'); a pattern "
        "without '/' matches a recipe or a dataset name",
    )
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and the estimate, run nothing")
    parser.add_argument("--data-dir", default="", help="tfds data_dir of every run (default: the config's)")
    parser.add_argument("--parts-folder", default="", help="the parts dataset folder (default ROOT/data/parts)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    patterns = [pattern.strip() for pattern in args.only.split(",") if pattern.strip()]
    parts_folder = os.path.abspath(
        args.parts_folder or os.path.join(root, "data", "parts_smoke" if args.smoke else "parts")
    )
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else ""
    rows = build_rows(
        root, seeds, parts_folder=parts_folder, data_dir=data_dir, smoke=args.smoke, patterns=patterns
    )
    if not rows:
        parser.error(f"--only {args.only!r} matches no row; rows: "
                     f"{[f'{d.name}/{r.name}' for d in DATASETS for r in RECIPES]}")
    print_plan(rows, parts_folder, args.smoke, commands=args.dry_run)
    if args.dry_run:
        return 0

    header: dict[str, Any] = {"machine": _machine(), "seeds": seeds, "threshold_range": THRESHOLD_RANGE}
    if any(row.dataset.name == "parts" for row in rows):
        parts_dataset.write_folder(parts_folder, **(SMOKE_PARTS_SIZES if args.smoke else {}))
    if os.path.exists(os.path.join(parts_folder, "generation.json")):
        header["parts_dataset"] = {
            "folder": parts_folder, "command": _parts_command(parts_folder, args.smoke),
            **fileio.read_json(os.path.join(parts_folder, "generation.json")),
        }
    # The options a row's reproducing command needs besides --root, --only and --seeds.
    options = [*(["--data-dir", data_dir] if data_dir else []),
               *(["--parts-folder", parts_folder] if args.parts_folder else []), *(["--smoke"] if args.smoke else [])]
    executions: dict[str, dict[str, Any]] = {}
    printed_header = False
    for row in rows:
        print(f"[{row.name}] {row.recipe.what}", flush=True)
        if row.pretrain.workdir not in executions:
            executions[row.pretrain.workdir] = _execute(row.pretrain, f"{row.name} pretrain")
        pretrain_failed = executions[row.pretrain.workdir]["status"] == "failed"
        for run in () if pretrain_failed else row.runs:
            run_to_execute = run
            if "eval.compare_workdir" in run.overrides and not os.path.isdir(
                os.path.join(run.overrides["eval.compare_workdir"], "infer_cam", "cams")
            ):
                # Without the plain-CAM run's CAMs (it failed) the gallery has nothing to compare with.
                overrides = {k: v for k, v in run.overrides.items() if k != "eval.compare_workdir"}
                run_to_execute = dataclasses.replace(run, overrides=overrides)
            executions[run.workdir] = _execute(run_to_execute, f"{row.name} {run.loss_option} seed {run.seed}")
        # Every row of the whole grid (this invocation's seeds) with results on disk, in grid order.
        all_rows = build_rows(root, seeds, parts_folder=parts_folder, data_dir=data_dir, smoke=args.smoke)
        results = [
            row_result(other, executions, root, seeds, options)
            for other in all_rows
            if other.name == row.name or any(os.path.exists(run.done_marker()) for run in other.runs)
        ]
        write_report(root, results, header)
        if not printed_header:
            print(TABLE_HEADER, flush=True)
            printed_header = True
        print(format_row(next(result for result in results if f"{result['dataset']}/{result['recipe']}" == row.name)),
              flush=True)
    failures = sum(execution["status"] == "failed" for execution in executions.values())
    print(f"results: {os.path.join(root, 'results.md')} and results.json; {failures} failed command(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
