"""PyTorch reference networks for the parity tests (models, weights), built from the ``resnest`` package.

``resnest`` 0.0.5 is the official ResNeSt code; its ``ResNet`` with ``radix=0`` (and no deep stem, avg_down or
avd) is a plain torchvision-layout Bottleneck ResNet. The authors' ResNet backbone (layer4 stride 1 without
dilation) is obtained by patching conv strides, which changes no parameter.
"""

from __future__ import annotations

import numpy as np
import torch
from resnest.torch import resnest50, resnest101, resnest200, resnest269
from resnest.torch.resnet import Bottleneck, ResNet

torch.set_num_threads(2)

RESNEST_CONSTRUCTORS = {
    "resnest50": resnest50,
    "resnest101": resnest101,
    "resnest200": resnest200,
    "resnest269": resnest269,
}


def _set_conv2(block, stride: int, dilation: int) -> None:
    block.conv2.stride = (stride, stride)
    block.conv2.dilation = (dilation, dilation)
    block.conv2.padding = (dilation, dilation)


def torch_resnet(blocks=(3, 4, 6, 3), output_stride: int = 16, seed: int = 0) -> ResNet:
    """A torchvision-layout ResNet in eval mode, with the geometry ``puzzle_jax.models.resnet`` documents.

    OS32 is the network as built; OS16 sets layer4's first stride to 1 (the authors' backbone); OS8 also
    follows torchvision's ``replace_stride_with_dilation=[False, True, True]``.
    """
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, list(blocks), radix=0, deep_stem=False, avg_down=False, avd=False)
    if output_stride <= 16:
        _set_conv2(model.layer4[0], 1, 1)
        model.layer4[0].downsample[0].stride = (1, 1)
    if output_stride == 8:
        _set_conv2(model.layer3[0], 1, 1)
        model.layer3[0].downsample[0].stride = (1, 1)
        for block in model.layer3[1:]:
            _set_conv2(block, 1, 2)
        _set_conv2(model.layer4[0], 1, 2)
        for block in model.layer4[1:]:
            _set_conv2(block, 1, 4)
    randomize_batch_norm(model, seed)
    return model.eval()


def torch_resnest(arch: str, output_stride: int = 16, seed: int = 0) -> ResNet:
    """An official ResNeSt in eval mode, built as the authors build it for the given output stride."""
    torch.manual_seed(seed)
    geometry = {32: dict(dilated=False, dilation=1), 16: dict(dilated=False, dilation=2),
                8: dict(dilated=True, dilation=4)}[output_stride]
    model = RESNEST_CONSTRUCTORS[arch](pretrained=False, **geometry)
    randomize_batch_norm(model, seed)
    return model.eval()


def randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and running statistics, so that conversion mistakes show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)


def torch_stages(model: ResNet, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """The five stage outputs of a torch ResNet/ResNeSt, as NHWC numpy arrays."""
    outputs = {}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        outputs["stage1"] = x
        for index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
            x = layer(x)
            outputs[f"stage{index + 2}"] = x
    return {name: value.permute(0, 2, 3, 1).numpy() for name, value in outputs.items()}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def random_images(batch: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)
