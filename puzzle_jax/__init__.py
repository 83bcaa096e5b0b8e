"""puzzle_jax: Puzzle-CAM weakly-supervised semantic segmentation in JAX/Flax NNX."""
