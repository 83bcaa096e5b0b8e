"""The pipeline's losses, as the authors' code computes them (spec §3, §9).

Owns, in pure jnp, the multi-label soft-margin classification loss, the puzzle reconstruction loss
(L1/L2 with the ``masking`` / ``selection`` / ``none`` reductions), ``make_cam`` (max-normalised
CAMs), the ramp of the reconstruction weight alpha, the parsing of ``cam.loss_option``, and the
segmenter's pixel cross-entropy with ignored pixels.

Conventions: class maps are NHWC ``(B, h, w, num_classes)``; labels are multi-hot
``(B, num_classes)`` with values in {0, 1}. Every function is jit-friendly (no Python branching on
array values).
"""

import jax
import jax.numpy as jnp

from puzzle_jax.labels import IGNORE_LABEL

# Which terms enter the classifier loss: cl = class loss on the full images, pcl = class loss on the
# merged tile maps, re = reconstruction loss. The authors' conf variants are deliberately not ported
# (off by default, not in the paper, spec §3).
LOSS_OPTIONS = ("cl", "cl_pcl", "cl_re", "cl_pcl_re")

RECONSTRUCTION_NORMS = ("l1", "l2")
RECONSTRUCTION_OPTIONS = ("masking", "selection", "none")


def parse_loss_option(name: str) -> tuple[bool, bool]:
    """Decodes a ``cam.loss_option`` name into which optional terms are on.

    Args:
      name: one of ``LOSS_OPTIONS``.

    Returns:
      ``(use_pcl, use_re)``: whether the puzzle classification loss and the reconstruction loss are
      used.

    Raises:
      ValueError: for any other name.
    """
    if name not in LOSS_OPTIONS:
        raise ValueError(
            f"Unknown cam.loss_option {name!r}; allowed values are {', '.join(LOSS_OPTIONS)}."
        )
    return "pcl" in name.split("_"), "re" in name.split("_")


def pixel_cross_entropy(logits: jax.Array, label_maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """torch ``CrossEntropyLoss(ignore_index=255)`` (mean over the labelled pixels) on ``(B, H, W, C)`` logits.

    Deviation, harmless: a batch without a labelled pixel gives 0 and no gradient, where torch gives NaN.

    Args:
      logits: ``(B, H, W, C)`` class scores.
      label_maps: ``(B, H, W)`` integer labels in ``[0, C)``, or ``IGNORE_LABEL`` (255: void borders, uncertain
        pseudo-label pixels, crop padding).

    Returns:
      ``(loss, labelled)``: the scalar loss and the number of labelled pixels.
    """
    label_maps = label_maps.astype(jnp.int32)
    labelled = label_maps != IGNORE_LABEL
    log_probabilities = jax.nn.log_softmax(logits, axis=-1)
    safe_labels = jnp.where(labelled, label_maps, 0)
    picked = jnp.take_along_axis(log_probabilities, safe_labels[..., None], axis=-1)[..., 0]
    count = jnp.sum(labelled)
    loss = -jnp.sum(jnp.where(labelled, picked, 0.0)) / jnp.maximum(count, 1).astype(logits.dtype)
    return loss, count


def multilabel_soft_margin_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """torch ``MultiLabelSoftMarginLoss`` (mean reduction) on ``(B, num_classes)`` logits.

    ``-mean_c[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` per sample, then the batch mean.
    Written with ``log_sigmoid`` so large logits do not produce ``log(0)``.

    Args:
      logits: ``(B, num_classes)`` class scores.
      labels: ``(B, num_classes)`` multi-hot targets.

    Returns:
      Scalar loss.
    """
    labels = labels.astype(logits.dtype)
    per_class = labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits)
    return -jnp.mean(jnp.mean(per_class, axis=-1))


