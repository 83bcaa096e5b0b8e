"""Training-dynamics parity: our Puzzle-CAM step against the PyTorch transcription of the authors' step.

Both start from the same converted weights (``load_torch_weights`` of the torch model's state dict) and see the
same batches: our train loader (``input_pipeline.ClassifierAugmentation``) draws them from a small synthetic split;
our step gets its uint8 crops and boxes (normalised on the device), the torch step the same crops normalised on
the host (``transforms.normalize_image``, what ``train_transform`` does). Ours is ``training.make_train_step`` with
``objectives.create_puzzle_objective`` and ``optim.create_optimizer`` on one device with
``bn_mode="global"`` (torch's BatchNorm over the batch); theirs is ``authors_torch.create_puzzle_train_step``:
their tiling, losses, alpha ramp over the 30-step schedule, ``PolyOptimizer`` with their momentum quirk, and
train-mode BatchNorm whose running statistics are updated by the full pass, then by the tiled pass. Compared after
every step: every loss term (class, puzzle class, reconstruction, alpha, total), every parameter and every
BatchNorm running statistic.

* ResNet-tiny (our ``resnet_tiny``: one block per layer, base width 16), 64x64 crops, batch 4: 30 free-running
  steps of each, for ``cl_pcl_re`` with the authors' momentum (float64 and float32) and for ``cl`` with the
  standard momentum (float64), and the learning rates of the parameter groups in the first update.
* ResNet-50, 32x32 crops, batch 2, float64, ``cl_pcl_re``: before each step ours is set to torch's parameters and
  running statistics (``_resynchronised_run``), because a free-running random-initialised ResNet-50 is chaotic
  with BatchNorm over so few values: in torch alone, a 1e-13 relative perturbation of the weights grows ~1000x per
  step (to O(1) by step 3 or 4 at learning rates from 3e-4 down to 1e-5; still ~30x per step at 64x64, batch 4).
  The test runs the first ``RESNET50_STEPS`` steps of the 30-step schedule (torch's float64 ResNet-50 takes
  seconds per step on a CPU); all 30 measured 1.5e-10 at worst.

Tolerances and why:

* float64 on both sides (``jax.enable_x64``, a float64 model, ``model.double()``) is the exact check of the
  semantics: every loss term within ``FLOAT64_TOLERANCE`` (relative) and every tensor's *displacement* from its
  initial value (what the steps did to it) within ``FLOAT64_TOLERANCE`` of torch's, relative to its largest entry.
  Measured: <= 1e-11 for the losses and <= 4e-11 for the displacements, over the 30 steps. The displacement is
  the strict measure: the authors' momentum (1e-4) moves it by 1e-4, the weight decay of the BN scales by ~1e-3,
  a learning-rate multiplier or a step of the schedule or of the alpha ramp by >= 1e-2.
* The learning rate is ``LEARNING_RATE`` (3e-4; head 3e-3), not the authors' 0.1: from random weights on
  synthetic images their recipe is chaotic too: at 0.1, float64 rounding differences alone grow to O(1) by step
  10, and in torch alone a 1e-13 relative perturbation of ResNet-tiny's weights does so within 12 steps at 1e-2
  (``cl_pcl_re``), so no two implementations could be compared past a few steps there; at 3e-4 rounding-level
  noise stays at rounding level over the 30 steps. The learning rate is a factor of every update, which the group
  check pins down.
* float32 cannot be held to a fixed bound over 30 steps: float32 parameters do not keep all of a small update, and
  rounding flips near-ties of max pooling and ReLU, which changes the gradients by discrete amounts; the
  differences then grow with the steps, in torch's own float32 run as in ours (both ~1e-2 relative L2 after 30
  steps, from ~1e-7 after one). So: the first step's loss terms and running statistics (a forward pass from the
  same float32 weights, continuous in the rounding) within ``FLOAT32_FIRST_STEP`` (measured 2e-7; a precision slip
  such as bfloat16 somewhere gives ~1e-3), and over the 30 steps our float32 run no further from torch's float64
  run than ``FLOAT32_FACTOR`` times the furthest that torch's own float32 run gets, plus ``FLOAT32_FLOOR`` (one
  flipped tie); the two runs' ratio measured 0.9 to 3.4.
"""

