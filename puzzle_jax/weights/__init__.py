"""PyTorch weights for the NNX models: official ResNeSt, torchvision ResNet, the authors' checkpoints."""

from puzzle_jax.weights.convert import WeightLoadingError, load_torch_weights, read_state_dict

__all__ = ["WeightLoadingError", "load_torch_weights", "read_state_dict"]
