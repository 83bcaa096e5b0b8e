"""Puzzle-CAM with ResNeSt-101 on MS COCO 2014 (80 classes + background; README "Datasets", `coco2014`).

The authors published no COCO recipe: this keeps their VOC recipe (spec §4) and changes only what the data size
demands. Point it at your COCO folder: ``--config.data.root=/path/to/coco``.
"""

from configs import default


def get_config():
    config = default.get_config()
    # The coco2014 builder: semantic masks rendered from the instance annotations (crowd regions ignored).
    config.data.dataset = "coco2014"
    # COCO's 82,081 labelled train2014 images (images without annotations are skipped by the builder).
    config.train_cam.split = "train"
    # CAMs are made, refined and scored on the training images, as for VOC (they become the pseudo labels).
    config.infer.split = "train"
    # Scored on the same images (COCO has no finer subset of train).
    config.eval.split = ""
    # AffinityNet learns from the affinity labels of infer.split.
    config.train_aff.split = "train"
    # The segmenter learns from the pseudo labels of the same images ...
    config.train_seg.split = "train"
    # ... in 10 epochs (82k images: 25.6k steps, 1.5x the VOC schedule's 16.5k) ...
    config.train_seg.epochs = 10
    # ... and segments and scores val2014.
    config.seg.split = "val"
    # The backbone of the README command (and of the preprint's best VOC numbers after ResNeSt-269).
    config.model.arch = "resnest101"
    # 82k images at batch 32 are 2,565 steps per epoch: 5 epochs give ~12.8k steps, 2.6x the VOC schedule.
    config.train_cam.epochs = 5
    return config
