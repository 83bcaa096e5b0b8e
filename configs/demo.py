"""CPU demo: the whole Puzzle-CAM skeleton on the built-in synthetic "puzzle_demo" set in minutes.

``python -m puzzle_jax.main --config=configs/demo.py`` generates the data on first use, pretrains a tiny ResNet on
classification (the stand-in for ImageNet weights), trains Puzzle-CAM from that backbone, and scores its CAMs.
The plain-CAM baseline from the same start:
``--config.stages=train_cam,infer_cam,eval_cam --config.cam.loss_option=cl --config.model.init_from=<dir>/pretrain/model``.
"""

from configs import default


def get_config():
    config = default.get_config()
    # All four stages: the pretrain stage stands in for ImageNet weights.
    config.stages = ("pretrain", "train_cam", "infer_cam", "eval_cam")

    # Built-in synthetic data: objects with a small class-specific head and an ambiguous body.
    config.data.dataset = "puzzle_demo"
    # Demo images are 80..128 px, so crops and rescale range are scaled down from the paper's 512 / 320-640.
    config.data.train_split = "train"
    config.data.crop_size = 128
    config.data.rescale_range = (96, 160)

    # A tiny bottleneck ResNet (widths 16..128, one block per stage) that trains on two CPU cores.
    config.model.arch = "resnet_tiny"
    # One device here, so "global" statistics are the batch's.
    config.model.bn_mode = "global"
    # train_cam starts from this workdir's pretrain export (the stand-in for converted ImageNet weights).
    config.model.init_from = "pretrain"

    config.train.batch_size = 16
    config.train.epochs = 15
    config.train.log_every_steps = 10
    config.train.checkpoint_every_steps = 100

    config.pretrain.epochs = 8
    config.pretrain.batch_size = 16
    config.pretrain.learning_rate = 0.05

    # Single scale + flip keeps inference to seconds on a CPU; the paper uses (0.5, 1.0, 1.5, 2.0).
    config.infer.scales = (1.0,)
    config.infer.pad_multiple = 32
    return config
