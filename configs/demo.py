"""CPU demo: the whole Puzzle-CAM skeleton on the built-in synthetic "puzzle_demo" set in minutes.

``python -m puzzle_jax.main --config=configs/demo.py`` generates the data on first use, pretrains a tiny ResNet on
classification (the stand-in for ImageNet weights), trains Puzzle-CAM from that backbone, scores its CAMs, refines
them into pseudo labels (affinity labels, AffinityNet on the pretrained backbone, the random walk and the CRF), trains
DeepLabv3+ on the pseudo labels and segments the val images, each step scored.
The fully supervised reference (the segmenter on the ground truth), in its own workdir from this run's pretrain
export: ``--config.stages=train_seg,infer_seg,eval_seg --config.seg.labels=ground_truth
--config.train_seg.init_from=runs/demo/pretrain/model --workdir=runs/demo_ground_truth``.
The plain-CAM baseline from the same start: ``--config.stages=train_cam,infer_cam,eval_cam
--config.cam.loss_option=cl --config.train_cam.init_from=<dir>/pretrain/model`` (or ``launch/demo_comparison.sh``).
"""

from configs import default


def get_config():
    config = default.get_config()
    # The whole chain; the pretrain stage stands in for ImageNet weights (of train_cam and train_aff).
    config.stages = (
        "pretrain", "train_cam", "infer_cam", "eval_cam", "aff_labels", "train_aff", "infer_rw", "pseudo_labels",
        "train_seg", "infer_seg", "eval_seg",
    )

    # Built-in synthetic data: objects whose small head is stronger class evidence than their large body.
    config.data.dataset = "puzzle_demo"
    # The 2-core CPU is busy with the model itself: load in the main process.
    config.data.worker_count = 0

    # A tiny bottleneck ResNet (widths 16..128, one block per stage) that trains on two CPU cores.
    config.model.arch = "resnet_tiny"
    # One device here, so "global" statistics are the batch's.
    config.model.bn_mode = "global"
    # Classification pretraining: the stand-in for ImageNet weights, on the demo's 1,200 "pretrain" images.
    # Demo images are 80..128 px, so the crop is scaled down from the paper's 512 and the random long-side rescale
    # from the paper's 320-640 by the same factor; batch 16 and lr 0.05 on one CPU, 8 epochs (600 steps); scored
    # on the 200 "val" images' labels.
    config.pretrain = default.training_section(
        split="pretrain",
        batch_size=16,
        epochs=8,
        learning_rate=0.05,
        crop_size=128,
        rescale_range=(96, 160),
        validation_split="val",
    )
    # A checkpoint every 100 steps (about half a minute of CPU work).
    config.pretrain.checkpoint_every_steps = 100

    # Puzzle-CAM on the demo's 600 "train" images, from this workdir's pretrain export (the stand-in for converted
    # ImageNet weights): the paper's 15 epochs (555 steps), half its batch on one CPU and half its learning rate
    # (linear scaling; 0.1 made the seed-to-seed spread of Puzzle-CAM ~4 points), the crop scaled as pretrain's.
    config.train_cam = default.training_section(
        split="train",
        batch_size=16,
        epochs=15,
        learning_rate=0.05,
        crop_size=128,
        rescale_range=(96, 160),
        init_from="pretrain",
        validation_split="val",
    )
    # A checkpoint every 100 steps.
    config.train_cam.checkpoint_every_steps = 100

    # AffinityNet on the demo's 600 "train" images (the split infer_cam and aff_labels label), its frozen backbone from
    # this workdir's pretrain export (the stand-in for ImageNet weights, as the authors use those and not the
    # Puzzle-CAM classifier); the crop and rescale range scaled as pretrain's, batch 16 on one CPU, the paper's lr.
    # 10 epochs (370 steps; the paper's 3 epochs of train_aug are 990; 3 epochs left the edges near chance).
    config.train_aff = default.training_section(
        split="train",
        batch_size=16,
        epochs=10,
        learning_rate=0.1,
        crop_size=128,
        rescale_range=(96, 160),
        init_from="pretrain",
    )
    # The authors' radius scaled as the crop: their 10 cells of a 512 crop's 128 x 128 grid span 8% of it, so 3 here
    # (the crop is 128, its grid 32 x 32). Radii count stride-4 cells, and the demo's images are a quarter of VOC's
    # size: unscaled (10 here, 5 for the walk) the random walk lowered the demo's mIoU (README, "Refinement chain").
    config.train_aff.radius = 3
    # A checkpoint every 100 steps.
    config.train_aff.checkpoint_every_steps = 100

    # The paper's inference scales with flip; larger padding buckets mean fewer XLA compilations.
    config.infer.pad_multiple = 64
    # The chain runs on the 600 "train" images ...
    config.infer.split = "train"
    # ... and is scored on them (the demo's splits are disjoint).
    config.eval.split = ""
    # AffinityNet sees each image on a 128 x 128 canvas (the demo's largest side), as the authors' on 512 x 512.
    config.refine.edge_canvas = 128
    # The walk's radius scaled as train_aff's: the authors' 5 cells at a quarter of the size (the smallest radius, 2).
    config.refine.rw_radius = 2

    # DeepLabv3+ on the pseudo labels of the 600 "train" images, its backbone from the pretrain export (the stand-in
    # for ImageNet weights); the crop and the long-side rescale scaled from the paper's 512 and 256-1024 as pretrain's,
    # batch 16 on one CPU, the paper's lr; scored on the 200 "val" images after training (for the log only).
    config.train_seg = default.training_section(
        split="train",
        batch_size=16,
        epochs=15,
        learning_rate=0.007,
        crop_size=128,
        rescale_range=(64, 256),
        init_from="pretrain",
        validation_split="val",
    )
    # The authors' DeepLab weight decay.
    config.train_seg.weight_decay = 4e-5
    # A checkpoint every 100 steps.
    config.train_seg.checkpoint_every_steps = 100
    # Scored on val every 5 epochs too (train_seg/validation.jsonl; for the log only).
    config.train_seg.validate_every_epochs = 5
    # A head as narrow as the backbone (widths 16..128): with the authors' 256 and 48 a training step took 10 times as
    # long on the 2-core CPU (README, "Segmenter").
    config.seg.head_features = 32
    # The decoder's projection of the stride-4 features, scaled as the head (the authors' 48).
    config.seg.low_level_features = 12
    # The segmenter labels and is scored on the 200 "val" images, which no stage trained on.
    config.seg.split = "val"
    return config
