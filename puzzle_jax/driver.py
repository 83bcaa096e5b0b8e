"""The training driver of every training stage: ``train_and_export(task, config, stage, paths, ...)``.

A training stage is a task (``puzzle_jax.tasks``: a model family's model, objective, input transform and records)
and a config section of one shape (``config.<stage>``: split, batch size, epochs, optimizer settings, crop and
rescale range, log and checkpoint intervals). The driver does the rest, the same way for every family: skip when
the export exists; load the training (and validation) split; build the mesh and check the batch size; steps from
the epochs; build the model and initialise parts of it from an export; the optimizer; the remat decision on the
task's own batch; the grain loader with the task's transform; ``training.fit``; the export, with the model config
recorded; the task's assessment of the trained model (did it learn?); the summary.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from puzzle_jax import checkpointing, config_checks, models, optim, sharding, training
from puzzle_jax.data import input_pipeline
from puzzle_jax.tasks import base

# model.remat="auto" recomputes activations when the step without it would take more than this share of a device's
# memory (the rest is left to the allocator's fragmentation and the input batches in flight).
AUTO_REMAT_MEMORY_FRACTION = 0.9


def train_and_export(
    task: base.Task,
    config: ml_collections.ConfigDict,
    stage: str,
    paths: training.TrainingPaths,
    *,
    init_from: str,
    seed: int,
) -> dict[str, Any]:
    """Trains the task's model with the settings of ``config.<stage>`` and exports it; skips a finished stage.

    Args:
      task: the model family's task.
      config: the run's config; the driver reads ``config.<stage>``, ``config.data`` (dataset, worker count) and
        ``config.mesh``.
      stage: the stage's name, which is also the name of its config section.
      paths: where the checkpoints, metrics and the export go (``pipeline.Workdir.training``).
      init_from: an exported model whose ``task.init_parts`` initialise training ("" = random initialisation).
      seed: initialisation and data-order seed.

    Returns:
      The stage summary: steps, final metrics, export path, images, epochs, batch size, the remat decision, and
      the task's assessment of the trained model (``Task.assess``: validation metrics, ``warnings``).
    """
    if checkpointing.is_exported_model(paths.export):
        logging.info("%s already exported: skipping training.", paths.export)
        return {"exported_model": paths.export, "skipped": True}
    section = config[stage]
    source, info = task.load_split(config.data, section.split, f"{stage}.split")
    validation = None
    if section.validation_split:
        validation, _ = task.load_validation_split(config.data, section.validation_split, f"{stage}.validation_split")
    mesh = sharding.create_mesh(config.mesh.num_devices)
    sharding.check_batch_size(section.batch_size, mesh, f"{stage}.batch_size")
    if len(source) < section.batch_size:
        raise ValueError(
            f"Split '{section.split}' has {len(source)} images: fewer than one batch of {section.batch_size}; "
            f"lower {stage}.batch_size."
        )
    total_steps = section.epochs * input_pipeline.steps_per_epoch(len(source), section.batch_size)
    model_config = task.model_config(info)
    model = models.create_model(model_config, rngs=nnx.Rngs(seed))
    if init_from:
        checkpointing.initialise_from_export(
            model, os.path.expanduser(init_from), task.init_parts(section), field=f"{stage}.init_from"
        )
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = task.create_optimizer(params, section, total_steps)
    compute_loss = task.create_objective(section, total_steps)
    transform = task.create_transform(section)
    remat_facts = {}
    if task.remat_auto:
        batch = input_pipeline.batch_spec(source, transform, section.batch_size)
        remat, remat_facts = choose_remat(model, optimizer, compute_loss, mesh, batch)
        models.set_remat(model, remat)
        model_config["remat"] = remat
        logging.info("model.remat=auto: remat %s (%s)", "on" if remat else "off", remat_facts)
    loader = input_pipeline.create_train_loader(
        source,
        transform=transform,
        global_batch_size=section.batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    try:
        graphdef, state, summary = _fit(
            section,
            stage,
            total_steps,
            model,
            optimizer,
            compute_loss,
            loader,
            mesh,
            paths,
            validate=None if validation is None else lambda model: task.validation_scores(model, validation),
            reshuffle_on_process_change=config.data.get("reshuffle_on_process_change", False),
        )
    except training.ResumeMismatchError as error:
        raise config_checks.ConfigError(f"[{stage}] {error}") from error
    except FloatingPointError as error:
        raise FloatingPointError(
            f"[{stage}] {error} Lower {stage}.learning_rate and train the stage afresh with "
            f"--config.force_stages={stage} (a rerun with an unchanged config resumes with the same data order and "
            "is likely to meet the same NaN), or check the input data."
        ) from error
    checkpointing.export_model(paths.export, state.params, state.batch_stats, model_config)
    trained = training.merge_model(graphdef, *jax.device_get((state.params, state.batch_stats)))
    trained.eval()
    assessment = task.assess(trained, summary, source, validation)
    _report(stage, section, assessment)
    summary.update(
        **assessment,
        exported_model=paths.export,
        images=len(source),
        epochs=section.epochs,
        batch_size=section.batch_size,
        remat=model_config["remat"],
        **({"remat_auto": remat_facts} if remat_facts else {}),
    )
    return summary


def _fit(section, stage, total_steps, model, optimizer, compute_loss, loader, mesh, paths, *, validate=None, **options):
    """``training.fit`` with the settings of the training section ``section``; ``validate(model)`` (None: none)
    scores the model in evaluation mode every ``section.validate_every_epochs`` epochs."""
    every = section.get("validate_every_epochs", 0) if validate is not None else 0

    def validate_state(graphdef, state):
        model = training.merge_model(graphdef, *jax.device_get((state.params, state.batch_stats)))
        model.eval()
        return validate(model)

    return training.fit(
        model=model,
        optimizer=optimizer,
        compute_loss=compute_loss,
        loader=loader,
        total_steps=total_steps,
        mesh=mesh,
        paths=paths,
        checkpoint_every_steps=section.checkpoint_every_steps,
        log_every_steps=section.log_every_steps,
        description=stage,
        scalar_schedules={
            "learning_rate": lambda step: optim.learning_rate_at(
                step, learning_rate=section.learning_rate, total_steps=total_steps, poly_power=section.poly_power
            )
        },
        max_to_keep=section.max_to_keep,
        validate=validate_state if every > 0 else None,
        validate_every_steps=every * total_steps // section.epochs if every > 0 else 0,
        **options,
    )


def _report(stage: str, section: Any, assessment: dict[str, Any]) -> None:
    """Prints what ``task.assess`` found (process 0); warnings also go to the log."""
    if jax.process_index() != 0:
        return
    if "validation_map" in assessment:
        print(
            f"[{stage}] validation ({section.validation_split}, {assessment['validation_images']} images): mAP "
            f"{assessment['validation_map']:.1f}%, class loss {assessment['validation_class_loss']:.3f} (label prior "
            f"{assessment['validation_label_prior_loss']:.3f})",
            flush=True,
        )
    if "validation_miou" in assessment:
        print(
            f"[{stage}] validation ({section.validation_split}, {assessment['validation_images']} images, one scale, "
            f"no CRF; logged only): mIoU {assessment['validation_miou']:.2f}%",
            flush=True,
        )
    for warning in assessment.get("warnings", []):
        logging.warning("%s: %s", stage, warning)
        print(f"[{stage}] warning: {warning}", flush=True)


def choose_remat(
    model: nnx.Module,
    optimizer,
    compute_loss: training.LossFunction,
    mesh: jax.sharding.Mesh,
    batch: dict[str, tuple[tuple[int, ...], Any]],
) -> tuple[bool, dict[str, Any]]:
    """Whether the training step needs activation recomputation to fit a device (``model.remat="auto"``).

    Compiles the step without remat for the loader's global batch (``batch``: name -> (shape, dtype)) and compares
    XLA's static estimate of its peak memory (arguments + outputs + temporaries - donated buffers; on the H100 it
    equalled the measured peak, BENCHMARKS.md) with ``AUTO_REMAT_MEMORY_FRACTION`` of the device's memory. Without
    a known limit (CPU) the answer is no, and nothing is compiled. The compiled step lands in the compilation cache,
    so a run that keeps remat off does not compile it again.

    Returns:
      ``(remat, facts)``: the decision (process 0's, on every process) and what it was based on.
    """
    limit = sharding.device_memory_limit()
    if limit is None:
        return False, {"reason": "the backend reports no memory limit"}
    # Shapes only: a second copy of the state on the device, while checking whether it fits, could itself not fit.
    graphdef, state = training.abstract_train_state(model, optimizer, mesh)
    step = training.make_train_step(graphdef, optimizer, compute_loss, mesh)
    placement = sharding.data_sharded(mesh)
    abstract_batch = {
        name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=placement)
        for name, (shape, dtype) in batch.items()
    }
    needed = training.step_memory_bytes(step.lower(state, abstract_batch).compile())
    if needed is None:
        return False, {"reason": "the backend gives no memory analysis"}
    remat = sharding.same_on_all_processes(needed > AUTO_REMAT_MEMORY_FRACTION * limit)
    return remat, {"step_bytes_without_remat": int(needed), "device_bytes": int(limit)}
