"""The authors' PyTorch Puzzle-CAM, transcribed once: the reference the benchmarks time and the parity tests match.

Owns the PyTorch side of every comparison with the authors' code (shjo-april/PuzzleCAM): their backbones, built
from the official ``resnest`` 0.0.5 package (the code the authors vendored) for every output stride, their
``Classifier`` (``core/networks.py``) with the ``stage1``..``stage5`` aliases of their checkpoints, their
``AffinityNet`` edge branch (``core/networks.py``, IRNet's boundary branch), their
``tile_features``/``merge_features`` (``core/puzzle_utils.py``), ``make_cam`` and the L1/L2 maps
(``tools/ai/torch_utils.py``), their ``PolyOptimizer`` and parameter groups, and one iteration of
``train_classification_with_puzzle.py``. ``benchmarks/bench.py`` times it next to our JAX step;
``tests/torch_reference.py`` builds the parity tests' reference networks from it.

Nothing here imports ``puzzle_jax``: the reference must not share code with what it checks. Images are NCHW
tensors, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as functional
from resnest.torch import resnest50, resnest101, resnest200, resnest269
from resnest.torch.resnet import Bottleneck, ResNet
from torch import nn

# Blocks per layer of the ResNets. ``resnet_tiny`` (smoke tests only) keeps the full widths with one block per
# layer, so it is *not* the same network as our ``resnet_tiny`` and a speed ratio against it means nothing.
RESNET_BLOCKS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet_tiny": (1, 1, 1, 1),
}
RESNEST_CONSTRUCTORS = {
    "resnest50": resnest50,
    "resnest101": resnest101,
    "resnest200": resnest200,
    "resnest269": resnest269,
}
ARCHITECTURES = (*RESNET_BLOCKS, *RESNEST_CONSTRUCTORS)
OUTPUT_STRIDES = (8, 16, 32)
# The constructor arguments of the official ResNeSt for each output stride. The authors pass
# ``dilated=False, dilation=2`` (OS16, their classifiers) or ``dilated=True, dilation=4`` (OS8, their
# ``segmentation=True`` backbone).
RESNEST_GEOMETRY = {
    32: dict(dilated=False, dilation=1),
    16: dict(dilated=False, dilation=2),
    8: dict(dilated=True, dilation=4),
}
# Their train_classification_with_puzzle.py's --loss_option values that this transcription covers (``conf``, an
# entropy term on the tiled logits, is not part of Puzzle-CAM's recipe).
LOSS_OPTIONS = ("cl", "cl_pcl", "cl_re", "cl_pcl_re")
# "authors": SGD momentum = weight decay, as their PolyOptimizer passes weight_decay where torch.optim.SGD takes
# momentum; "standard": the usual momentum 0.9 (their scripts pass momentum=0.9, which only reaches the schedule).
MOMENTUM_OPTIONS = ("authors", "standard")
STANDARD_MOMENTUM = 0.9


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


def _set_conv2(block: nn.Module, stride: int, dilation: int) -> None:
    block.conv2.stride = (stride, stride)
    block.conv2.dilation = (dilation, dilation)
    block.conv2.padding = (dilation, dilation)


def resnet(
    blocks: tuple[int, ...] = RESNET_BLOCKS["resnet50"], output_stride: int = 16, base_width: int = 64
) -> ResNet:
    """A Bottleneck ResNet in the torchvision layout (stride on the 3x3 conv), in training mode as built.

    The package's ``ResNet`` with ``radix=0`` and no deep stem, avg_down or avd is that network. OS32 is the
    network as built; OS16 sets layer4's first stride to 1 without dilating it: the authors' ResNet
    (``core/arch_resnet/resnet.py`` with ``strides=(2, 2, 2, 1)``); OS8 also follows torchvision's
    ``replace_stride_with_dilation=[False, True, True]`` (layer3 stride 1, dilation 2 after its first block;
    layer4 dilation 2 in its first block and 4 after). Only strides, dilations and paddings are patched, so the
    parameters, and their random initialisation for a given torch seed, are the same for every stride.

    Args:
      blocks: Bottleneck blocks of layer1..layer4.
      output_stride: 8, 16 or 32.
      base_width: stem channels and layer1 planes; 64 is the ImageNet network. A narrower one (16 with one block
        per layer is our ``resnet_tiny``) is for fast CPU parity tests only: the package's layers are rebuilt
        at that width with its own ``_make_layer`` and initialised as the package initialises them.

    Returns:
      The network, its ImageNet ``avgpool``/``fc`` still attached.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}; allowed values are {list(OUTPUT_STRIDES)}.")
    model = ResNet(Bottleneck, list(blocks), radix=0, deep_stem=False, avg_down=False, avd=False)
    if base_width != 64:
        _narrow(model, blocks, base_width)
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
    return model


