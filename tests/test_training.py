"""Tests of the generic training loop: sharded step, resume after a kill, preemption, NaN detection."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from configs import default
from puzzle_jax import checkpointing, models, objectives, optim, pipeline, sharding, training
from puzzle_jax.data import input_pipeline

NUM_CLASSES = 3


def _puzzle_config():
    """The default config's (the paper's) Puzzle-CAM settings."""
    return default.get_config().cam


def _tiny_classifier(seed=0):
    model = models.create_classifier("resnet_tiny", NUM_CLASSES, bn_mode="global", rngs=nnx.Rngs(seed))
    model.train()
    return model


def _random_batch(batch_size=8, size=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((batch_size, NUM_CLASSES)) < 0.5).astype(np.float32)
    labels[:, 0] = 1.0  # every image has at least one class
    return {
        "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "labels": labels,
    }


def _puzzle_step(mesh, learning_rate=0.1):
    """The initial state and the jitted Puzzle-CAM step of the tiny classifier on ``mesh``."""
    model = _tiny_classifier()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=learning_rate, weight_decay=1e-4, total_steps=10)
    objective = objectives.create_puzzle_objective(_puzzle_config(), 10, 16)
    graphdef, state = training.create_train_state(model, optimizer, mesh)
    return state, training.make_train_step(graphdef, optimizer, objective, mesh)


def _one_step(num_devices):
    mesh = sharding.create_mesh(num_devices)
    # A small learning rate: on random images the gradient norm is ~1000, and at 0.1 the first update moves the
    # weights so far that the second step turns the reductions' float differences (1e-5 of the gradient) into
    # 1e-3 of the weights on some CPUs.
    state, step = _puzzle_step(mesh, learning_rate=0.001)
    batch = sharding.host_batch_to_global(_random_batch(), mesh)
    state, metrics = step(state, batch)
    # Two steps, so the second one sees updated parameters and BN statistics.
    state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics), batch


def test_step_on_one_and_eight_devices_agree():
    assert jax.device_count() == 8
    state_1, metrics_1, _ = _one_step(1)
    state_8, metrics_8, batch_8 = _one_step(8)
    assert len(batch_8["image"].sharding.device_set) == 8
    for name in metrics_1:
        np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=1e-4, atol=1e-5, err_msg=name)
    flat_1 = jax.tree.leaves(state_1.params) + jax.tree.leaves(state_1.batch_stats)
    flat_8 = jax.tree.leaves(state_8.params) + jax.tree.leaves(state_8.batch_stats)
    assert len(flat_1) == len(flat_8) > 10
    for a, b in zip(flat_1, flat_8):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert int(state_8.step) == 2


def test_the_step_compiles_once_for_a_stream_of_loader_batches():
    """Donated state in, replicated state out, new uint8 batches every step: one compiled program (a second one would
    mean a recompile per step on an accelerator, minutes for ResNeSt)."""
    mesh = sharding.create_mesh(8)
    state, step = _puzzle_step(mesh)
    iterator = iter(input_pipeline.create_train_loader(
        _FakeSource(), transform=_augmentation(), global_batch_size=8, seed=1
    ))
    for _ in range(3):
        host_batch = next(iterator)
        assert host_batch["image"].dtype == np.uint8
        state, metrics = step(state, sharding.host_batch_to_global(host_batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_step_updates_parameters_and_batch_statistics():
    mesh = sharding.create_mesh(8)
    model = _tiny_classifier()
    _, params, stats = training.split_model(model)
    before_params, before_stats = jax.device_get((params, stats))
    state, metrics, _ = _one_step(8)
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before_params), jax.tree.leaves(state.params))]
    assert all(changed), "every parameter receives a gradient in the puzzle objective"
    # Running means move towards the batch statistics: momentum 0.1 from zero initial means.
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before_stats), jax.tree.leaves(state.batch_stats)))
    assert set(metrics) >= {
        "loss",
        "class_loss",
        "puzzle_class_loss",
        "reconstruction_loss",
        "alpha",
    }
    del mesh


class _SmallCamModel(nnx.Module):
    """A two-layer CAM classifier (output stride 4) that compiles in a second: the loop tests need BN, not depth."""

    OUTPUT_STRIDE = 4

    def __init__(self, seed):
        rngs = nnx.Rngs(seed)

        class Backbone(nnx.Module):
            def __init__(self):
                self.conv1 = nnx.Conv(3, 8, (3, 3), strides=(4, 4), use_bias=False, rngs=rngs)
                self.bn1 = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)

            def __call__(self, x):
                return jax.nn.relu(self.bn1(self.conv1(x)))

        self.model = Backbone()
        self.classifier = nnx.Conv(8, NUM_CLASSES, (1, 1), use_bias=False, rngs=rngs)

    def __call__(self, images):
        class_maps = self.classifier(self.model(images))
        return class_maps.mean(axis=(1, 2)), class_maps


def _augmentation():
    return input_pipeline.ClassifierAugmentation(crop_size=64, rescale_range=(48, 80))


class _FakeSource:
    """A tiny in-memory split with the record layout of data.datasets."""

    def __init__(self, count=24, seed=0):
        rng = np.random.default_rng(seed)
        self.records = []
        for index in range(count):
            size = int(rng.integers(40, 72))
            labels = np.zeros(NUM_CLASSES, np.float32)
            labels[index % NUM_CLASSES] = 1
            self.records.append(
                {
                    "image": rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8),
                    "mask": np.zeros((size, size + 4), np.uint8),
                    "labels": labels,
                    "id": f"image_{index:03d}",
                }
            )

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __repr__(self):  # grain checks the source's repr when an iterator state is restored
        return f"_FakeSource({len(self.records)})"


def _fit(
    workdir, *, total_steps, stop_after_steps=None, loader_hook=None, compute_loss=None, checkpoint_every_steps=4,
    log_every_steps=1,
):
    mesh = sharding.create_mesh(1)
    model = _SmallCamModel(seed=3)
    model.train()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.05, weight_decay=1e-4, total_steps=total_steps)
    objective = compute_loss or objectives.create_puzzle_objective(
        _puzzle_config(), total_steps, _SmallCamModel.OUTPUT_STRIDE
    )
    loader = input_pipeline.create_train_loader(_FakeSource(), transform=_augmentation(), global_batch_size=4, seed=5)
    if loader_hook is not None:
        loader = loader_hook(loader)
    return training.fit(
        model=model,
        optimizer=optimizer,
        compute_loss=objective,
        loader=loader,
        total_steps=total_steps,
        mesh=mesh,
        paths=pipeline.Workdir(workdir).training("test"),
        checkpoint_every_steps=checkpoint_every_steps,
        log_every_steps=log_every_steps,
        description="test",
        stop_after_steps=stop_after_steps,
    )


def _metric_records(workdir):
    with open(pipeline.Workdir(workdir).training("test").metrics) as handle:
        return [json.loads(line) for line in handle]


def _metrics_by_step(workdir):
    return {record["step"]: record for record in _metric_records(workdir)}


def test_killed_run_resumes_with_same_state_lr_alpha_and_data(tmp_path):
    total = 6
    _, uninterrupted, _ = _fit(str(tmp_path / "straight"), total_steps=total)
    with pytest.raises(training.Preempted):
        _fit(str(tmp_path / "resumed"), total_steps=total, stop_after_steps=3)
    _, resumed, summary = _fit(str(tmp_path / "resumed"), total_steps=total)
    assert summary["start_step"] == 3
    assert int(resumed.step) == total
    for a, b in zip(jax.tree.leaves(uninterrupted.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    straight_metrics = _metrics_by_step(str(tmp_path / "straight"))
    resumed_metrics = _metrics_by_step(str(tmp_path / "resumed"))
    for step in (4, 5, 6):  # the steps after the restart: same data, lr and alpha
        for name in ("loss", "alpha", "learning_rate", "class_loss"):
            if name in straight_metrics[step]:
                np.testing.assert_allclose(
                    resumed_metrics[step][name],
                    straight_metrics[step][name],
                    rtol=1e-5,
                    err_msg=name,
                )


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    class SendTermAtSecondBatch:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            inner = iter(self.loader)
            outer = self

            class Iterator:
                count = 0

                def __next__(self):
                    self.count += 1
                    if self.count == 2:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return next(inner)

                def get_state(self):
                    return inner.get_state()

                def set_state(self, state):
                    inner.set_state(state)

            del outer
            return Iterator()

    workdir = str(tmp_path / "run")
    with pytest.raises(training.Preempted, match="step 2 of 6"):
        _fit(workdir, total_steps=6, loader_hook=SendTermAtSecondBatch)
    checkpoints = pipeline.Workdir(workdir).training("test").checkpoints
    saved_steps = [int(name) for name in os.listdir(checkpoints) if name.isdigit()]
    assert max(saved_steps) == 2  # saved at the step the signal arrived, although 2 is not yet due


def test_nan_loss_names_the_step(tmp_path):
    def nan_after_first_step(model, batch, step):
        logits, _ = model(objectives.batch_images(batch))
        loss = jnp.mean(logits) * 0.0 + jnp.where(step >= 1, jnp.nan, 1.0)
        return loss, {}

    with pytest.raises(FloatingPointError, match="step 2"):
        _fit(str(tmp_path / "nan"), total_steps=4, compute_loss=nan_after_first_step)


def _saved_steps(workdir):
    checkpoints = pipeline.Workdir(workdir).training("test").checkpoints
    return sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())


def test_a_nan_between_log_steps_never_reaches_a_checkpoint(tmp_path):
    """Checkpoints every 2 steps, metrics every 100: the loss turns NaN at step 5. No state from step 5 on is saved,
    so the retention policy (2 kept) still holds finite checkpoints, the message names the newest one, and a rerun
    with a sound objective resumes from it."""

    def nan_from_step_5(model, batch, step):
        logits, _ = model(objectives.batch_images(batch))
        return jnp.mean(logits) + jnp.where(step >= 4, jnp.nan, 1.0), {}

    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError) as raised:
        _fit(workdir, total_steps=10, compute_loss=nan_from_step_5, checkpoint_every_steps=2, log_every_steps=100)
    assert _saved_steps(workdir) == [2, 4]  # before: 6 and 8, NaN weights, with 2 and 4 rotated out
    assert "loss became nan at step 5" in str(raised.value)
    assert "a rerun resumes from the newest (step 4)" in str(raised.value)
    checkpointer = checkpointing.TrainingCheckpointer(
        pipeline.Workdir(workdir).training("test").checkpoints, save_every_steps=2
    )
    for step in (2, 4):
        restored = checkpointer._manager.restore(step)  # noqa: SLF001 (the raw arrays, whatever their structure)
        leaves = jax.tree.leaves(restored["state"])
        assert leaves and all(np.all(np.isfinite(leaf)) for leaf in leaves if np.issubdtype(leaf.dtype, np.floating))
    checkpointer.close()

    def finite(model, batch, step):
        logits, _ = model(objectives.batch_images(batch))
        return jnp.mean(logits) ** 2, {}

    _, state, summary = _fit(workdir, total_steps=6, compute_loss=finite, checkpoint_every_steps=2)
    assert summary["start_step"] == 4 and int(state.step) == 6


def test_an_infinite_gradient_with_a_finite_loss_is_not_saved(tmp_path):
    @jax.custom_vjp
    def gradient_times(value, factor):
        return value

    def forward(value, factor):
        return value, factor

    def backward(factor, cotangent):
        return cotangent * factor, jnp.zeros_like(factor)

    gradient_times.defvjp(forward, backward)

    def infinite_gradient(model, batch, step):
        logits, _ = model(objectives.batch_images(batch))
        # A finite loss whose gradient is infinite from the third step on.
        return gradient_times(jnp.mean(logits), jnp.where(step >= 2, jnp.inf, 1.0)), {}

    workdir = str(tmp_path / "inf")
    with pytest.raises(FloatingPointError, match="grad norm became .* at step 3"):
        _fit(workdir, total_steps=10, compute_loss=infinite_gradient, checkpoint_every_steps=3, log_every_steps=100)
    assert _saved_steps(workdir) == [1]


def test_a_resumed_run_logs_every_step_once(tmp_path):
    """A run killed after its step-4 checkpoint had logged steps 5 and 6; the resumed run logs them again, and the
    metrics file holds each step once (the earlier records of 5 and 6 are dropped, as is a line the kill cut short)."""
    workdir = str(tmp_path / "run")
    with pytest.raises(training.Preempted):
        _fit(workdir, total_steps=8, stop_after_steps=4)
    metrics = pipeline.Workdir(workdir).training("test").metrics
    with open(metrics, "a") as handle:  # what the killed run wrote after its last checkpoint
        handle.write(json.dumps({"step": 5, "loss": 99.0}) + "\n" + json.dumps({"step": 6, "loss": 99.0}) + "\n")
        handle.write('{"step": 7, "lo')
    _fit(workdir, total_steps=8)
    steps = [record["step"] for record in _metric_records(workdir)]
    assert steps == list(range(1, 9))
    assert all(record["loss"] != 99.0 for record in _metric_records(workdir))
    # TensorBoard: the resumed run's event file starts with a SessionLog START at step 5, which makes TensorBoard
    # discard the earlier files' events from step 5 on (its purge rule).
    tensorboard = pipeline.Workdir(workdir).training("test").tensorboard
    files = sorted(os.listdir(tensorboard), key=lambda name: os.path.getmtime(os.path.join(tensorboard, name)))
    assert len(files) == 2
    starts = [(event.step, event.session_log.status) for event in _events(os.path.join(tensorboard, files[1]))
              if event.HasField("session_log")]
    assert starts == [(5, event_pb2.SessionLog.START)]


def _events(path):
    """The records of a TensorBoard event file (TFRecord framing: length, its CRC, the bytes, their CRC)."""
    import struct

    with open(path, "rb") as handle:
        payload = handle.read()
    offset, events = 0, []
    while offset < len(payload):
        (length,) = struct.unpack("<Q", payload[offset : offset + 8])
        event = event_pb2.Event()
        event.ParseFromString(payload[offset + 12 : offset + 12 + length])
        events.append(event)
        offset += 12 + length + 4
    return events


def test_step_memory_bytes_is_xla_s_static_estimate():
    mesh = sharding.create_mesh(1)
    state, step = _puzzle_step(mesh)
    compiled = step.lower(state, sharding.host_batch_to_global(_random_batch(), mesh)).compile()
    memory = compiled.memory_analysis()
    expected = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
    parameter_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    assert training.step_memory_bytes(compiled) == expected > 2 * parameter_bytes  # parameters + momentum at least

    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    assert training.step_memory_bytes(NoAnalysis()) is None


def test_abstract_train_state_lowers_the_same_step_as_the_real_state():
    mesh = sharding.create_mesh(8)
    model = _tiny_classifier()
    _, params, _ = training.split_model(model)
    optimizer = optim.create_optimizer(params, learning_rate=0.1, weight_decay=1e-4, total_steps=10)
    graphdef, state = training.create_train_state(model, optimizer, mesh)
    abstract_graphdef, abstract = training.abstract_train_state(model, optimizer, mesh)
    assert abstract_graphdef == graphdef
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), state) == jax.tree.map(
        lambda a: (a.shape, a.dtype, a.sharding), abstract
    )
    objective = objectives.create_puzzle_objective(_puzzle_config(), 10, 16)
    step = training.make_train_step(graphdef, optimizer, objective, mesh)
    batch = sharding.host_batch_to_global(_random_batch(), mesh)
    assert step.lower(abstract, batch).as_text() == step.lower(state, batch).as_text()


def test_nnx_tree_mode_trains_like_graph_mode():
    """Flax announces NNX tree mode (``nnx.set_graph_mode(False)``) as the future default: the split, the jitted
    step and the merge inside it must give the same states in both modes."""
    graph_state, graph_metrics, _ = _one_step(1)
    with nnx.set_graph_mode(False):
        tree_state, tree_metrics, _ = _one_step(1)
    for a, b in zip(jax.tree.leaves((graph_state, graph_metrics)), jax.tree.leaves((tree_state, tree_metrics)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _fake_loader(process_count=1, process_index=0):
    from tests.test_input_pipeline import loader_kwargs, make_fake_source

    return input_pipeline.create_train_loader(
        make_fake_source(10), process_index=process_index, process_count=process_count, **loader_kwargs()
    )


def test_a_checkpoint_of_another_process_count_stops_unless_reshuffling_is_asked_for():
    saved = {"iterators": ["state of process 0", "state of process 1"]}
    iterator = iter(_fake_loader())
    # (The driver turns it into a config error: exit status 2 with the message.)
    with pytest.raises(training.ResumeMismatchError) as raised:
        training._restore_data_state(iterator, saved, step=40, checkpoints="/runs/x/checkpoints", reshuffle=False)
    message = str(raised.value)
    assert "/runs/x/checkpoints: the checkpoint of step 40 was saved by 2 process(es) and this run has 1" in message
    assert "--config.data.reshuffle_on_process_change=true" in message
    # Reshuffling: the stream starts again from its beginning (the states, which name another layout, are unused).
    training._restore_data_state(iterator, saved, step=40, checkpoints="/runs/x/checkpoints", reshuffle=True)
    np.testing.assert_array_equal(next(iterator)["image"], next(iter(_fake_loader()))["image"])


def test_a_checkpoint_from_before_per_process_states_resumes_the_same_data_order():
    """Checkpoints of earlier versions hold one process's state of grain's IndexSampler, whose stream
    GlobalOrderSampler reproduces: the resumed batches are those the old loader would have produced next."""
    import grain.python as grain

    from tests.test_input_pipeline import loader_kwargs, make_fake_source

    kwargs = loader_kwargs()
    old_loader = grain.DataLoader(
        data_source=make_fake_source(10),
        sampler=grain.IndexSampler(
            num_records=10, shard_options=grain.ShardOptions(0, 1, True), shuffle=True, num_epochs=None,
            seed=kwargs["seed"],
        ),
        operations=[kwargs["transform"], grain.Batch(batch_size=4, drop_remainder=True)],
        worker_count=0,
        shard_options=grain.ShardOptions(0, 1, True),
    )
    old = iter(old_loader)
    for _ in range(3):
        next(old)
    legacy = {"iterator": old.get_state().decode()}
    expected = [next(old)["image"] for _ in range(4)]
    resumed = iter(_fake_loader())
    training._restore_data_state(resumed, legacy, step=3, checkpoints="ckpt", reshuffle=False)
    for image in expected:
        np.testing.assert_array_equal(next(resumed)["image"], image)
