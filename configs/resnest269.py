"""Paper setting: Puzzle-CAM with ResNeSt-269 on VOC 2012 + SBD (spec §1, §2, §4), through the whole pipeline to the
DeepLabv3+ segmenter on its pseudo labels (the paper's 71.9% val / 72.2% test with ResNeSt-269)."""

from configs import default


def get_config():
    config = default.get_config()
    # Same recipe as ResNet-50 (the authors change only --architecture); OS16 with layer4 dilation 2.
    config.model.arch = "resnest269"
    # ResNeSt-269 at 512x512 may need activation rematerialisation to fit, depending on the images per device (batch
    # 32 on one GPU or split over a pod): "auto" compiles the step without it and turns it on only when XLA's memory
    # estimate exceeds 90% of a device (remat costs ~30% more compute where it is not needed).
    config.model.remat = "auto"
    return config
