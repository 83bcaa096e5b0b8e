"""The one generic sharded training loop: state, the jitted step, checkpoints, logging and progress.

The model is an NNX module, but the step is a pure function. ``nnx.split`` happens once; the jitted step receives
pure arrays (``nnx.as_pure``) for the parameters and the BatchNorm statistics, merges them into a module inside the
trace, takes ``jax.value_and_grad`` of the objective, applies optax and returns the new pure state. Passing NNX
Variables across the jit boundary instead makes BatchNorm raise ``TraceContextError`` (README, "Architecture").

Stages supply the objective: ``compute_loss(model, batch, step) -> (loss, metrics)``, where ``model`` is the merged
module in training mode, ``batch`` a dict of global arrays and ``metrics`` a dict of scalars.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from puzzle_jax import checkpointing, fileio, sharding
from puzzle_jax import progress as progress_lib

LossFunction = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainingPaths:
    """Where a training run writes (``pipeline.Workdir.training`` lays them out in a workdir).

    Attributes:
      checkpoints: folder of the Orbax training checkpoints (numbered step folders).
      metrics: the JSON-lines file of the logged scalars.
      tensorboard: folder of the TensorBoard event files.
      export: folder of the exported inference-only model.
    """

    checkpoints: str
    metrics: str
    tensorboard: str
    export: str

    @property
    def validation_metrics(self) -> str:
        """The JSON-lines file of the periodic validation scores (``fit``'s ``validate``), beside ``metrics``."""
        return os.path.join(os.path.dirname(self.metrics), "validation.jsonl")


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes, as pure arrays (a pytree)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """Splits a model into its graph definition and pure parameter and batch-statistic states."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.as_pure(params), nnx.as_pure(batch_stats)


def merge_model(graphdef: nnx.GraphDef, params: Any, batch_stats: Any) -> nnx.Module:
    """Rebuilds a module from ``split_model``'s parts."""
    return nnx.merge(graphdef, params, batch_stats)


def create_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """Creates the replicated training state of ``model`` (which must be in training mode).

    Returns:
        The graph definition the step merges into and the state, already placed on every device of the mesh.
    """
    graphdef, params, batch_stats = split_model(model)
    # Created already replicated: the optimizer state is allocated in place on every device.
    return graphdef, _initial_state_fn(optimizer, mesh)(params, batch_stats)


def abstract_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState]:
    """``create_train_state``'s result as shapes, dtypes and shardings only (``jax.ShapeDtypeStruct``), with nothing
    allocated: enough to lower and compile the step, e.g. to read its memory estimate."""
    graphdef, params, batch_stats = split_model(model)
    return graphdef, jax.eval_shape(_initial_state_fn(optimizer, mesh), params, batch_stats)