def reconstruction_loss(
    features: jax.Array,
    reconstructed: jax.Array,
    labels: jax.Array,
    *,
    norm: str = "l1",
    option: str = "masking",
) -> jax.Array:
    """Puzzle reconstruction loss between full-image and merged-tile class maps (spec §3).

    No stop-gradient on either branch, as in the authors' code: both passes are pulled together.

    Args:
      features: ``(B, h, w, num_classes)`` class maps of the full images.
      reconstructed: ``(B, h, w, num_classes)`` merged class maps of the tiles.
      labels: ``(B, num_classes)`` multi-hot image labels.
      norm: ``"l1"`` (elementwise ``|a - b|``) or ``"l2"`` (elementwise ``(a - b)**2``).
      option: how to reduce the elementwise error:
        ``"masking"`` (README setting): zero the maps of absent classes, then the mean over **all**
        ``B * h * w * num_classes`` elements (absent classes add zeros to the denominator).
        ``"selection"``: per sample, the mean over the maps of its present classes only, then the
        mean over the batch. A sample without any class (which the authors' code turns into NaN)
        contributes 0 and still counts in the batch denominator, so the loss stays finite and its
        gradient is 0 there. ``"none"``: the plain mean over all elements.

    Returns:
      Scalar loss.

    Raises:
      ValueError: for an unknown ``norm`` or ``option``, or mismatched shapes.
    """
    if norm not in RECONSTRUCTION_NORMS:
        raise ValueError(
            f"Unknown reconstruction norm {norm!r}; allowed values are "
            f"{', '.join(RECONSTRUCTION_NORMS)}."
        )
    if option not in RECONSTRUCTION_OPTIONS:
        raise ValueError(
            f"Unknown reconstruction option {option!r}; allowed values are "
            f"{', '.join(RECONSTRUCTION_OPTIONS)}."
        )
    if features.shape != reconstructed.shape:
        raise ValueError(
            f"features {tuple(features.shape)} and reconstructed {tuple(reconstructed.shape)} "
            "must have the same shape (B, h, w, num_classes)."
        )
    if labels.shape != (features.shape[0], features.shape[-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match features {tuple(features.shape)}; "
            "expected (B, num_classes)."
        )
    difference = features - reconstructed
    error = jnp.abs(difference) if norm == "l1" else jnp.square(difference)
    if option == "none":
        return jnp.mean(error)
    class_mask = labels.astype(error.dtype)[:, None, None, :]
    if option == "masking":
        return jnp.mean(error * class_mask)
    # selection
    height, width = error.shape[1], error.shape[2]
    per_sample_sum = jnp.sum(error * class_mask, axis=(1, 2, 3))
    per_sample_count = jnp.sum(labels.astype(error.dtype), axis=-1) * (height * width)
    # Guard the division so that a class-free sample gives 0 (not 0/0) in value and gradient.
    safe_count = jnp.where(per_sample_count > 0, per_sample_count, 1.0)
    per_sample_mean = jnp.where(per_sample_count > 0, per_sample_sum / safe_count, 0.0)
    return jnp.mean(per_sample_mean)


def make_cam(class_maps: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """Max-normalised CAMs, the authors' ``make_cam`` (spec §3 ``--level cam``), NHWC.

    ``x = relu(maps)``; each ``(b, c)`` map becomes ``relu(x - epsilon) / (max_hw(x) + epsilon)``.
    The shift by ``epsilon`` zeroes tiny activations and the ``+ epsilon`` keeps an all-zero map at
    0 instead of 0/0. Values lie in [0, 1).

    Args:
      class_maps: ``(B, h, w, num_classes)`` raw class maps.
      epsilon: the authors' 1e-5.

    Returns:
      ``(B, h, w, num_classes)`` normalised CAMs.
    """
    activations = jax.nn.relu(class_maps)
    spatial_max = jnp.max(activations, axis=(1, 2), keepdims=True)
    return jax.nn.relu(activations - epsilon) / (spatial_max + epsilon)


def alpha_at_step(
    step: jax.Array | int, total_steps: int, alpha: float, ramp_fraction: float
) -> jax.Array:
    """Weight of the reconstruction loss at a step: a linear ramp, then constant (spec §3).

    ``alpha_t = min(alpha * step / (total_steps * ramp_fraction), alpha)`` with ``step`` counted
    from 0 over the whole run; ``ramp_fraction == 0`` means a constant ``alpha``.

    Args:
      step: 0-based training step; a Python int or a (traced) integer array.
      total_steps: number of steps of the run.
      alpha: final weight (README 4.0).
      ramp_fraction: fraction of the run spent ramping (the authors' ``--alpha_schedule``, 0.5).

    Returns:
      Scalar weight: float32, or float64 under ``jax.enable_x64`` (the float64 parity tests).

    Raises:
      ValueError: if ``ramp_fraction`` is negative or ``total_steps`` is not positive.
    """
    if ramp_fraction < 0:
        raise ValueError(f"ramp_fraction must be >= 0, got {ramp_fraction!r}.")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps!r}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    alpha_value = jnp.asarray(alpha, dtype)
    if ramp_fraction == 0:
        return alpha_value
    ramp_steps = float(total_steps) * float(ramp_fraction)
    ramped = alpha_value * jnp.asarray(step, dtype) / jnp.asarray(ramp_steps, dtype)
    return jnp.minimum(ramped, alpha_value)
