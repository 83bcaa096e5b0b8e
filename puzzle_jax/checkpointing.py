"""Checkpoints and exported models: the only module that imports Orbax.

Two kinds of artefact live on disk:

* **Training checkpoints** (``CheckpointManager``, asynchronous, with retention): the training state pytree, the input
    pipeline's iterator state (JSON), so a resumed run continues with the same step, learning rate, alpha and data
    order.
* **Exported models**: an inference-only checkpoint holding the parameters, the batch statistics and the model config
    (``puzzle_jax.models``' schema: the family and its constructor arguments), loadable without any training state:
    ``load_exported`` rebuilds any family's model from it, ``initialise_from_export`` copies parts of one (a
    backbone, a head) into a model about to be trained. Orbax writes to a temporary folder and renames it, so an
    export is either complete or absent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from puzzle_jax import models

_ARRAYS = "arrays"
_MODEL_CONFIG = "model_config"
_STATE = "state"
_DATA = "data"


class TrainingCheckpointer:
    """Saves and restores the training state and the data iterator state of one training stage.

    Args:
        directory: where the numbered step folders go.
        save_every_steps: save a checkpoint every this many steps (the final step is always saved).
        max_to_keep: how many of the newest checkpoints are kept.
        asynchronous: write in a background thread so training does not wait for the disk.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every_steps: int,
        max_to_keep: int = 2,
        asynchronous: bool = True,
    ):
        self.directory = os.path.abspath(directory)
        save_decision = ocp.checkpoint_managers.AnySavePolicy(
            [
                ocp.checkpoint_managers.FixedIntervalPolicy(max(1, save_every_steps)),
                # A cluster's preemption notice (multi-host runs) saves at the next step on every process.
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                # The first step of a run without checkpoints is saved, so that a crash soon after the start
                # resumes without compiling and loading data again from the beginning.
                ocp.checkpoint_managers.InitialSavePolicy(),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_decision,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
        registry.add(_STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
        registry.add(_DATA, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
        registry.add(_DATA, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def restore_or_none(self, abstract_state: Any) -> tuple[Any, dict | None, int] | None:
        """Restores the newest checkpoint into the structure and shardings of ``abstract_state``.

        Args:
            abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays shaped like the state.

        Returns:
            ``(state, data_state, step)`` or None when the directory holds no checkpoint.
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        target = jax.tree.map(_as_abstract, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target), _DATA: ocp.args.JsonRestore()}),
        )
        return restored[_STATE], restored[_DATA], step

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is due for a checkpoint (its period, or a cluster preemption)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
        """Saves when ``step`` is due (or ``force``); returns whether a save was started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data_state or {})}
            ),
            force=force,
        )

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled a preemption (multi-host runs with jax.distributed)."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous save has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _as_abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=getattr(leaf, "sharding", None))


def _restore_target(leaf: Any) -> Any:
    """An exported model's restore target for ``leaf``: where it has a placement, there; without one (a model built
    by ``nnx.eval_shape``), a host array. Orbax would otherwise use the placement it was saved with, which names
    the devices of the saving run (a pod's export loaded on one machine would fail), and arrays committed to one
    device could not enter a computation on a mesh of several."""
    abstract = _as_abstract(leaf)
    if abstract.sharding is None:
        return np.zeros(abstract.shape, abstract.dtype)
    return abstract


def export_model(directory: str, params: Any, batch_stats: Any, model_config: dict) -> None:
    """Writes an inference-only model: parameters, batch statistics and the model config.

    Args:
        directory: destination folder; it must not exist yet (an export is never overwritten in place).
        params: pure pytree of parameter arrays.
        batch_stats: pure pytree of BatchNorm running statistics.
        model_config: JSON-serialisable keyword arguments of ``models.create_classifier``.
    """
    directory = os.path.abspath(directory)
    with _composite_checkpointer() as checkpointer:
        checkpointer.save(
            directory,
            args=ocp.args.Composite(
                **{
                    _ARRAYS: ocp.args.StandardSave({"params": params, "batch_stats": batch_stats}),
                    _MODEL_CONFIG: ocp.args.JsonSave(dict(model_config)),
                }
            ),
        )


def _composite_checkpointer() -> ocp.Checkpointer:
    """The checkpointer of exported models; use it in a ``with`` block, which closes it (and its background threads)
    once the save or restore is done."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def is_exported_model(directory: str) -> bool:
    """True when ``directory`` holds a complete exported model."""
    return os.path.isdir(os.path.join(directory, _ARRAYS)) and os.path.isdir(os.path.join(directory, _MODEL_CONFIG))


def load_model_config(directory: str) -> dict:
    """Reads only the model config of an exported model."""
    _check_export(directory)
    with _composite_checkpointer() as checkpointer:
        restored = checkpointer.restore(
            os.path.abspath(directory),
            args=ocp.args.Composite(**{_MODEL_CONFIG: ocp.args.JsonRestore()}),
        )
    return dict(restored[_MODEL_CONFIG])


def load_exported_model(directory: str, target: Any) -> tuple[Any, Any, dict]:
    """Restores an exported model into the structure of ``target``.

    Args:
        directory: an ``export_model`` folder.
        target: ``{"params": ..., "batch_stats": ...}`` pytree of arrays or ``jax.ShapeDtypeStruct`` giving the
            structure, shapes and placement to restore into (build it from a freshly created model).

    Returns:
        ``(params, batch_stats, model_config)``.
    """
    _check_export(directory)
    abstract = jax.tree.map(_restore_target, target)
    try:
        with _composite_checkpointer() as checkpointer:
            restored = checkpointer.restore(
                os.path.abspath(directory),
                args=ocp.args.Composite(
                    **{
                        _ARRAYS: ocp.args.StandardRestore(abstract),
                        _MODEL_CONFIG: ocp.args.JsonRestore(),
                    }
                ),
            )
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Exported model {directory} does not match the model it is loaded into "
            f"(different architecture or number of classes?): {error}"
        ) from error
    arrays = restored[_ARRAYS]
    return arrays["params"], arrays["batch_stats"], dict(restored[_MODEL_CONFIG])


def _pure_state(model: nnx.Module) -> dict[str, Any]:
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return {"params": nnx.as_pure(params), "batch_stats": nnx.as_pure(batch_stats)}


def load_exported(directory: str, *, family: str | None = None) -> tuple[nnx.Module, dict]:
    """Rebuilds an exported model of any family from its recorded config, with its weights, in evaluation mode.

    Args:
      directory: an ``export_model`` folder.
      family: the model family the caller needs (``models.MODEL_FAMILIES``); None takes any.

    Returns:
      ``(model, model_config)``.

    Raises:
      FileNotFoundError: ``directory`` is not an export.
      ValueError: the export is of another family than ``family``.
    """
    model_config = load_model_config(directory)
    if family is not None and models.model_family(model_config) != family:
        raise ValueError(
            f"{directory} holds a {models.model_family(model_config)} model; a {family} model is needed here."
        )
    # Shapes only: every variable comes from the export, so no time goes into a random initialisation.
    model = nnx.eval_shape(lambda: models.create_model(model_config, rngs=nnx.Rngs(0)))
    params, batch_stats, _ = load_exported_model(directory, _pure_state(model))
    nnx.update(model, params, batch_stats)
    model.eval()
    return model, model_config


def initialise_from_export(model: nnx.Module, directory: str, parts: Sequence[str], *, field: str) -> None:
    """Copies the parameters and batch statistics under the top-level attributes ``parts`` of an exported model
    (e.g. ``("model",)``, the backbone) into ``model``, in place.

    Args:
      model: the model about to be trained.
      directory: the export (``models``' schema; converted ImageNet weights are exported classifiers).
      parts: top-level attributes to copy; a part ``model`` has and the export lacks is an error.
      field: the config field that named ``directory``, for error messages.

    Raises:
      FileNotFoundError: ``directory`` is not an export.
      ValueError: a part's structure or shapes differ from ``model``'s.
    """
    if not is_exported_model(directory):
        raise FileNotFoundError(
            f"{field}={directory}: not an exported puzzle_jax model (expected the folders '{_ARRAYS}' and "
            f"'{_MODEL_CONFIG}' inside it). Point {field} at converted weights (python -m puzzle_jax.weights.convert),"
            " at an exported model folder, or at the name of a training stage of this workdir that has run (e.g. "
            "'pretrain': add that stage to config.stages)."
        )
    source_config = load_model_config(directory)
    source = nnx.eval_shape(lambda: models.create_model(source_config, rngs=nnx.Rngs(0)))
    loaded = load_exported_model(directory, _pure_state(source))[:2]
    own = _pure_state(model)
    for part in parts:
        for name, loaded_tree in zip(("params", "batch_stats"), loaded):
            if part not in own[name]:
                continue
            own_shapes = jax.tree.map(np.shape, own[name][part])
            loaded_shapes = jax.tree.map(np.shape, loaded_tree[part]) if part in loaded_tree else None
            if own_shapes != loaded_shapes:
                raise ValueError(
                    f"{field}={directory}: its {name} under '{part}' do not match the model being trained "
                    f"(exported {models.model_family(source_config)} of arch {source_config.get('arch')!r}, "
                    f"{source_config.get('num_classes')} classes)."
                )
            own[name][part] = loaded_tree[part]
    nnx.update(model, own["params"], own["batch_stats"])


def _check_export(directory: str) -> None:
    if not is_exported_model(directory):
        raise FileNotFoundError(
            f"{directory} is not an exported puzzle_jax model (expected the folders '{_ARRAYS}' and "
            f"'{_MODEL_CONFIG}' inside it)."
        )
