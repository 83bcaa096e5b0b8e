"""Training a CAM classifier: the objectives, initialisation from an exported model, and the stage driver.

Shared by the ``pretrain`` stage (classification loss only, the demo's stand-in for ImageNet weights) and the
``train_cam`` stage (Puzzle-CAM, spec §3): both build a classifier from ``config.model``, initialise it, train it
with the generic loop of ``training.py`` and export an inference-only model.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax import checkpointing, losses, models, optim, puzzle, sharding, training
from puzzle_jax.data import transforms

if TYPE_CHECKING:  # Type hints only: the objectives also run where ml_collections is not installed.
    import ml_collections

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.remat="auto" recomputes activations when the step without it would take more than this share of a device's
# memory (the rest is left to the allocator's fragmentation and the input batches in flight).
AUTO_REMAT_MEMORY_FRACTION = 0.9


def model_config_from(config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """The JSON-serialisable keyword arguments of ``models.create_classifier`` (stored with exports)."""
    if config.model.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={config.model.dtype!r}; allowed values are {list(_DTYPES)}.")
    if not (isinstance(config.model.remat, bool) or config.model.remat == "auto"):
        raise ValueError(f"model.remat={config.model.remat!r}; allowed values are [True, False, 'auto'].")
    return {
        "arch": config.model.arch,
        "num_classes": int(num_classes),
        "output_stride": int(config.model.output_stride),
        "bn_mode": config.model.bn_mode,
        "bn_group_size": int(config.model.bn_group_size) if config.model.bn_mode == "per_replica" else None,
        "dtype": config.model.dtype,
        # "auto" starts without remat; train_classifier decides (choose_remat) and records the decision.
        "remat": config.model.remat is True,
    }


def build_classifier(model_config: dict, seed: int) -> nnx.Module:
    """Creates a classifier from a ``model_config_from`` dict."""
    arguments = dict(model_config)
    arguments["dtype"] = _DTYPES[arguments["dtype"]]
    arch = arguments.pop("arch")
    num_classes = arguments.pop("num_classes")
    return models.create_classifier(arch, num_classes, rngs=nnx.Rngs(seed), **arguments)


def load_exported_classifier(directory: str) -> tuple[nnx.Module, dict]:
    """Rebuilds an exported classifier with its trained weights, in evaluation mode."""
    model_config = checkpointing.load_model_config(directory)
    model = build_classifier(model_config, seed=0)
    _, params, batch_stats = training.split_model(model)
    params, batch_stats, _ = checkpointing.load_exported_model(
        directory, {"params": params, "batch_stats": batch_stats}
    )
    nnx.update(model, params, batch_stats)
    model.eval()
    return model, model_config


def initialise_from(model: nnx.Module, directory: str, *, include_head: bool) -> None:
    """Copies the backbone (and optionally the head) of an exported model into ``model``.

    Raises:
      ValueError: when the exported backbone's architecture or shapes differ from ``model``'s.
    """
    source_config = checkpointing.load_model_config(directory)
    source = nnx.eval_shape(lambda: build_classifier(source_config, seed=0))
    _, source_params, source_stats = training.split_model(source)
    params, stats, _ = checkpointing.load_exported_model(
        directory, {"params": source_params, "batch_stats": source_stats}
    )
    _, own_params, own_stats = training.split_model(model)
    parts = ("model", "classifier") if include_head else ("model",)
    for part in parts:
        for name, own, loaded in (
            ("params", own_params, params),
            ("batch_stats", own_stats, stats),
        ):
            if part not in own:
                continue
            own_shapes = jax.tree.map(jnp.shape, own[part])
            loaded_shapes = jax.tree.map(jnp.shape, loaded[part]) if part in loaded else None
            if own_shapes != loaded_shapes:
                raise ValueError(
                    f"model.init_from={directory}: its {name} under '{part}' do not match the model being "
                    f"trained (exported arch {source_config.get('arch')!r}, "
                    f"{source_config.get('num_classes')} classes)."
                )
            own[part] = loaded[part]
    nnx.update(model, own_params, own_stats)


def batch_images(batch: dict[str, jax.Array]) -> jax.Array:
    """The normalised float32 images of a training batch, inside the jitted step.

    The train loader sends uint8 crops with the box of the image on each (``input_pipeline``), normalised here on
    the device (``transforms.normalize_crops``); floating-point images are taken as already normalised.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        if "image_box" not in batch:
            raise ValueError(
                "A batch of uint8 images needs 'image_box' (top, left, height, width of each image on its crop), "
                "as the train loader produces; give normalised float images otherwise."
            )
        return transforms.normalize_crops(images, batch["image_box"])
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"batch['image'] has dtype {images.dtype}; expected uint8 crops or normalised floats.")
    return images


