"""The stage registry and the workdir layout: the one place that knows where each artefact lives.

A run is a pipeline of stages over one workdir. Each stage module exposes ``run(config, workdir) -> dict``; it
reads earlier stages' artefacts through ``Workdir``, writes its own atomically, skips what is already complete, and
returns a summary that is written to ``<workdir>/<stage>/summary.json``. Stages never import each other.
"""

from __future__ import annotations

import importlib
import os
import time

import jax
import ml_collections

from puzzle_jax import fileio, sharding, training

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


class Workdir:
    """Paths of every artefact of a run, relative to its root folder: the only code that composes them.

    ``<root>/config.txt`` and one folder per stage, holding its ``summary.json`` and what the stage writes:

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
        """The resolved config of the run, as text."""
        return os.path.join(self.root, "config.txt")

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


def check_stages(stages: list[str] | tuple[str, ...]) -> list[str]:
    """Validates ``config.stages`` and returns it as a list."""
    if isinstance(stages, str):
        stages = [stages]
    # "--config.stages=a,b" on the command line arrives as the one-element tuple ("a,b",): split it.
    stages = [name.strip() for entry in stages for name in entry.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGES]
    if unknown or not stages:
        raise ValueError(f"config.stages={list(stages)!r}: unknown or empty; allowed stage names are {list(STAGES)}.")
    return list(stages)


def run_stages(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Runs ``config.stages`` in order and writes each stage's summary; returns the summaries."""
    stages = check_stages(config.stages)
    layout = Workdir(workdir)
    os.makedirs(layout.root, exist_ok=True)
    if jax.process_index() == 0:
        fileio.write_text(layout.config_file(), str(config))
    summaries = {}
    for name in stages:
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


def _announce(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