def _initial_state_fn(optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh):
    def initial_state(params, batch_stats):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=optimizer.init(params),
        )

    return jax.jit(initial_state, out_shardings=sharding.replicated(mesh))


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    compute_loss: LossFunction,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the jitted, state-donating training step for a data-parallel mesh.

    The batch arrives sharded along ``'data'``; the state is replicated. Under ``jit`` the BatchNorm statistics of a
    sharded batch are global (what ``bn_mode='global'`` means): XLA inserts the cross-device reductions.
    """
    replicated = sharding.replicated(mesh)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_of(params):
            model = merge_model(graphdef, params, state.batch_stats)
            loss, metrics = compute_loss(model, batch, state.step)
            new_batch_stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
            return loss, (metrics, new_batch_stats)

        (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def step_memory_bytes(compiled) -> int | None:
    """XLA's static estimate of a compiled step's device memory at its peak: arguments + outputs + temporaries -
    donated (aliased) buffers. On the H100 it equalled the measured peak (BENCHMARKS.md); None where the backend
    gives no analysis."""
    try:
        memory = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if memory is None:
        return None
    return int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


class MetricsWriter:
    """Writes scalar metrics as JSON lines (appended to ``metrics_path``) and TensorBoard events (process 0 only).

    A run that resumes at ``resume_step`` first drops the records after that step (steps a killed run logged after
    its last checkpoint, which the resumed run logs again), so every step appears once in ``metrics_path``; the
    TensorBoard writer is opened with ``purge_step`` so that TensorBoard discards the same steps of earlier event
    files.
    """

    def __init__(self, metrics_path: str, tensorboard_dir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
        truncated = _truncate_metrics(metrics_path, resume_step)
        self._jsonl = open(metrics_path, "a")
        from tensorboardX import SummaryWriter  # Imported lazily: only process 0 writes events.

        self._tensorboard = SummaryWriter(logdir=tensorboard_dir, purge_step=resume_step + 1 if truncated else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _truncate_metrics(metrics_path: str, last_step: int) -> bool:
    """Keeps only the records of steps up to ``last_step`` in ``metrics_path`` (rewritten atomically); returns
    whether the file held records of earlier runs at all. A line a kill cut short is dropped too."""
    if not os.path.exists(metrics_path):
        return False
    kept = []
    with open(metrics_path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    fileio.write_text(metrics_path, "".join(kept))
    return True


class Preempted(Exception):
    """Raised after a checkpoint was saved because the job was asked to stop (SIGTERM or a cluster preemption).

    Attributes:
      description: the run's label (the stage's name).
      step: the step whose checkpoint was saved, where a rerun resumes.
      total_steps: the run's length.
    """

    def __init__(self, description: str, step: int, total_steps: int):
        super().__init__(f"{description}: stopped at step {step} of {total_steps}; checkpoint saved.")
        self.description, self.step, self.total_steps = description, step, total_steps


@contextlib.contextmanager
def _stop_requests():
    """Turns SIGTERM into a flag the loop polls, so a preempted job saves before it exits.

    Only in a one-process run: with several, JAX's distributed runtime catches SIGTERM itself and makes it a
    preemption notice that every process learns of, and Orbax's ``reached_preemption`` names the same step on all
    of them (a flag of this process alone would make it save and stop while the others wait in the next step's
    collectives). A handler here would replace the runtime's.
    """
    requested = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001 (signal handler signature)
        requested["stop"] = True

    previous = None
    if jax.process_count() == 1:
        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # Not the main thread (e.g. inside some test runners): no handler, nothing to restore.
            previous = None
    try:
        yield requested
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def fit(
    *,
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    compute_loss: LossFunction,
    loader: Iterable,
    total_steps: int,
    mesh: jax.sharding.Mesh,
    paths: TrainingPaths,
    checkpoint_every_steps: int,
    log_every_steps: int,
    description: str,
    scalar_schedules: dict[str, Callable[[int], float]] | None = None,
    max_to_keep: int = 2,
    stop_after_steps: int | None = None,
    validate: Callable[[nnx.GraphDef, TrainState], dict[str, float]] | None = None,
    validate_every_steps: int = 0,
    reshuffle_on_process_change: bool = False,
) -> tuple[nnx.GraphDef, TrainState, dict]:
    """Trains ``model`` for ``total_steps``, resuming from ``paths.checkpoints`` when a checkpoint is there.

    Args:
        model: the NNX module, already initialised (pretrained weights loaded) and in training mode.
        optimizer: the optax transformation.
        compute_loss: the objective (see the module docstring).
        loader: a grain loader; its iterator's ``get_state``/``set_state`` are checkpointed with the model.
        total_steps: number of optimisation steps of the whole run.
        mesh: the data-parallel mesh.
        paths: where checkpoints, metrics and TensorBoard events go (``paths.export`` is not written here).
        checkpoint_every_steps: checkpoint period; the last step is always saved.
        log_every_steps: how often metrics are fetched from the device and written; records of steps after the
            restored checkpoint, which a killed run had written, are dropped first.
        description: progress-bar label.
        scalar_schedules: extra host-side scalars to log per step (e.g. the learning rate).
        max_to_keep: checkpoints kept.
        stop_after_steps: stop (after saving) once this step is reached, as if preempted. For tests and time-boxed jobs.
        validate: ``(graphdef, state) -> {name: score}``, called every ``validate_every_steps`` steps (0: never); the
            scores are logged (``paths.validation_metrics``, TensorBoard under ``validation/``, a printed line) and
            never steer training.
        reshuffle_on_process_change: resuming a checkpoint saved by another number of processes restarts the data
            stream instead of failing (``config.data.reshuffle_on_process_change``).

    Returns:
        ``(graphdef, final_state, summary)``; the summary holds the last logged metrics and throughput
        (``last_metrics``) and the mean of every metric over the last tenth of the steps this run logged
        (``last_tenth_metrics``: less noisy than one batch).

    Raises:
        Preempted: when a stop was requested (SIGTERM; in a multi-process run, a preemption notice that any
            process received): every process saved the same step first.
        ResumeMismatchError: the checkpoint was saved by another number of processes (and
            ``reshuffle_on_process_change`` is off).
        FloatingPointError: when the loss or the gradient norm becomes NaN or infinite (the message names the step
            and the newest checkpoint). The check runs on every step that is logged and, before each save, on the
            steps since the last check (their scalars are fetched then), so no non-finite state is ever saved.
    """
    graphdef, state = create_train_state(model, optimizer, mesh)
    checkpointer = checkpointing.TrainingCheckpointer(
        paths.checkpoints,
        save_every_steps=checkpoint_every_steps,
        max_to_keep=max_to_keep,
    )
    iterator = iter(loader)
    restored = checkpointer.restore_or_none(state)
    start_step = 0
    if restored is not None:
        state, data_state, start_step = restored
        _restore_data_state(
            iterator, data_state, step=start_step, checkpoints=paths.checkpoints, reshuffle=reshuffle_on_process_change
        )
        if jax.process_index() == 0:
            print(f"[{description}] resuming at step {start_step} of {total_steps} ({paths.checkpoints})", flush=True)
    train_step = make_train_step(graphdef, optimizer, compute_loss, mesh)
    writer = MetricsWriter(paths.metrics, paths.tensorboard, resume_step=start_step)
    validation_writer = None
    if validate is not None and validate_every_steps > 0:
        validation_writer = MetricsWriter(
            paths.validation_metrics, os.path.join(paths.tensorboard, "validation"), resume_step=start_step
        )
    schedules = scalar_schedules or {}
    summary: dict = {"start_step": start_step, "total_steps": total_steps}
    progress = progress_lib.Progress(
        total_steps, initial=start_step, description=description, unit="steps", enabled=jax.process_index() == 0
    )
    pending: list[tuple[int, dict]] = []
    last_tenth: collections.deque = collections.deque(maxlen=max(1, math.ceil(total_steps / 10)))
    images_seen, window_start = 0, time.perf_counter()
    step = start_step
    # The newest step saved (None: no checkpoint yet); named in the message when the loss becomes NaN.
    saved_step = start_step if restored is not None else None
    try:
        with _stop_requests() as stop:
            while step < total_steps:
                host_batch = next(iterator)
                batch = sharding.host_batch_to_global(host_batch, mesh)
                state, metrics = train_step(state, batch)
                step += 1
                images_seen += len(next(iter(host_batch.values()))) * jax.process_count()
                pending.append((step, metrics))
                progress.update(1)
                if step % log_every_steps == 0 or step == total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    records = _write_metrics(writer, pending, schedules, images_seen / elapsed, saved_step)
                    last_tenth.extend(records)
                    last = records[-1]
                    progress.set_postfix({k: f"{last[k]:.4f}" for k in ("loss",) if k in last})
                    summary["last_metrics"] = last
                    pending, images_seen, window_start = [], 0, time.perf_counter()
                if validation_writer is not None and step % validate_every_steps == 0:
                    scores = validate(graphdef, state)
                    validation_writer.write(step, scores)
                    if jax.process_index() == 0:
                        shown = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
                        print(f"[{description}] step {step}: validation {shown}", flush=True)
                preempt = stop["stop"] or checkpointer.reached_preemption(step)
                stopping = preempt or (stop_after_steps is not None and step >= stop_after_steps)
                force = stopping or step == total_steps
                if force or checkpointer.should_save(step):
                    # A state is saved only when every step since the last check had a finite loss and gradient (the
                    # logged steps were checked when they were written): a NaN never reaches a checkpoint, so the
                    # retention policy cannot rotate the last good one out.
                    _check_finite(jax.device_get([(s, _checked(m)) for s, m in pending]), saved_step)
                    # The iterator states are serialised only for the steps that are saved.
                    data_state = _data_state(iterator)
                    if checkpointer.save(step, state, data_state, force=force):
                        saved_step = step
                if stopping and step < total_steps:
                    checkpointer.wait_until_finished()
                    raise Preempted(description, step, total_steps)
    finally:
        progress.close()
        writer.close()
        if validation_writer is not None:
            validation_writer.close()
        checkpointer.close()
    summary["final_step"] = step
    if last_tenth:
        summary["last_tenth_metrics"] = {
            name: float(np.mean([record[name] for record in last_tenth if name in record])) for name in last_tenth[-1]
        }
    return graphdef, state, summary


class ResumeMismatchError(ValueError):
    """A checkpoint that this run, as configured, cannot resume (saved by another number of processes); the
    driver reports it as a config error."""


def _data_state(iterator: Any) -> dict:
    """Every process's data-iterator state, in process order: each reads its own place in the data stream, and
    process 0 writes the checkpoint's JSON."""
    return {"iterators": sharding.gather_texts("data iterator state", iterator.get_state().decode())}