def create_classification_objective() -> training.LossFunction:
    """Plain multi-label classification on the full images (the ``pretrain`` stage)."""

    def compute_loss(model, batch, step):
        del step
        logits, _ = model(batch_images(batch))
        class_loss = losses.multilabel_soft_margin_loss(logits.astype(jnp.float32), batch["labels"])
        return class_loss, {"class_loss": class_loss}

    return compute_loss


def create_puzzle_objective(cam: ml_collections.ConfigDict, total_steps: int, output_stride: int):
    """The Puzzle-CAM objective of spec §3 for ``config.cam``.

    ``loss = class_loss + [p_class_loss] + [alpha_t * re_loss]``. The tiled pass runs only when a puzzle term is on,
    so ``cl`` is the plain-CAM baseline. Images whose side is not a multiple of grid x output stride are padded with
    zeros (the mean colour after normalisation) instead of being rejected.
    """
    use_puzzle_class, use_reconstruction = losses.parse_loss_option(cam.loss_option)
    if cam.level not in ("feature", "cam"):
        raise ValueError(f"cam.level={cam.level!r}; allowed values are ['feature', 'cam'].")
    grid = int(cam.grid)

    def compute_loss(model, batch, step):
        labels = batch["labels"]
        images, _ = puzzle.pad_to_multiple(batch_images(batch), grid * output_stride)
        logits, class_maps = model(images)
        class_maps = class_maps.astype(jnp.float32)
        class_loss = losses.multilabel_soft_margin_loss(logits.astype(jnp.float32), labels)
        metrics = {"class_loss": class_loss}
        loss = class_loss
        if use_puzzle_class or use_reconstruction:
            _, tile_maps = model(puzzle.tile(images, grid))
            merged_maps = puzzle.merge(tile_maps.astype(jnp.float32), grid)
            if use_puzzle_class:
                puzzle_class_loss = losses.multilabel_soft_margin_loss(merged_maps.mean(axis=(1, 2)), labels)
                loss = loss + puzzle_class_loss
                metrics["puzzle_class_loss"] = puzzle_class_loss
            if use_reconstruction:
                full, merged = class_maps, merged_maps
                if cam.level == "cam":
                    full, merged = losses.make_cam(full), losses.make_cam(merged)
                reconstruction = losses.reconstruction_loss(
                    full, merged, labels, norm=cam.re_loss, option=cam.re_loss_option
                )
                alpha = losses.alpha_at_step(step, total_steps, cam.alpha, cam.alpha_schedule)
                loss = loss + alpha * reconstruction
                metrics.update(reconstruction_loss=reconstruction, alpha=alpha)
        return loss, metrics

    return compute_loss


