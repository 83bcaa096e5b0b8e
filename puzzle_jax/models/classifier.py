"""The Puzzle-CAM classifier: a backbone plus a bias-free 1x1 convolution that produces the class maps.

The layout mirrors the authors' ``Classifier``: the backbone is the attribute ``model`` (its parameter paths start
with ``model``, like their state-dict keys ``model.*``) and the head is ``classifier`` (``classifier.weight``).
Only the ``with_cam=True`` forward is implemented, as every Puzzle-CAM training and evaluation path uses it;
the ``with_cam=False`` variant (GAP, then the 1x1 conv) gives the same logits because the head is linear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from puzzle_jax.models import layers


class Classifier(nnx.Module):
    """Backbone (``model``) + 1x1 conv head without bias (``classifier``), Kaiming-normal (fan_in) init."""

    def __init__(self, backbone: nnx.Module, num_classes: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Creates the classifier.

        Args:
          backbone: a module returning ``{"stage1": ..., "stage5": ...}`` and exposing ``out_features``
            (the channels of stage5).
          num_classes: number of foreground classes (20 for VOC).
          dtype: compute dtype of the head.
          rngs: random generators for the head initialisation.
        """
        self.num_classes = num_classes
        self.model = backbone
        # torch.nn.init.kaiming_normal_ defaults: fan_in, gain sqrt(2), untruncated normal.
        self.classifier = layers.Conv2d(
            backbone.out_features,
            num_classes,
            1,
            init_mode="fan_in",
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Computes logits and class maps.

        Args:
          images: (B, H, W, 3) normalised float images.

        Returns:
          ``(logits, class_maps)``: logits (B, C) float32 (float64 for a float64 model, as in the parity tests),
          the spatial mean of the class maps; class maps (B, h, w, C) in the compute dtype, the raw (pre-ReLU)
          1x1-conv outputs on stage5.
        """
        class_maps = self.classifier(self.model(images)["stage5"])
        logits = jnp.mean(class_maps.astype(jnp.promote_types(class_maps.dtype, jnp.float32)), axis=(1, 2))
        return logits, class_maps