def _restore_data_state(
    iterator: Any, data_state: dict | None, *, step: int, checkpoints: str, reshuffle: bool
) -> None:
    """Puts this process's iterator where the checkpoint's same-numbered process was.

    Raises:
      ResumeMismatchError: the checkpoint holds another number of processes' states (and not ``reshuffle``).
    """
    if not data_state:
        return
    if "iterator" in data_state:
        # Saved before per-process states: one process, and grain's own sampler, whose stream GlobalOrderSampler
        # reproduces for a loader without workers; the loader checks the sampler's description, so it is renewed.
        legacy = json.loads(data_state["iterator"])
        legacy["sampler"] = json.loads(iterator.get_state())["sampler"]
        states = [json.dumps(legacy)]
    else:
        states = data_state["iterators"]
    if len(states) != jax.process_count():
        if not reshuffle:
            raise ResumeMismatchError(
                f"{checkpoints}: the checkpoint of step {step} was saved by {len(states)} process(es) and this run "
                f"has {jax.process_count()}; each process continues its own place in the data stream, so the run "
                f"cannot resume with another number. Run it with {len(states)} process(es), or pass "
                "--config.data.reshuffle_on_process_change=true to resume the model, optimizer and schedules at step "
                f"{step} with the data stream started again from its beginning."
            )
        if jax.process_index() == 0:
            print(
                f"{checkpoints}: step {step} was saved by {len(states)} process(es), this run has "
                f"{jax.process_count()}: resuming with the data stream started again "
                "(data.reshuffle_on_process_change).",
                flush=True,
            )
        return
    iterator.set_state(states[jax.process_index()].encode())