def _narrow(model: ResNet, blocks: tuple[int, ...], base_width: int) -> None:
    """Rebuilds ``model``'s stem, layers and ``fc`` at ``base_width`` (see ``resnet``) with the strides of output
    stride 32, which ``resnet`` then patches like the full-width network's."""
    model.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(base_width)
    model.inplanes = base_width
    model.layer1 = model._make_layer(Bottleneck, base_width, blocks[0], norm_layer=nn.BatchNorm2d, is_first=False)
    for index in range(1, 4):
        layer = model._make_layer(Bottleneck, base_width * 2**index, blocks[index], stride=2, norm_layer=nn.BatchNorm2d)
        setattr(model, f"layer{index + 1}", layer)
    model.fc = nn.Linear(base_width * 8 * Bottleneck.expansion, model.fc.out_features)
    # The package's initialisation (ResNet.__init__): fan-out normal convolutions, BatchNorm 1 and 0.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            module.weight.data.normal_(0, (2.0 / fan_out) ** 0.5)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(1)
            module.bias.data.zero_()


def resnest(arch: str, output_stride: int = 16) -> ResNet:
    """An official ResNeSt, built as the authors build it for ``output_stride`` (``RESNEST_GEOMETRY``), in training
    mode as built, without pretrained weights and with its ImageNet ``avgpool``/``fc`` still attached."""
    if arch not in RESNEST_CONSTRUCTORS:
        raise ValueError(f"arch={arch!r}; allowed values are {list(RESNEST_CONSTRUCTORS)}.")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride={output_stride}; allowed values are {list(OUTPUT_STRIDES)}.")
    return RESNEST_CONSTRUCTORS[arch](pretrained=False, **RESNEST_GEOMETRY[output_stride])


def create_backbone(arch: str, output_stride: int = 16) -> ResNet:
    """The authors' backbone for ``arch`` (one of ``ARCHITECTURES``), randomly initialised from torch's global
    generator.

    Raises:
      ValueError: for an architecture without a PyTorch counterpart.
    """
    if arch in RESNET_BLOCKS:
        return resnet(RESNET_BLOCKS[arch], output_stride)
    if arch in RESNEST_CONSTRUCTORS:
        return resnest(arch, output_stride)
    raise ValueError(f"arch={arch!r} has no PyTorch reference; allowed values are {list(ARCHITECTURES)}.")


# --------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------


def global_average_pooling_2d(x: torch.Tensor, keepdims: bool = False) -> torch.Tensor:
    """Their ``ABC_Model.global_average_pooling_2d``: the spatial mean, (B, C, H, W) -> (B, C)."""
    x = torch.mean(x.view(x.size(0), x.size(1), -1), -1)
    if keepdims:
        x = x.view(x.size(0), x.size(1), 1, 1)
    return x