from __future__ import annotations

import contextlib
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import (
    nnx_tree_from_torch_layout,
    nnx_variables_in_torch_layout,
    torch_classifier,
    torch_variables,
)

from benchmarks import authors_torch
from configs import default
from puzzle_jax import models, objectives, optim, sharding, training
from puzzle_jax.data import input_pipeline, transforms
from puzzle_jax.weights import load_torch_weights

NUM_CLASSES = 5
STEPS = 30
OUTPUT_STRIDE = 16
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 1e-4
FLOAT64_TOLERANCE = 1e-9
FLOAT32_FIRST_STEP = 1e-6
FLOAT32_FACTOR = 5.0
FLOAT32_FLOOR = 1e-4
RESNET50_STEPS = 3
LOSS_TERMS = ("class_loss", "puzzle_class_loss", "reconstruction_loss", "alpha", "loss")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


class _SyntheticSource:
    """A small split with the record layout of ``data.datasets``: noise images of 40..95 px per side (some smaller
    than the crops, so that their crops have a zero canvas) with a flat-coloured rectangle per present class; at
    least one of ``NUM_CLASSES`` classes per image, two on average, so that the masked reconstruction loss has
    absent classes."""

    def __init__(self, count: int = 32, seed: int = 0):
        rng = np.random.default_rng(seed)
        colours = rng.integers(0, 256, (NUM_CLASSES, 3))
        self.records = []
        for index in range(count):
            height, width = (int(side) for side in rng.integers(40, 96, 2))
            image = rng.integers(60, 196, (height, width, 3)).astype(np.uint8)
            labels = (rng.random(NUM_CLASSES) < 0.35).astype(np.float32)
            labels[index % NUM_CLASSES] = 1
            for label in np.flatnonzero(labels):
                top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
                image[top : top + height // 2, left : left + width // 2] = colours[label]
            self.records.append({"image": image, "labels": labels})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def __repr__(self) -> str:  # grain reads the source's repr
        return f"_SyntheticSource({len(self.records)})"


def _batches(batch_size: int, crop_size: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``STEPS`` batches of our train loader, each with the host-normalised float32 images of its crops.

    Returns:
      ``(loader batch, images)`` pairs: the batch as our step receives it (uint8 crops, boxes, labels) and the
      (B, H, W, 3) normalised images that ``transforms.train_transform`` would have produced from the same draws.
    """
    transform = input_pipeline.ClassifierAugmentation(
        crop_size=crop_size, rescale_range=(crop_size * 3 // 4, crop_size * 3 // 2)
    )
    loader = input_pipeline.create_train_loader(
        _SyntheticSource(), transform=transform, global_batch_size=batch_size, seed=0
    )
    iterator = iter(loader)
    batches = []
    for _ in range(STEPS):
        batch = next(iterator)
        images = np.zeros(batch["image"].shape, np.float32)
        for index, (top, left, height, width) in enumerate(batch["image_box"]):
            window = (index, slice(top, top + height), slice(left, left + width))
            transforms.normalize_image(batch["image"][window], out=images[window])
        batches.append((batch, images))
    return batches


def _cam_section(loss_option: str, level: str = "feature"):
    """The default config's (the paper's) Puzzle-CAM settings with ``loss_option`` and ``level``."""
    cam = default.get_config().cam
    cam.loss_option = loss_option
    cam.level = level
    return cam


# --------------------------------------------------------------------------------------------------
# The two steps
# --------------------------------------------------------------------------------------------------


class _OurStep:
    """Our jitted step on one device, from ``reference``'s converted weights, in float32 or float64."""

    def __init__(
        self,
        arch: str,
        reference: torch.nn.Module,
        loss_option: str,
        *,
        momentum_mode: str,
        float64: bool,
        level: str = "feature",
    ):
        self.float64 = float64
        with jax.enable_x64(float64):
            dtype = jnp.float64 if float64 else jnp.float32
            model = nnx.eval_shape(
                lambda: models.create_classifier(
                    arch, NUM_CLASSES, bn_mode="global", dtype=dtype, rngs=nnx.Rngs(0)
                )
            )
            load_torch_weights(model, reference.state_dict(), arch=arch)
            if float64:
                # The converter stores float32; the same values, widened, are torch's .double().
                nnx.update(model, jax.tree.map(lambda value: jnp.asarray(value, jnp.float64), nnx.state(model)))
            model.train()
            self.mesh = sharding.create_mesh(1)
            _, params, _ = training.split_model(model)
            optimizer = optim.create_optimizer(
                params,
                learning_rate=LEARNING_RATE,
                weight_decay=WEIGHT_DECAY,
                total_steps=STEPS,
                momentum_mode=momentum_mode,
            )
            objective = objectives.create_puzzle_objective(_cam_section(loss_option, level), STEPS, OUTPUT_STRIDE)
            graphdef, self.state = training.create_train_state(model, optimizer, self.mesh)
            self.train_step = training.make_train_step(graphdef, optimizer, objective, self.mesh)

    def __call__(self, batch: dict[str, np.ndarray], images: np.ndarray) -> dict[str, float]:
        del images  # ours normalises the uint8 crops on the device
        with jax.enable_x64(self.float64):
            self.state, metrics = self.train_step(self.state, sharding.host_batch_to_global(batch, self.mesh))
        return {name: float(value) for name, value in jax.device_get(metrics).items() if name in LOSS_TERMS}

    def variables(self) -> dict[str, np.ndarray]:
        state = jax.device_get(self.state)
        return nnx_variables_in_torch_layout(state.params, state.batch_stats)

    def load(self, variables: dict[str, np.ndarray]) -> None:
        """Sets the parameters and running statistics to ``variables`` (torch layout); the optimizer state (the
        momentum buffers) and the step count stay ours."""
        with jax.enable_x64(self.float64):
            params = nnx_tree_from_torch_layout(self.state.params, variables)
            batch_stats = nnx_tree_from_torch_layout(self.state.batch_stats, variables)
            self.state = self.state.replace(
                params=sharding.replicate(params, self.mesh), batch_stats=sharding.replicate(batch_stats, self.mesh)
            )


class _TorchStep:
    """``authors_torch.create_puzzle_train_step`` on a copy of ``reference``, in float32 or float64."""

    def __init__(
        self,
        reference: torch.nn.Module,
        loss_option: str,
        *,
        momentum: str,
        float64: bool,
        batch_size: int,
        always_tile: bool = True,
        level: str = "feature",
    ):
        self.dtype = torch.float64 if float64 else torch.float32
        self.model = copy.deepcopy(reference).to(self.dtype)
        optimizer = authors_torch.create_optimizer(
            self.model, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_step=STEPS, momentum=momentum
        )
        self.train_step = authors_torch.create_puzzle_train_step(
            self.model, optimizer, _cam_section(loss_option, level), max_step=STEPS, batch_size=batch_size,
            always_tile=always_tile,
        )

    def __call__(self, batch: dict[str, np.ndarray], images: np.ndarray) -> dict[str, float]:
        nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.dtype)
        metrics = self.train_step(nchw, torch.from_numpy(batch["labels"]).to(self.dtype))
        return {name: float(value) for name, value in metrics.items()}

    def variables(self) -> dict[str, np.ndarray]:
        return torch_variables(self.model)

    def gradients(self) -> dict[str, np.ndarray]:
        """The gradients of the last step (their step zeroes them at its start, not its end)."""
        return {name: p.grad.detach().numpy().astype(np.float64) for name, p in self.model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Error measures
# --------------------------------------------------------------------------------------------------


def _displacement_error(actual, expected, actual_start, expected_start) -> float:
    """max |(a - a0) - (b - b0)| / max |b - b0|: the error of what the steps did to a tensor."""
    expected_move = expected - expected_start
    return float(np.max(np.abs(actual - actual_start - expected_move)) / max(np.max(np.abs(expected_move)), 1e-300))


def _l2_error(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


def _deviation(metrics, expected_metrics, variables, expected_variables, start=None, expected_start=None) -> dict:
    """The worst relative error of the loss terms, of the parameters and of the BN running statistics.

    With ``start``/``expected_start`` (the initial variables) tensors are compared by displacement, otherwise by
    relative L2 error. Loss terms are compared where both steps report them.
    """
    terms = {
        name: abs(metrics[name] - expected_metrics[name]) / max(abs(expected_metrics[name]), 1e-30)
        for name in metrics
        if name in expected_metrics
    }
    tensors = {}
    for key, expected in expected_variables.items():
        if start is None:
            tensors[key] = _l2_error(variables[key], expected)
        else:
            tensors[key] = _displacement_error(variables[key], expected, start[key], expected_start[key])
    return {
        "losses": max(terms.values()),
        "terms": terms,
        "params": max(error for key, error in tensors.items() if "running_" not in key),
        "batch_stats": max(error for key, error in tensors.items() if "running_" in key),
    }


def _run_in_lockstep(runners: dict, batches, compare) -> list:
    """Runs every step of each runner on each batch, then ``compare(step, metrics, variables, starts)``; returns
    what ``compare`` returned, per step. Only the initial variables are kept, so a ResNet-50 fits in memory."""
    starts = {name: runner.variables() for name, runner in runners.items()}
    records = []
    for step, (batch, images) in enumerate(batches):
        metrics = {name: runner(batch, images) for name, runner in runners.items()}
        variables = {name: runner.variables() for name, runner in runners.items()}
        records.append(compare(step, metrics, variables, starts))
    return records


def _resynchronised_run(
    arch: str, loss_option: str, *, momentum: str, batch_size: int, crop_size: int, steps: int = STEPS
) -> list[dict]:
    """Our float64 step and torch's, where before each step ours is set to torch's parameters and running
    statistics: every step of the 30-step schedule (its learning rate, alpha, our own momentum buffers) from the
    same start, so that the chaos of a free-running ResNet-50 (module docstring) cannot hide or fake a difference.

    Returns:
      Per step, our deviation from torch's step, the tensors compared by their displacement over that step.
    """
    batches = _batches(batch_size=batch_size, crop_size=crop_size)[:steps]
    reference = torch_classifier(arch, NUM_CLASSES)
    ours = _OurStep(arch, reference, loss_option, momentum_mode=momentum, float64=True)
    theirs = _TorchStep(reference, loss_option, momentum=momentum, float64=True, batch_size=batch_size)
    records = []
    for batch, images in batches:
        start = theirs.variables()
        ours.load(start)
        metrics, expected_metrics = ours(batch, images), theirs(batch, images)
        records.append(_deviation(metrics, expected_metrics, ours.variables(), theirs.variables(), start, start))
    return records


# --------------------------------------------------------------------------------------------------
# Runs (module-scoped: several tests read one run)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(count: int):
    """Torch on ``count`` threads for the block: on a busy machine a tiny network's steps take 30x longer on two
    OpenMP threads than on one (the threads wait for each other whenever a core is taken away)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _puzzle_run(
    arch: str = "resnet_tiny", *, batch_size: int = 4, crop_size: int = 64, steps: int = STEPS, float32: bool = True
) -> dict:
    """``cl_pcl_re`` (the paper's objective) with the authors' momentum: our float64 step and torch's float64 step
    (and with ``float32`` both float32 steps), the first ``steps`` steps of the 30-step schedule in lockstep.

    Returns:
      ``records``: per step, the deviations from torch's float64 step of our float64 step (``float64``, by
      displacement), of our float32 step (``ours32``) and of torch's (``torch32``), both by relative L2 error,
      and the loss names our step reported; ``first_step``: torch's float64 gradients and initial variables and
      our float64 first update, for the learning-rate groups.
    """
    batches = _batches(batch_size=batch_size, crop_size=crop_size)[:steps]
    reference = torch_classifier(arch, NUM_CLASSES)
    runners = {
        "torch64": _TorchStep(reference, "cl_pcl_re", momentum="authors", float64=True, batch_size=batch_size),
        "ours64": _OurStep(arch, reference, "cl_pcl_re", momentum_mode="authors", float64=True),
    }
    if float32:
        runners["torch32"] = _TorchStep(
            reference, "cl_pcl_re", momentum="authors", float64=False, batch_size=batch_size
        )
        runners["ours32"] = _OurStep(arch, reference, "cl_pcl_re", momentum_mode="authors", float64=False)
    first_step = {}

    def compare(step, metrics, variables, starts):
        if step == 0:
            first_step.update(
                start=starts["torch64"],
                gradients=runners["torch64"].gradients(),
                ours_update={key: variables["ours64"][key] - starts["ours64"][key] for key in starts["ours64"]},
            )
        truth, truth_variables = metrics["torch64"], variables["torch64"]
        record = {
            "metric_names": set(metrics["ours64"]),
            "float64": _deviation(
                metrics["ours64"], truth, variables["ours64"], truth_variables, starts["ours64"], starts["torch64"]
            ),
        }
        for name in ("ours32", "torch32") if float32 else ():
            record[name] = _deviation(metrics[name], truth, variables[name], truth_variables)
        return record

    return {"records": _run_in_lockstep(runners, batches, compare), "first_step": first_step}


def _plain_cam_run(arch: str = "resnet_tiny", *, batch_size: int = 4, crop_size: int = 64) -> list[dict]:
    """``cl`` (plain CAM) with the standard momentum (0.9): our float64 step and torch's float64 step with the
    authors' tiled pass and without it, 30 steps in lockstep.

    Returns:
      Per step: our deviations (by displacement) from the torch step without the tiled pass (``vs_untiled``) and
      from the authors' (``vs_authors``), and whether the two torch steps' losses and parameters are equal.
    """
    batches = _batches(batch_size=batch_size, crop_size=crop_size)
    reference = torch_classifier(arch, NUM_CLASSES)
    runners = {
        "ours": _OurStep(arch, reference, "cl", momentum_mode="standard", float64=True),
        "authors": _TorchStep(reference, "cl", momentum="standard", float64=True, batch_size=batch_size),
        "untiled": _TorchStep(
            reference, "cl", momentum="standard", float64=True, batch_size=batch_size, always_tile=False
        ),
    }

    def compare(step, metrics, variables, starts):
        del step
        ours = (metrics["ours"], variables["ours"])
        return {
            "vs_untiled": _deviation(
                ours[0], metrics["untiled"], ours[1], variables["untiled"], starts["ours"], starts["untiled"]
            ),
            "vs_authors": _deviation(
                ours[0], metrics["authors"], ours[1], variables["authors"], starts["ours"], starts["authors"]
            ),
            "torch_losses_equal": metrics["authors"]["loss"] == metrics["untiled"]["loss"],
            "torch_params_equal": all(
                np.array_equal(variables["authors"][key], variables["untiled"][key])
                for key in variables["authors"]
                if "running_" not in key
            ),
        }

    return _run_in_lockstep(runners, batches, compare)


@pytest.fixture(scope="module", name="puzzle_records")
def _puzzle_records():
    with _torch_threads(1):
        return _puzzle_run()


@pytest.fixture(scope="module", name="plain_cam_records")
def _plain_cam_records():
    with _torch_threads(1):
        return _plain_cam_run()


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_both_steps_see_the_same_images_and_the_batches_exercise_the_masking_and_the_canvas():
    """Our step's device normalisation of the loader's uint8 crops gives the torch step's host-normalised images
    bit for bit; the batches hold crops with a zero canvas and labels with absent classes."""
    batches = _batches(batch_size=4, crop_size=64)
    for batch, images in batches:
        device_images = transforms.normalize_crops(jnp.asarray(batch["image"]), jnp.asarray(batch["image_box"]))
        np.testing.assert_array_equal(np.asarray(device_images), images)
    boxes = np.concatenate([batch["image_box"] for batch, _ in batches])
    labels = np.concatenate([batch["labels"] for batch, _ in batches])
    assert np.any(boxes[:, 2:] < 64) and np.any(boxes[:, 2:] == 64)
    assert np.all(labels.sum(axis=1) >= 1) and np.any(labels.sum(axis=1) < NUM_CLASSES)


@pytest.mark.slow
def test_float64_puzzle_steps_follow_the_authors_step(puzzle_records):
    """Every loss term, parameter and running statistic after each of the 30 steps, in float64."""
    records = puzzle_records["records"]
    assert records[0]["metric_names"] == set(LOSS_TERMS)
    for step, record in enumerate(records, start=1):
        deviation = record["float64"]
        for name, error in deviation["terms"].items():
            assert error <= FLOAT64_TOLERANCE, (step, name, error)
        assert deviation["params"] <= FLOAT64_TOLERANCE, (step, deviation["params"])
        assert deviation["batch_stats"] <= FLOAT64_TOLERANCE, (step, deviation["batch_stats"])


@pytest.mark.slow
def test_learning_rate_groups_in_the_first_update(puzzle_records):
    """The first update of every parameter is the authors' rule applied to torch's gradients: ``-lr x multiplier x
    (1 + momentum) x (gradient + decay x parameter)`` with the multipliers 1 (backbone weights, BN scales included),
    2 (backbone biases), 10 (head weights), weight decay on weights only, and Nesterov's first step (the buffer is
    the gradient, the authors' momentum is the weight decay). The groups are named here from the torch names as
    their ``get_parameter_groups`` names them, independently of ``optim``'s path rules. (The classifier has no
    scratch bias: the 20x group is ``test_optim``'s.)"""
    first_step = puzzle_records["first_step"]
    multipliers = {}
    for key, gradient in first_step["gradients"].items():
        pretrained, weight = "model" in key, "weight" in key
        multiplier = (1 if pretrained else 10) * (1 if weight else 2)
        decay = WEIGHT_DECAY if weight else 0.0
        expected = -LEARNING_RATE * multiplier * (1 + WEIGHT_DECAY) * (gradient + decay * first_step["start"][key])
        actual = first_step["ours_update"][key]
        error = float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
        assert error <= FLOAT64_TOLERANCE, (key, error)
        multipliers.setdefault(multiplier, []).append(key)
    assert sorted(multipliers) == [1, 2, 10]
    assert multipliers[10] == ["classifier.weight"]
    assert "model.bn1.weight" in multipliers[1] and "model.bn1.bias" in multipliers[2]


@pytest.mark.slow
def test_float32_puzzle_steps_are_as_close_as_torchs_own_float32(puzzle_records):
    """Our float32 run against torch's float64 run, with the bounds of the module docstring: the first step's loss
    terms and running statistics (a forward pass from the same float32 weights) within ``FLOAT32_FIRST_STEP``,
    then every loss term, parameter and running statistic over the 30 steps no further from torch's float64 run
    than ``FLOAT32_FACTOR`` times the furthest that torch's own float32 run gets, plus ``FLOAT32_FLOOR``."""
    records = puzzle_records["records"]
    first = records[0]["ours32"]
    assert first["losses"] <= FLOAT32_FIRST_STEP and first["batch_stats"] <= FLOAT32_FIRST_STEP, first
    for part in ("losses", "params", "batch_stats"):
        ours = max(record["ours32"][part] for record in records)
        torch_own = max(record["torch32"][part] for record in records)
        assert ours <= FLOAT32_FACTOR * torch_own + FLOAT32_FLOOR, (part, ours, torch_own)


@pytest.mark.slow
def test_plain_cam_runs_no_tiled_pass_which_changes_only_batch_norm_statistics(plain_cam_records):
    """For ``cl`` our objective skips the tiled pass that the authors' script runs anyway. Train-mode BatchNorm
    normalises with the batch statistics, so that pass changes neither the losses nor the gradients: our losses
    and parameters follow the authors' step, our running statistics follow a torch step without the tiled pass
    and differ from the authors' (whose statistics also took in the tiles)."""
    for step, record in enumerate(plain_cam_records, start=1):
        assert record["torch_losses_equal"] and record["torch_params_equal"], step
        for name in ("vs_untiled", "vs_authors"):
            assert record[name]["losses"] <= FLOAT64_TOLERANCE, (step, name, record[name]["terms"])
            assert record[name]["params"] <= FLOAT64_TOLERANCE, (step, name, record[name]["params"])
        assert record["vs_untiled"]["batch_stats"] <= FLOAT64_TOLERANCE, (step, record["vs_untiled"]["batch_stats"])
        # The tiled pass's update moves the authors' statistics by tens of percent more (measured 0.24 to 0.55).
        assert record["vs_authors"]["batch_stats"] > 0.1, (step, record["vs_authors"]["batch_stats"])


@pytest.mark.slow
def test_resnet50_puzzle_steps_follow_the_authors_step():
    """The paper's objective on ResNet-50, float64, each step from torch's state (``_resynchronised_run``). The
    first steps of the 30-step schedule only, at 32x32 with batch 2, for the time of a CPU test run (torch's
    float64 ResNet-50 takes seconds per step); the tiny network covers the 30 steps."""
    with _torch_threads(2):
        records = _resynchronised_run(
            "resnet50", "cl_pcl_re", momentum="authors", batch_size=2, crop_size=32, steps=RESNET50_STEPS
        )
    for step, deviation in enumerate(records, start=1):
        assert deviation["losses"] <= FLOAT64_TOLERANCE, (step, deviation["terms"])
        assert deviation["params"] <= FLOAT64_TOLERANCE, (step, deviation["params"])
        assert deviation["batch_stats"] <= FLOAT64_TOLERANCE, (step, deviation["batch_stats"])


@pytest.mark.slow
def test_cam_level_normalises_the_maps_of_both_puzzle_terms_as_the_authors():
    """``cam.level="cam"``: the authors normalise the full and the merged maps (``make_cam``) before both the
    reconstruction and the puzzle class loss (the mean of the normalised merged maps); 10 float64 steps agree."""
    with _torch_threads(1):
        batches = _batches(batch_size=4, crop_size=64)[:10]
        reference = torch_classifier("resnet_tiny", NUM_CLASSES)
        runners = {
            "ours": _OurStep("resnet_tiny", reference, "cl_pcl_re", momentum_mode="authors", float64=True, level="cam"),
            "torch": _TorchStep(
                reference, "cl_pcl_re", momentum="authors", float64=True, batch_size=4, level="cam"
            ),
        }

        def compare(step, metrics, variables, starts):
            del step
            return _deviation(
                metrics["ours"], metrics["torch"], variables["ours"], variables["torch"], starts["ours"],
                starts["torch"],
            )

        records = _run_in_lockstep(runners, batches, compare)
    for step, deviation in enumerate(records, start=1):
        for name, error in deviation["terms"].items():
            assert error <= FLOAT64_TOLERANCE, (step, name, error)
        assert deviation["params"] <= FLOAT64_TOLERANCE and deviation["batch_stats"] <= FLOAT64_TOLERANCE, step