def _write_metrics(
    writer: MetricsWriter,
    pending: list[tuple[int, dict]],
    schedules: dict[str, Callable[[int], float]],
    images_per_second: float,
    saved_step: int | None,
) -> list[dict[str, float]]:
    """Fetches buffered device metrics, checks them for NaN, and writes and returns one record per step."""
    host = jax.device_get(pending)
    _check_finite([(step, _checked(metrics)) for step, metrics in host], saved_step)
    records: list[dict[str, float]] = []
    for step, metrics in host:
        scalars = {name: float(np.asarray(value)) for name, value in metrics.items()}
        for name, schedule in schedules.items():
            scalars[name] = float(schedule(step - 1))
        scalars["images_per_second"] = images_per_second
        writer.write(step, scalars)
        records.append(scalars)
    return records


# The scalars whose finiteness says a step's state is sound: a NaN or infinite loss or gradient norm spreads into
# the parameters (and the optimizer state) at that very update.
_CHECKED_METRICS = ("loss", "grad_norm")


def _checked(metrics: dict) -> dict:
    return {name: metrics[name] for name in _CHECKED_METRICS if name in metrics}


def _check_finite(steps: list[tuple[int, dict]], saved_step: int | None) -> None:
    """Raises ``FloatingPointError`` at the first step whose loss or gradient norm is NaN or infinite.

    Args:
      steps: ``(step, {name: scalar})`` in step order, on the host.
      saved_step: the newest step saved so far (None: none), where a rerun resumes.
    """
    for step, scalars in steps:
        bad = {name: float(np.asarray(value)) for name, value in scalars.items()}
        bad = {name: value for name, value in bad.items() if not math.isfinite(value)}
        if bad:
            resume = (
                f"every checkpoint kept has a finite loss, and a rerun resumes from the newest (step {saved_step})"
                if saved_step is not None
                else "no checkpoint was saved, so a rerun starts from step 0"
            )
            name, value = next(iter(bad.items()))
            raise FloatingPointError(
                f"The {name.replace('_', ' ')} became {value} at step {step}; the state of that step was not "
                f"saved: {resume}."
            )
