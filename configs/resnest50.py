"""Paper setting: Puzzle-CAM with ResNeSt-50 on VOC 2012 + SBD (spec §1, §2, §4)."""

from configs import default


def get_config():
    config = default.get_config()
    # Same recipe as ResNet-50 (the authors change only --architecture); OS16 with layer4 dilation 2.
    config.model.arch = "resnest50"
    return config