def choose_remat(
    model: nnx.Module,
    optimizer,
    compute_loss: training.LossFunction,
    mesh: jax.sharding.Mesh,
    *,
    global_batch_size: int,
    crop_size: int,
    num_classes: int,
) -> tuple[bool, dict[str, Any]]:
    """Whether the training step needs activation recomputation to fit a device (``model.remat="auto"``).

    Compiles the step without remat for the loader's batch and compares XLA's static estimate of its peak memory
    (arguments + outputs + temporaries - donated buffers; on the H100 it equalled the measured peak,
    BENCHMARKS.md) with ``AUTO_REMAT_MEMORY_FRACTION`` of the device's memory. Without a known limit (CPU) the
    answer is no, and nothing is compiled. The compiled step lands in the compilation cache, so a run that keeps
    remat off does not compile it again.

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
    batch = {
        "image": jax.ShapeDtypeStruct((global_batch_size, crop_size, crop_size, 3), jnp.uint8, sharding=placement),
        "image_box": jax.ShapeDtypeStruct((global_batch_size, 4), jnp.int32, sharding=placement),
        "labels": jax.ShapeDtypeStruct((global_batch_size, num_classes), jnp.float32, sharding=placement),
    }
    needed = training.step_memory_bytes(step.lower(state, batch).compile())
    if needed is None:
        return False, {"reason": "the backend gives no memory analysis"}
    remat = sharding.same_on_all_processes(needed > AUTO_REMAT_MEMORY_FRACTION * limit)
    return remat, {"step_bytes_without_remat": int(needed), "device_bytes": int(limit)}


def train_classifier(
    config: ml_collections.ConfigDict,
    stage_dir: str,
    *,
    split: str,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    objective: str,
    init_from: str,
    seed: int,
) -> dict[str, Any]:
    """Trains and exports a classifier; skips the work when ``stage_dir/model`` is already exported.

    Args:
      config: the run's config (``data``, ``model``, ``cam``, ``train`` and ``mesh`` sections are read).
      stage_dir: the stage's folder; checkpoints, metrics and the exported ``model`` go there.
      split: training split of ``config.data.dataset``.
      batch_size: global batch size.
      epochs: epochs over ``split``.
      learning_rate: base learning rate.
      objective: ``"classification"`` or ``"puzzle"``.
      init_from: exported model whose backbone initialises training ("" = random initialisation).
      seed: initialisation and data-order seed.

    Returns:
      The stage summary (steps, final metrics, export path).
    """
    # Imported here, not at module level: the objectives above are also used where tfds and grain are not
    # installed (benchmarks on an accelerator machine).
    from puzzle_jax.data import datasets, input_pipeline

    export_dir = os.path.join(stage_dir, "model")
    if checkpointing.is_exported_model(export_dir):
        logging.info("%s already exported: skipping training.", export_dir)
        return {"exported_model": export_dir, "skipped": True}
    # Image-level labels only: the masks are not decoded.
    source, info = datasets.load_split_from_config(config.data, split, decode_masks=False)
    mesh = sharding.create_mesh(config.mesh.num_devices)
    sharding.check_batch_size(batch_size, mesh, "the training batch size")
    total_steps = epochs * input_pipeline.steps_per_epoch(len(source), batch_size)
    if total_steps < 1:
        raise ValueError(
            f"Split '{split}' has {len(source)} images: fewer than one batch of {batch_size}; lower the batch size."
        )
    model_config = model_config_from(config, info.num_classes)
    model = build_classifier(model_config, seed)
    if init_from:
        initialise_from(model, os.path.expanduser(init_from), include_head=bool(config.model.init_head))
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(
        params,
        learning_rate=learning_rate,
        weight_decay=config.train.weight_decay,
        total_steps=total_steps,
        poly_power=config.train.poly_power,
        nesterov=config.train.nesterov,
        momentum_mode=config.train.momentum_mode,
        momentum=config.train.momentum,
    )
    if objective == "puzzle":
        compute_loss = create_puzzle_objective(config.cam, total_steps, int(config.model.output_stride))
    else:
        compute_loss = create_classification_objective()
    remat_facts = {}
    if config.model.remat == "auto":
        remat, remat_facts = choose_remat(
            model, optimizer, compute_loss, mesh,
            global_batch_size=batch_size, crop_size=int(config.data.crop_size), num_classes=info.num_classes,
        )
        # A static attribute of the backbone: the step that fit() traces from here on recomputes or not.
        model.model.remat = remat
        model_config["remat"] = remat
        logging.info("model.remat=auto: remat %s (%s)", "on" if remat else "off", remat_facts)
    loader = input_pipeline.create_train_loader(
        source,
        global_batch_size=batch_size,
        crop_size=config.data.crop_size,
        rescale_range=tuple(config.data.rescale_range),
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=config.data.worker_count,
    )
    graphdef, state, summary = training.fit(
        model=model,
        optimizer=optimizer,
        compute_loss=compute_loss,
        loader=loader,
        total_steps=total_steps,
        mesh=mesh,
        workdir=stage_dir,
        checkpoint_every_steps=config.train.checkpoint_every_steps,
        log_every_steps=config.train.log_every_steps,
        description=os.path.basename(stage_dir),
        scalar_schedules={
            "learning_rate": lambda step: optim.learning_rate_at(
                step,
                learning_rate=learning_rate,
                total_steps=total_steps,
                poly_power=config.train.poly_power,
            )
        },
        max_to_keep=config.train.max_to_keep,
    )
    checkpointing.export_model(export_dir, state.params, state.batch_stats, model_config)
    summary.update(exported_model=export_dir, images=len(source), epochs=epochs, batch_size=batch_size)
    summary.update(remat=model_config["remat"], **({"remat_auto": remat_facts} if remat_facts else {}))
    return summary
