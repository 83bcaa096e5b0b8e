"""CPU demo: the whole Puzzle-CAM skeleton on the built-in synthetic "puzzle_demo" set in minutes.

``python -m puzzle_jax.main --config=configs/demo.py`` generates the data on first use, pretrains a tiny ResNet on
classification (the stand-in for ImageNet weights), trains Puzzle-CAM from that backbone, and scores its CAMs.
The plain-CAM baseline from the same start: ``--config.stages=train_cam,infer_cam,eval_cam
--config.cam.loss_option=cl --config.model.init_from=<dir>/pretrain/model`` (or ``launch/demo_comparison.sh``).
"""

from configs import default


def get_config():
    config = default.get_config()
    # All four stages: the pretrain stage stands in for ImageNet weights.
    config.stages = ("pretrain", "train_cam", "infer_cam", "eval_cam")

    # Built-in synthetic data: objects whose small head is stronger class evidence than their large body.
    config.data.dataset = "puzzle_demo"
    # The demo's own CAM-training split (its "pretrain" split is disjoint from it).
    config.data.train_split = "train"
    # Demo images are 80..128 px, so the crop is scaled down from the paper's 512 ...
    config.data.crop_size = 128
    # ... and the random long-side rescale from the paper's 320-640 by the same factor.
    config.data.rescale_range = (96, 160)
    # The 2-core CPU is busy with the model itself: load in the main process.
    config.data.worker_count = 0

    # A tiny bottleneck ResNet (widths 16..128, one block per stage) that trains on two CPU cores.
    config.model.arch = "resnet_tiny"
    # One device here, so "global" statistics are the batch's.
    config.model.bn_mode = "global"
    # train_cam starts from this workdir's pretrain export (the stand-in for converted ImageNet weights).
    config.model.init_from = "pretrain"

    # Half the paper's batch on one CPU ...
    config.train.batch_size = 16
    # ... and half its learning rate (linear scaling; 0.1 made the seed-to-seed spread of Puzzle-CAM ~4 points).
    config.train.learning_rate = 0.05
    # The paper's 15 epochs over the 600 training images (555 steps).
    config.train.epochs = 15
    # Metrics every 10 steps.
    config.train.log_every_steps = 10
    # A checkpoint every 100 steps (about half a minute of CPU work).
    config.train.checkpoint_every_steps = 100

    # Classification pretraining: 8 epochs over the 1,200 pretrain images.
    config.pretrain.epochs = 8
    # Same batch as train_cam.
    config.pretrain.batch_size = 16
    # Every layer starts from random weights here.
    config.pretrain.learning_rate = 0.05

    # The paper's inference scales with flip; larger padding buckets mean fewer XLA compilations.
    config.infer.pad_multiple = 64
    return config
