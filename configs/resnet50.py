"""Paper setting: Puzzle-CAM with ResNet-50 on VOC 2012 + SBD (spec §1, §4; Table 1 of the paper)."""

from configs import default


def get_config():
    config = default.get_config()
    # The defaults are the ResNet-50 recipe already: batch 32, 15 epochs, crop 512, rescale 320-640, lr 0.1,
    # wd 1e-4, poly 0.9, alpha 4 ramped over the first half, 2x2 pieces, L1 reconstruction with masking.
    config.model.arch = "resnet50"
    return config
