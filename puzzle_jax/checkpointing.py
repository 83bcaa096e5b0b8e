"""Checkpoints and exported models: the only module that imports Orbax.

Two kinds of artefact live on disk:

* **Training checkpoints** (``CheckpointManager``, asynchronous, with retention): the training state pytree, the input
    pipeline's iterator state (JSON), so a resumed run continues with the same step, learning rate, alpha and data
    order.
* **Exported models**: an inference-only checkpoint holding the parameters, the batch statistics and the model part
    of the config (enough to rebuild the module with ``puzzle_jax.models.create_classifier``), loadable without any
    training state. Orbax writes to a temporary folder and renames it, so an export is either complete or absent.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

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
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_every_steps),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=asynchronous,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _DATA))

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
    abstract = jax.tree.map(_as_abstract, target)
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


def _check_export(directory: str) -> None:
    if not is_exported_model(directory):
        raise FileNotFoundError(
            f"{directory} is not an exported puzzle_jax model (expected the folders '{_ARRAYS}' and "
            f"'{_MODEL_CONFIG}' inside it)."
        )
