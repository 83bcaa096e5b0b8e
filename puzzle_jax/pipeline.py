"""The stage registry and the workdir layout: the one place that knows where each artefact lives.

A run is a pipeline of stages over one workdir. Each stage module exposes ``run(config, workdir) -> dict``; it
reads earlier stages' artefacts through ``Workdir``, writes its own atomically, skips what is already complete, and
returns a summary that is written to ``<workdir>/<stage>/summary.json``. Stages never import each other.

Before any stage runs, ``run_stages`` validates the config (``config_checks``) and compares it with what each stage
recorded when it last started (``<stage>/stage_config.json``: the values of the fields in ``STAGE_CONFIG``, its own
and those of the stages whose outputs it reads): a stage resumed or skipped with other values would mix or keep
outputs of another config, so the run refuses and names the differing fields, unless the stage is in
``config.force_stages``, which deletes its outputs and runs it afresh.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from puzzle_jax import config_checks, fileio, sharding, training

# Stage name -> module. Order here is the pipeline order; config.stages picks a subsequence.
STAGES: dict[str, str] = {
    "pretrain": "puzzle_jax.stages.pretrain",
    "train_cam": "puzzle_jax.stages.train_cam",
    "infer_cam": "puzzle_jax.stages.infer_cam",
    "eval_cam": "puzzle_jax.stages.eval_cam",
    "aff_labels": "puzzle_jax.stages.aff_labels",
    "train_aff": "puzzle_jax.stages.train_aff",
    "infer_rw": "puzzle_jax.stages.infer_rw",
    "pseudo_labels": "puzzle_jax.stages.pseudo_labels",
    "train_seg": "puzzle_jax.stages.train_seg",
    "infer_seg": "puzzle_jax.stages.infer_seg",
    "eval_seg": "puzzle_jax.stages.eval_seg",
}


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """What a stage's kept outputs depend on.

    Attributes:
      fields: config fields it reads whose values change its outputs, as dotted names or ``fnmatch`` patterns; a
        name also stands for every field under it (``"train_cam"``: the whole section). ``NEUTRAL_FIELDS`` are left
        out. Fields only scored or drawn on every run (the ``eval`` section, galleries) need not be listed.
      inputs: the stages whose outputs it reads; their fields count as its own. A training section's ``init_from``
        that names a stage adds that stage.
    """

    fields: tuple[str, ...]
    inputs: tuple[str, ...] = ()


# The dataset (not where its prepared files are kept, nor how many processes read it).
_DATA = ("data.dataset", "data.root", "data.builder_kwargs")

# Stage -> what its outputs depend on (every stage of STAGES has an entry; tests check it).
STAGE_CONFIG: dict[str, StageConfig] = {
    "pretrain": StageConfig(fields=(*_DATA, "model", "pretrain", "seed")),
    "train_cam": StageConfig(fields=(*_DATA, "model", "cam", "train_cam", "seed")),
    "infer_cam": StageConfig(
        fields=(*_DATA, "infer.split", "infer.scales", "infer.flip", "infer.pad_multiple"), inputs=("train_cam",)
    ),
    "eval_cam": StageConfig(fields=(), inputs=("infer_cam",)),
    "aff_labels": StageConfig(fields=(*_DATA, "infer.split", "refine.aff_*"), inputs=("infer_cam",)),
    "train_aff": StageConfig(fields=(*_DATA, "model", "train_aff", "seed"), inputs=("aff_labels",)),
    "infer_rw": StageConfig(
        fields=(
            *_DATA, "infer.split", "refine.edge_canvas", "refine.rw_radius", "refine.rw_beta", "refine.rw_exp_times"
        ),
        inputs=("train_aff", "infer_cam"),
    ),
    "pseudo_labels": StageConfig(
        fields=(*_DATA, "infer.split", "refine.rw_threshold", "refine.pseudo_crf_iterations"), inputs=("infer_rw",)
    ),
    # The pseudo labels' fields count even when seg.labels names another source: harmless, they rarely change.
    "train_seg": StageConfig(
        fields=(*_DATA, "model", "train_seg", "seed", "seg.labels", "seg.use_gn", "seg.*_features"),
        inputs=("pseudo_labels",),
    ),
    "infer_seg": StageConfig(
        fields=(*_DATA, "seg.split", "seg.scales", "seg.flip", "seg.crf_iterations", "infer.pad_multiple"),
        inputs=("train_seg",),
    ),
    "eval_seg": StageConfig(fields=(), inputs=("infer_seg",)),
}

# Fields that never change a stage's results, so a rerun or resume may change them: how often a training stage logs
# and saves and how many checkpoints it keeps, the split that only scores the trained model, and activation
# recomputation (which recomputes the same values). Worker and thread counts, device counts and folders of caches
# are in no StageConfig to begin with.
NEUTRAL_FIELDS = (
    "*.log_every_steps",
    "*.checkpoint_every_steps",
    "*.max_to_keep",
    "*.validation_split",
    "*.validate_every_epochs",
    # How the same function is computed (the program), not what it computes.
    "model.remat",
    "model.bn_statistics",
    "model.grouped_conv",
)


class Workdir:
    """Paths of every artefact of a run, relative to its root folder: the only code that composes them.

    ``<root>/config.txt`` (the latest run's config; ``config_history/`` keeps every run's) and one folder per
    stage, holding its ``summary.json``, its ``stage_config.json`` and what the stage writes:

    * a training stage (``pretrain``, ``train_cam``, ``train_aff``, ``train_seg``): ``checkpoints/``,
      ``metrics.jsonl``, ``tensorboard/`` and the exported ``model/`` (``training``);
    * ``infer_cam/cams/<id>.npz``: the CAM files (``cam_files``), scored by ``eval_cam``, which draws
      ``eval_cam/gallery/``;
    * the refinement and segmentation stages' folders: ``aff_labels/labels/``, ``infer_rw/rw/``,
      ``pseudo_labels/labels/`` (label PNGs or CAM-format files, one per image) and ``infer_seg/<split>/`` (the
      segmenter's label PNGs; for VOC's test split also ``infer_seg/voc_test_submission/``, the evaluation server's
      layout); ``pseudo_labels`` draws the refinement chain's ``pseudo_labels/gallery/``, ``eval_seg``
      ``eval_seg/gallery/``.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))

    def config_file(self) -> str:
        """The resolved config of the latest run, as text."""
        return os.path.join(self.root, "config.txt")

    def config_history_dir(self) -> str:
        """One ``<run number>-<UTC start time>.txt`` per run started here: the resolved config of each."""
        return os.path.join(self.root, "config_history")

    def stage_config_path(self, stage: str) -> str:
        """The values of the fields a stage's outputs depend on (``STAGE_CONFIG``), recorded when it starts."""
        return os.path.join(self.stage_dir(stage), "stage_config.json")

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.root, stage)

    def summary_path(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "summary.json")

    def training(self, stage: str) -> training.TrainingPaths:
        """Where a training stage keeps its checkpoints, metrics and exported model."""
        stage_dir = self.stage_dir(stage)
        return training.TrainingPaths(
            checkpoints=os.path.join(stage_dir, "checkpoints"),
            metrics=os.path.join(stage_dir, "metrics.jsonl"),
            tensorboard=os.path.join(stage_dir, "tensorboard"),
            export=self.exported_model(stage),
        )

    def exported_model(self, stage: str) -> str:
        """The inference-only model a training stage exports when it finishes."""
        return os.path.join(self.stage_dir(stage), "model")

    def resolve_init_from(self, value: str) -> str:
        """An ``init_from`` setting as a folder: a stage's name (``"pretrain"``) stands for that stage's export in
        this workdir; anything else is a path (``""``: none)."""
        return self.exported_model(value) if value in STAGES else value

    def read_summary(self, stage: str) -> dict | None:
        """The summary a stage wrote when it finished, or None if it has not."""
        path = self.summary_path(stage)
        return fileio.read_json(path) if os.path.exists(path) else None

    def gallery_dir(self, stage: str) -> str:
        """The HTML gallery (``index.html`` and its pictures) an evaluation stage draws."""
        return os.path.join(self.stage_dir(stage), "gallery")

    def cam_dir(self) -> str:
        """One ``<image id>.npz`` per image (``keys``, ``cam``, ``hr_cam``), written by ``infer_cam``."""
        return os.path.join(self.stage_dir("infer_cam"), "cams")

    def affinity_label_dir(self) -> str:
        """One ``<image id>.png`` per image: the affinity labels ``aff_labels`` writes and ``train_aff`` reads."""
        return os.path.join(self.stage_dir("aff_labels"), "labels")

    def random_walk_dir(self) -> str:
        """One ``<image id>.npz`` per image (``keys``, ``rw``), written by ``infer_rw``."""
        return os.path.join(self.stage_dir("infer_rw"), "rw")

    def pseudo_label_dir(self) -> str:
        """One ``<image id>.png`` per image: the pseudo labels ``pseudo_labels`` writes and ``train_seg`` reads."""
        return os.path.join(self.stage_dir("pseudo_labels"), "labels")

    def segmentation_dir(self, split: str) -> str:
        """One ``<image id>.png`` per image of ``split``: the segmenter's predictions, written by ``infer_seg``."""
        return os.path.join(self.stage_dir("infer_seg"), split)

    def voc_test_submission_dir(self) -> str:
        """VOC 2012 test predictions in the evaluation server's layout (``results/VOC2012/Segmentation/
        comp6_test_cls/<id>.png``; comp6: trained with data beyond VOC's, here ImageNet weights), and its archive."""
        return os.path.join(self.stage_dir("infer_seg"), "voc_test_submission")