class Classifier(nn.Module):
    """Their ``Classifier`` (``core/networks.py``) around a given backbone, BatchNorm in their ``normal`` mode.

    The backbone is ``model`` (its ImageNet ``avgpool``/``fc`` removed), ``stage1``..``stage5`` are
    ``nn.Sequential`` views of its parts (so the state dict holds every backbone tensor twice: the format of the
    authors' released checkpoints), and the head is a bias-free 1x1 conv ``classifier`` with Kaiming-normal
    init, drawn from torch's global generator. ``named_parameters()`` lists each shared tensor once, under its
    ``model.`` name, which is what their parameter groups rely on.

    Args:
      backbone: a network of ``create_backbone`` (or any with its attributes).
      num_classes: classes of the head.
    """

    def __init__(self, backbone: ResNet, num_classes: int = 20):
        super().__init__()
        # 2048 for every network of theirs; narrower for a narrow test ResNet (``resnet(base_width=...)``).
        features = backbone.fc.in_features
        self.model = backbone
        del self.model.avgpool
        del self.model.fc
        self.stage1 = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.stage2 = nn.Sequential(backbone.layer1)
        self.stage3 = nn.Sequential(backbone.layer2)
        self.stage4 = nn.Sequential(backbone.layer3)
        self.stage5 = nn.Sequential(backbone.layer4)
        self.classifier = nn.Conv2d(features, num_classes, 1, bias=False)
        self.num_classes = num_classes
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(
        self, images: torch.Tensor, with_cam: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """``(logits, class maps)``, or the logits alone without ``with_cam``.

        ``with_cam`` defaults to True here (their default is False): it is how every Puzzle-CAM script of theirs
        calls the model.
        """
        x = self.stage5(self.stage4(self.stage3(self.stage2(self.stage1(images)))))
        if with_cam:
            features = self.classifier(x)
            return global_average_pooling_2d(features), features
        x = global_average_pooling_2d(x, keepdims=True)
        return self.classifier(x).view(-1, self.num_classes)


def create_classifier(arch: str, num_classes: int = 20, output_stride: int = 16) -> Classifier:
    """``Classifier(create_backbone(arch, output_stride), num_classes)``, in training mode."""
    return Classifier(create_backbone(arch, output_stride), num_classes)


# --------------------------------------------------------------------------------------------------
# AffinityNet
# --------------------------------------------------------------------------------------------------


def authors_edge1_features(arch: str) -> int:
    """Their rule for ``fc_edge1``'s input channels: 64 if "50" is in the architecture name, otherwise 128 (right
    for ResNet-50 and the ResNeSts, whose stem is 64 channels wide in ResNeSt-50 and 128 in the deeper ones; wrong for
    ResNet-101, whose stage1 has 64)."""
    return 64 if "50" in arch else 128


def _edge_branch(in_features: int, upsampling: int) -> nn.Sequential:
    layers = [nn.Conv2d(in_features, 32, 1, bias=False), nn.GroupNorm(4, 32)]
    if upsampling > 1:
        layers.append(nn.Upsample(scale_factor=upsampling, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class AffinityNet(nn.Module):
    """Their ``AffinityNet`` (``core/networks.py``) without the path index: the edge logits of ``forward``.

    The backbone is ``model`` with ``stage1``..``stage5`` views of its parts, in their ``fix`` BatchNorm mode
    (running statistics: kept in eval mode whatever ``train()`` says, as their ``train`` override does), its stage
    outputs detached. ``fc_edge1``..``fc_edge5``: 1x1 conv (no bias) -> GroupNorm(4, 32) -> [bilinear upsample x2
    for stage3, x4 for stage4 and stage5] -> ReLU; each cropped to ``fc_edge2``'s size, concatenated, and
    ``fc_edge6`` (1x1 conv with bias) gives one logit. Their layers keep torch's default initialisation.

    Args:
      backbone: a network of ``create_backbone`` (or ``resnet(..., base_width=...)``) at output stride 16.
      edge1_features: ``fc_edge1``'s input channels; their rule is ``authors_edge1_features(arch)``.
    """

    def __init__(self, backbone: ResNet, edge1_features: int):
        super().__init__()
        # Stage channels: 256, 512, 1024, 2048 for every network of theirs; narrower for a narrow test ResNet.
        stage5 = backbone.fc.in_features
        self.model = backbone
        del self.model.avgpool
        del self.model.fc
        self.stage1 = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        self.stage2 = nn.Sequential(backbone.layer1)
        self.stage3 = nn.Sequential(backbone.layer2)
        self.stage4 = nn.Sequential(backbone.layer3)
        self.stage5 = nn.Sequential(backbone.layer4)
        self.fc_edge1 = _edge_branch(edge1_features, 1)
        self.fc_edge2 = _edge_branch(stage5 // 8, 1)
        self.fc_edge3 = _edge_branch(stage5 // 4, 2)
        self.fc_edge4 = _edge_branch(stage5 // 2, 4)
        self.fc_edge5 = _edge_branch(stage5, 4)
        self.fc_edge6 = nn.Conv2d(160, 1, 1, bias=True)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4, self.stage5])
        self.edge_layers = nn.ModuleList(
            [self.fc_edge1, self.fc_edge2, self.fc_edge3, self.fc_edge4, self.fc_edge5, self.fc_edge6]
        )

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, ceil(H / 4), ceil(W / 4)) edge logits of NCHW normalised images."""
        x1 = self.stage1(images).detach()
        x2 = self.stage2(x1).detach()
        x3 = self.stage3(x2).detach()
        x4 = self.stage4(x3).detach()
        x5 = self.stage5(x4).detach()
        edge1 = self.fc_edge1(x1)
        edge2 = self.fc_edge2(x2)
        height, width = edge2.size(2), edge2.size(3)
        edge3 = self.fc_edge3(x3)[..., :height, :width]
        edge4 = self.fc_edge4(x4)[..., :height, :width]
        edge5 = self.fc_edge5(x5)[..., :height, :width]
        return self.fc_edge6(torch.cat([edge1, edge2, edge3, edge4, edge5], dim=1))


# --------------------------------------------------------------------------------------------------
# Puzzle module and losses
# --------------------------------------------------------------------------------------------------


def tile_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """Their ``tile_features``: the grid x grid pieces concatenated along the batch, piece-major
    ([all top-left, all top-right, ..., all bottom-right]). Their argument is ``num_pieces = grid ** 2``; height and
    width must be multiples of ``grid`` (their crops are)."""
    height, width = features.shape[2] // grid, features.shape[3] // grid
    pieces = [piece for row in torch.split(features, height, dim=2) for piece in torch.split(row, width, dim=3)]
    return torch.cat(pieces, dim=0)


def merge_features(features: torch.Tensor, grid: int, batch_size: int) -> torch.Tensor:
    """Their ``merge_features``: the inverse of ``tile_features`` for a batch of ``batch_size``."""
    pieces = torch.split(features, batch_size)
    rows = [torch.cat(pieces[row * grid : (row + 1) * grid], dim=3) for row in range(grid)]
    return torch.cat(rows, dim=2)


def make_cam(x: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """Their ``make_cam``: ReLU, then each map divided by its maximum (+ epsilon), values below epsilon zeroed."""
    x = functional.relu(x)
    b, c, h, w = x.size()
    max_value = x.view(b, c, h * w).max(dim=-1)[0].view(b, c, 1, 1)
    return functional.relu(x - epsilon) / (max_value + epsilon)


def _l1_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.abs(a - b)


def _l2_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.pow(a - b, 2)


# Our config's cam.re_loss -> their L1_Loss / L2_Loss (--re_loss L1_Loss / L2_Loss).
RECONSTRUCTION_MAPS = {"l1": _l1_loss, "l2": _l2_loss}


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


def parameter_groups(model: nn.Module) -> tuple[list, list, list, list]:
    """Their ``get_parameter_groups``: (pretrained weights, pretrained biases, scratch weights, scratch biases),
    "pretrained" meaning ``model`` in the parameter's name, "weight" meaning ``weight`` in it (so BatchNorm
    scales are weights and get weight decay)."""
    groups: tuple[list, list, list, list] = ([], [], [], [])
    for name, parameter in model.named_parameters():
        index = (0 if "model" in name else 2) + (0 if "weight" in name else 1)
        groups[index].append(parameter)
    return groups


class PolyOptimizer(torch.optim.SGD):
    """Their ``PolyOptimizer``: SGD whose learning rates follow ``(1 - step / max_step) ** power``, updated
    before each step (and frozen once ``max_step`` steps are done).

    Their constructor calls ``torch.optim.SGD.__init__(params, lr, weight_decay, nesterov=nesterov)``: the third
    positional argument of SGD is ``momentum``, so their SGD momentum is the weight decay (1e-4), and their
    ``momentum`` argument (0.9) only serves as the poly power. ``momentum="authors"`` reproduces that;
    ``"standard"`` uses momentum ``STANDARD_MOMENTUM``. Weight decay comes from each parameter group (all of
    theirs set it).

    Args:
      params: parameter groups, each with its ``lr`` and ``weight_decay``.
      lr: default learning rate (every group of theirs sets its own).
      weight_decay: their weight decay, the SGD momentum under ``momentum="authors"``.
      max_step: length of the poly schedule.
      power: exponent of the poly schedule (their ``momentum`` argument).
      nesterov: Nesterov momentum (their default for Puzzle-CAM).
      momentum: ``"authors"`` or ``"standard"`` (``MOMENTUM_OPTIONS``).
    """

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float,
        max_step: int,
        power: float = 0.9,
        nesterov: bool = False,
        momentum: str = "authors",
    ):
        if momentum not in MOMENTUM_OPTIONS:
            raise ValueError(f"momentum={momentum!r}; allowed values are {list(MOMENTUM_OPTIONS)}.")
        sgd_momentum = weight_decay if momentum == "authors" else STANDARD_MOMENTUM
        super().__init__(params, lr, momentum=sgd_momentum, nesterov=nesterov)
        self.global_step = 0
        self.max_step = max_step
        self.power = power
        self.initial_lr = [group["lr"] for group in self.param_groups]

    def step(self, closure=None):
        if self.global_step < self.max_step:
            multiplier = (1 - self.global_step / self.max_step) ** self.power
            for group, initial in zip(self.param_groups, self.initial_lr, strict=True):
                group["lr"] = initial * multiplier
        loss = super().step(closure)
        self.global_step += 1
        return loss


def create_optimizer(
    model: nn.Module,
    *,
    learning_rate: float,
    weight_decay: float,
    max_step: int,
    momentum: str = "authors",
    nesterov: bool = True,
) -> PolyOptimizer:
    """Their optimizer of ``train_classification_with_puzzle.py``: four groups (pretrained weights lr x1 with decay,
    pretrained biases x2 without, scratch weights x10 with, scratch biases x20 without), Nesterov, poly(0.9).

    Args:
      model: a ``Classifier`` (the groups split on ``model`` in the parameter names).
      learning_rate: their ``--lr`` (0.1).
      weight_decay: their ``--wd`` (1e-4).
      max_step: their ``max_iteration`` (epochs x steps per epoch).
      momentum: ``"authors"`` (momentum = weight decay) or ``"standard"`` (0.9); see ``PolyOptimizer``.
      nesterov: their ``--nesterov`` (True).

    Returns:
      The optimizer; its ``step()`` applies the learning rate of its ``global_step``.
    """
    weights, biases, scratch_weights, scratch_biases = parameter_groups(model)
    return PolyOptimizer(
        [
            {"params": weights, "lr": learning_rate, "weight_decay": weight_decay},
            {"params": biases, "lr": 2 * learning_rate, "weight_decay": 0},
            {"params": scratch_weights, "lr": 10 * learning_rate, "weight_decay": weight_decay},
            {"params": scratch_biases, "lr": 20 * learning_rate, "weight_decay": 0},
        ],
        lr=learning_rate,
        weight_decay=weight_decay,
        max_step=max_step,
        nesterov=nesterov,
        momentum=momentum,
    )


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def alpha_at_step(step: int, max_step: int, alpha: float, alpha_schedule: float) -> float:
    """Their reconstruction weight: a linear ramp to ``alpha`` over ``alpha_schedule`` of training (0: constant)."""
    if alpha_schedule == 0.0:
        return alpha
    return min(alpha * step / (max_step * alpha_schedule), alpha)


def create_puzzle_train_step(
    model: Classifier,
    optimizer: PolyOptimizer,
    cam: Any,
    *,
    max_step: int,
    batch_size: int,
    device_type: str = "cpu",
    dtype: str = "float32",
    always_tile: bool = True,
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """One iteration of their ``train_classification_with_puzzle.py``, for the Puzzle-CAM settings ``cam``.

    The full images, then their tiles through the same model (always: their script runs the tiled pass even for
    ``cl``, which only changes BatchNorm's running statistics then), the tiles' class maps merged back,
    optionally both normalised by ``make_cam`` (``level="cam"``); MultiLabelSoftMargin on the logits, on the merged
    maps' spatial mean (``pcl``), the reconstruction term (``re``: L1 or L2 maps, reduced by ``masking``,
    ``selection`` or ``none``) weighted by the alpha ramp; backward and an optimizer step. The iteration number
    of the ramp is the optimizer's ``global_step``, as their loop's ``iteration`` is.

    Args:
      model: the ``Classifier``, in training mode.
      optimizer: its ``PolyOptimizer``.
      cam: the Puzzle-CAM settings, with the attributes of ``configs/default.py``'s ``cam`` section
        (``loss_option``, ``grid``, ``level``, ``re_loss``, ``re_loss_option``, ``alpha``, ``alpha_schedule``).
      max_step: their ``max_iteration`` (the alpha ramp's length).
      batch_size: images per step.
      device_type: the images' device type, for ``torch.autocast``.
      dtype: ``float32``, or ``bfloat16`` for both forward passes under ``torch.autocast`` (parameters and the
        losses stay float32). Their code has no mixed precision: bfloat16 is the benchmark's fair mixed-precision
        counterpart of ours. A float64 model (``model.double()``, the parity tests) given float64 images runs in
        float64 throughout with ``float32``: only autocast's outputs are cast back.
      always_tile: run the tiled pass even when no term uses it (``cl``), as their script does. False skips it
        there, as our plain-CAM objective does: that changes only BatchNorm's running statistics (train-mode
        BatchNorm normalises with the batch statistics, so the losses and gradients are the same).

    Returns:
      ``train_step(images, labels)``: runs one iteration on NCHW float images (normalised as their loader
      delivers them) and multi-hot float labels and returns the losses as detached tensors (``loss``, ``class_loss``,
      ``puzzle_class_loss``, ``reconstruction_loss``, the latter two only when their term is on) and ``alpha``.
    """
    if cam.loss_option not in LOSS_OPTIONS:
        raise ValueError(f"cam.loss_option={cam.loss_option!r}; allowed values are {list(LOSS_OPTIONS)}.")
    if cam.level not in ("feature", "cam"):
        raise ValueError(f"cam.level={cam.level!r}; allowed values are ['feature', 'cam'].")
    if cam.re_loss not in RECONSTRUCTION_MAPS:
        raise ValueError(f"cam.re_loss={cam.re_loss!r}; allowed values are {list(RECONSTRUCTION_MAPS)}.")
    if cam.re_loss_option not in ("masking", "selection", "none"):
        raise ValueError(
            f"cam.re_loss_option={cam.re_loss_option!r}; allowed values are ['masking', 'selection', 'none']."
        )
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r}; allowed values are ['float32', 'bfloat16'].")
    terms = cam.loss_option.split("_")
    grid = int(cam.grid)
    re_loss_fn = RECONSTRUCTION_MAPS[cam.re_loss]
    class_loss_fn = nn.MultiLabelSoftMarginLoss(reduction="none")
    use_autocast = dtype == "bfloat16"
    tiled_pass = always_tile or "pcl" in terms or "re" in terms

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        alpha = alpha_at_step(optimizer.global_step, max_step, float(cam.alpha), float(cam.alpha_schedule))
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_autocast):
            logits, features = model(images, with_cam=True)
            if tiled_pass:
                _, tiled_features = model(tile_features(images, grid), with_cam=True)
        if use_autocast:
            logits, features = logits.float(), features.float()
            if tiled_pass:
                tiled_features = tiled_features.float()
        re_features = merge_features(tiled_features, grid, batch_size) if tiled_pass else None
        if cam.level == "cam":
            features = make_cam(features)
            re_features = make_cam(re_features) if tiled_pass else None
        class_loss = class_loss_fn(logits, labels).mean()
        metrics: dict[str, Any] = {"class_loss": class_loss, "alpha": alpha}
        loss = class_loss
        if "pcl" in terms:
            puzzle_class_loss = class_loss_fn(global_average_pooling_2d(re_features), labels).mean()
            metrics["puzzle_class_loss"] = puzzle_class_loss
            loss = loss + puzzle_class_loss
        if "re" in terms:
            if cam.re_loss_option == "masking":
                re_loss = (re_loss_fn(features, re_features) * labels[:, :, None, None]).mean()
            elif cam.re_loss_option == "selection":
                re_loss = 0.0
                for index in range(labels.size(0)):
                    present = labels[index].nonzero(as_tuple=True)
                    re_loss = re_loss + re_loss_fn(features[index][present], re_features[index][present]).mean()
                re_loss = re_loss / labels.size(0)
            else:
                re_loss = re_loss_fn(features, re_features).mean()
            metrics["reconstruction_loss"] = re_loss
            loss = loss + alpha * re_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics["loss"] = loss
        return {name: value.detach() if torch.is_tensor(value) else value for name, value in metrics.items()}

    return train_step
