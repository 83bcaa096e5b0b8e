"""Paper setting: Puzzle-CAM with ResNeSt-269 on VOC 2012 + SBD (spec §1, §2, §4)."""

from configs import default


def get_config():
    config = default.get_config()
    # Same recipe as ResNet-50 (the authors change only --architecture); OS16 with layer4 dilation 2.
    config.model.arch = "resnest269"
    # ResNeSt-269 at 512x512 and batch 32 needs activation rematerialisation to fit in accelerator memory.
    config.model.remat = True
    return config