def scored_split(config: ml_collections.ConfigDict) -> str:
    """The split whose images the evaluating stages score: ``config.eval.split``, or ``config.infer.split`` when it
    is empty (the stages compute on ``infer.split``; the scored images must be among its images)."""
    return config.eval.split or config.infer.split


def _stage_names(stages: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(stages, str):
        stages = [stages]
    # "--config.stages=a,b" on the command line arrives as the one-element tuple ("a,b",): split it.
    return [name.strip() for entry in stages for name in entry.split(",") if name.strip()]


def check_stages(stages: list[str] | tuple[str, ...], field: str = "config.stages") -> list[str]:
    """Validates ``config.stages`` (or another list of stage names, the config field ``field``) and returns it as a
    list."""
    stages = _stage_names(stages)
    unknown = [name for name in stages if name not in STAGES]
    if unknown or not stages:
        raise config_checks.ConfigError(
            f"{field}={list(stages)!r}: unknown or empty; allowed stage names are {list(STAGES)}."
        )
    return list(stages)


def stage_config(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
    """The values (JSON types) of the fields ``stage``'s outputs depend on: its ``STAGE_CONFIG`` fields and those of
    its inputs, recursively, without ``NEUTRAL_FIELDS``. A stage without an entry depends on nothing."""
    flat = _flatten(json.loads(json.dumps(config.to_dict(), default=str)))
    patterns: set[str] = set()
    pending, seen = [stage], set()
    while pending:
        name = pending.pop()
        if name in seen or name not in STAGE_CONFIG:
            continue
        seen.add(name)
        patterns.update(STAGE_CONFIG[name].fields)
        pending.extend(STAGE_CONFIG[name].inputs)
        init_from = flat.get(f"{name}.init_from")
        if init_from in STAGES:
            pending.append(init_from)
    return {
        field: value
        for field, value in sorted(flat.items())
        if any(_matches(field, pattern) for pattern in patterns)
        and not any(_matches(field, pattern) for pattern in NEUTRAL_FIELDS)
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(field: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(field, pattern) or field.startswith(pattern + ".")


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<field>: <recorded> -> <current>"`` for each field both hold with different values (a field only one of
    them has came or went with a change of the code, not of the run's config)."""
    return [
        f"{field}: {recorded[field]!r} -> {current[field]!r}"
        for field in sorted(set(recorded) & set(current))
        if recorded[field] != current[field]
    ]


def _force_stages(config: ml_collections.ConfigDict, stages: list[str]) -> list[str]:
    forced = _stage_names(config.get("force_stages", ()))
    if forced:
        check_stages(forced, "config.force_stages")
    outside = [name for name in forced if name not in stages]
    if outside:
        raise config_checks.ConfigError(
            f"config.force_stages={forced!r}: {outside} are not in config.stages={stages!r}; a stage is started "
            "afresh only when it runs."
        )
    return forced


def _has_outputs(layout: Workdir, stage: str) -> bool:
    """Whether a stage's folder holds anything besides its record (a stage that failed before writing has none)."""
    folder = layout.stage_dir(stage)
    return os.path.isdir(folder) and any(name != "stage_config.json" for name in os.listdir(folder))


def _recorded_stage_config(layout: Workdir, stage: str) -> dict[str, Any] | None:
    path = layout.stage_config_path(stage)
    return fileio.read_json(path) if os.path.exists(path) else None


def check_stage_configs(
    config: ml_collections.ConfigDict, layout: Workdir, stages: list[str], forced: list[str]
) -> dict[str, list[str]]:
    """Compares each stage's recorded config with ``config``; raises for the stages with outputs that would be kept
    or resumed with other values and are not forced.

    Returns:
      stage -> its changed fields (``changed_fields``), for every stage whose outputs were made with other values.

    Raises:
      config_checks.ConfigError: naming each such stage that is not in ``forced``, its changed fields, and the
        ``--config.force_stages`` value (or a new workdir) that starts them afresh.
    """
    changes = {}
    for stage in stages:
        recorded = _recorded_stage_config(layout, stage)
        if recorded is None or not _has_outputs(layout, stage):
            continue
        differences = changed_fields(recorded, stage_config(config, stage))
        if differences:
            changes[stage] = differences
    refused = [stage for stage in changes if stage not in forced]
    if refused:
        lines = [f"  {stage} ({layout.stage_dir(stage)}): " + "; ".join(changes[stage]) for stage in refused]
        restart = ",".join(dict.fromkeys([*forced, *refused]))
        raise config_checks.ConfigError(
            "These stages have outputs made with another config (recorded -> now), which a rerun would keep or "
            "resume:\n" + "\n".join(lines) + f"\nTo delete their outputs and run them afresh, add "
            f"--config.force_stages={restart}; to keep them, restore those values or use a new --workdir."
        )
    return changes


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs ``config.stages`` in order and writes each stage's summary; returns the summaries.

    Raises:
      config_checks.ConfigError: before any stage runs, for an invalid config (``config_checks``) or a stage whose
        outputs were made with another config (``check_stage_configs``).
    """
    stages = check_stages(config.stages)
    config_checks.check_config(config)
    sharding.configure_barriers(60 * config.get("mesh", {}).get("barrier_timeout_minutes", 60.0))
    forced = _force_stages(config, stages)
    layout = Workdir(workdir)
    changes = check_stage_configs(config, layout, stages, forced)
    os.makedirs(layout.root, exist_ok=True)
    if jax.process_index() == 0:
        fileio.write_text(layout.config_file(), str(config))
        fileio.write_text(_new_history_path(layout), str(config))
    summaries = {}
    for name in stages:
        if jax.process_index() == 0:
            if name in forced and (name in changes or _recorded_stage_config(layout, name) is None):
                _announce(f"[{name}] force_stages: deleting {layout.stage_dir(name)}")
                shutil.rmtree(layout.stage_dir(name), ignore_errors=True)
            fileio.write_json(layout.stage_config_path(name), stage_config(config, name))
        # No process starts a stage before its folder is deleted and its record written.
        sharding.wait_for_all_processes(f"puzzle_jax stage {name} recorded")
        _announce(f"[{name}] starting (workdir {layout.root})")
        started = time.time()
        module = importlib.import_module(STAGES[name])
        summary = dict(module.run(config, layout))
        summary["seconds"] = round(time.time() - started, 1)
        if summary.get("skipped") and os.path.exists(layout.summary_path(name)):
            # The stage's output was complete already: keep the summary of the run that produced it.
            summary = {**fileio.read_json(layout.summary_path(name)), "skipped": True}
            _announce(f"[{name}] already complete: skipped (kept {layout.summary_path(name)})")
        else:
            if jax.process_index() == 0:
                fileio.write_json(layout.summary_path(name), summary)
            _announce(f"[{name}] done in {summary['seconds']:.1f} s -> {layout.summary_path(name)}")
        summaries[name] = summary
        # In a multi-host run each process writes its share of a stage's files (infer_cam: its images' CAMs); the
        # next stage may read all of them, so no process starts it before every process has finished this one.
        sharding.wait_for_all_processes(f"puzzle_jax stage {name} done")
    return summaries


def _new_history_path(layout: Workdir) -> str:
    """``config_history/<run number>-<UTC start time>.txt``: numbered, so the names sort in the order of the runs."""
    folder = layout.config_history_dir()
    number = len(os.listdir(folder)) + 1 if os.path.isdir(folder) else 1
    return os.path.join(folder, f"{number:04d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.txt")


def _announce(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
