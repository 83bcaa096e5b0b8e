"""Default configuration: the authors' Puzzle-CAM recipe (spec §1, §4, §5) for ResNet-50 on VOC 2012 + SBD.

Every other config imports this one and overrides fields. Override any field on the command line with
``--config.section.field=value``. Each training stage has a section of the same shape (``training_section``):
``config.pretrain``, ``config.train_cam``, ``config.train_aff`` and ``config.train_seg``; no stage reads another
stage's training section.
"""

import ml_collections
from ml_collections import config_dict


def training_section(
    *,
    split: str,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    crop_size: int,
    rescale_range: tuple[int, int],
    init_from: str = "",
    validation_split: str = "",
) -> ml_collections.ConfigDict:
    """The settings of one training stage (the driver reads them all; the arguments are the usual differences)."""
    section = ml_collections.ConfigDict()
    # Split of config.data.dataset to train on.
    section.split = split
    # Split whose image-level labels score the trained model (the classifier: mAP, class loss against the label
    # prior; a warning when training learned next to nothing); "" = none. Pixel labels are never used.
    section.validation_split = validation_split
    # Also score validation_split every this many epochs during training (<stage>/validation.jsonl, TensorBoard's
    # validation/, a printed line): for the log only, never to choose a checkpoint; 0 = once, after training.
    section.validate_every_epochs = 0
    # Exported model (folder) whose backbone initialises training: converted ImageNet weights
    # (python -m puzzle_jax.weights.convert) or an earlier stage's export; "pretrain" is this workdir's
    # pretrain/model (train_cam only). Empty = random initialisation.
    section.init_from = init_from
    # Also take the head from init_from (it must have the same classes); off for ImageNet weights.
    section.init_head = False
    # Global batch size (images per step over all devices and processes).
    section.batch_size = batch_size
    # Epochs over the split (steps per epoch = floor(images / batch_size)).
    section.epochs = epochs
    # Base learning rate of the pretrained backbone weights (biases x2, head x10, head biases x20).
    section.learning_rate = learning_rate
    # Weight decay of weights (biases and BN shifts get none).
    section.weight_decay = 1e-4
    # Power of the polynomial learning-rate decay.
    section.poly_power = 0.9
    # Nesterov momentum (the authors: on).
    section.nesterov = True
    # "authors": their PolyOptimizer's effective momentum (= weight_decay, i.e. almost none; spec §4), which is what
    # their numbers were produced with; "standard": momentum = momentum.
    section.momentum_mode = "authors"
    # Momentum used when momentum_mode is "standard".
    section.momentum = 0.9
    # Random crop side of training images (the authors' --image_size).
    section.crop_size = crop_size
    # Range of the random long-side rescale before the crop (the authors' --min/--max_image_size).
    section.rescale_range = rescale_range
    # Steps between metric records (JSON lines and TensorBoard).
    section.log_every_steps = 10
    # Steps between checkpoints (the final step is always saved).
    section.checkpoint_every_steps = 200
    # Checkpoints kept on disk.
    section.max_to_keep = 2
    return section


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Stages to run, in order (see puzzle_jax/pipeline.py for the names); a comma-separated string also works.
    config.stages = (
        "train_cam",
        "infer_cam",
        "eval_cam",
        "aff_labels",
        "train_aff",
        "infer_rw",
        "pseudo_labels",
        "train_seg",
        "infer_seg",
        "eval_seg",
    )
    # Stages (of config.stages) to run afresh: those whose outputs were made with another config (their recorded
    # <stage>/stage_config.json differs, or is missing) have their folder deleted first; without this a run refuses
    # to keep or resume them. Outputs made with the current config are kept, so the same command resumes after an
    # interruption. A comma-separated string also works: --config.force_stages=train_cam,infer_cam.
    config.force_stages = ()
    # Seed of parameter initialisation and of the data order.
    config.seed = 0

    # Folder of JAX's persistent compilation cache: a rerun, a resumed run or the next stage with the same shapes
    # loads its compiled XLA programs instead of compiling again (a ResNeSt-101 step takes 75-120 s to compile on a
    # GPU). "" turns the cache off; the folder is shared by all runs and is safe to delete.
    config.compilation_cache_dir = "~/.cache/puzzle_jax/jax_compilation_cache"

    config.mesh = ml_collections.ConfigDict()
    # Devices of the ('data',) mesh; 0 uses every visible device. Training spans the devices of all processes;
    # inference, which the processes split between them, uses this many of each process's own devices.
    config.mesh.num_devices = 0
    # Multi-process runs: how long a process waits for the others where they meet (the end of each stage, process
    # 0 preparing a missing dataset, each checkpoint) before it fails with a message naming the place, instead of
    # hanging when another process has failed or is gone.
    config.mesh.barrier_timeout_minutes = 60.0

    config.data = ml_collections.ConfigDict()
    # Dataset name: "voc2012_aug" (VOC 2012 + SBD), "coco2014", "voc_folder" (your own data in VOC layout) or
    # "puzzle_demo" (the built-in synthetic set); see the README's "Datasets".
    config.data.dataset = "voc2012_aug"
    # Folder of a dataset you downloaded (VOCdevkit/VOC2012, the COCO root, or your own VOC-layout folder);
    # unused by the built-in demo set. See the README's "Datasets" section.
    config.data.root = ""
    # Where tfds keeps prepared datasets (array_record files).
    config.data.data_dir = "~/tensorflow_datasets"
    # Keyword arguments of the dataset builder (e.g. the demo set's sizes); empty for the defaults.
    config.data.builder_kwargs = ml_collections.ConfigDict()
    # Host worker processes of the grain loader (0 = in the main process). One worker decodes and augments about
    # 120 images per CPU-second at 512x512 (README, "Host input pipeline throughput") while one H100 trains
    # ResNeSt-101 at 150-170 images/s and ResNet-50 at ~400 (BENCHMARKS.md), so an accelerator host needs several;
    # 8 feeds one GPU with room to spare (lower it on a host with fewer free cores, raise it for several fast chips
    # per host). The data order (every global batch and its augmentation) is the same for any number of workers
    # and of processes.
    config.data.worker_count = 8
    # A training stage resumed with another number of processes than it was saved with: False stops with a message
    # (each process continues its own place in the data stream, saved per process); True resumes the model,
    # optimizer and schedules at the saved step with the data stream started again from its beginning.
    config.data.reshuffle_on_process_change = False

    config.model = ml_collections.ConfigDict()
    # Backbone: resnet50, resnet101, resnest50, resnest101, resnest200, resnest269, or the narrow CPU ones resnet_tiny
    # (the demo's: one bottleneck block per stage) and resnet_small (two per stage).
    config.model.arch = "resnet50"
    # Output stride of the backbone (16 as the authors; 8 or 32 also possible).
    config.model.output_stride = 16
    # BatchNorm: "global" (statistics over the global batch), "per_replica" (per group of bn_group_size images,
    # the authors' unsynchronised 4-GPU BN) or "frozen" (running statistics, trainable scale/bias: their "fix").
    config.model.bn_mode = "per_replica"
    # Images per BatchNorm group in "per_replica" mode (32 images over 4 GPUs = 8).
    config.model.bn_group_size = 8
    # Compute dtype of the backbone: "float32" or "bfloat16" (parameters and BN statistics stay float32).
    config.model.dtype = "float32"
    # Rematerialise each residual block in the backward pass: True, False, or "auto" (on when XLA's estimate of the
    # step without it exceeds 90% of a device's memory; decided by compiling the step once; off on CPUs). A field of
    # either type, so that both --config.model.remat=True and --config.model.remat=auto parse.
    config.model.remat = config_dict.FieldReference(False, field_type=object)
    # How training BatchNorm computes a batch's statistics: "two_pass" (the mean, then the squared deviations from it:
    # two reads of every activation) or "one_pass" (shifted sum and sum of squares in one read); the same values up to
    # float rounding. Only the program's speed differs (BENCHMARKS.md, "GPU waste").
    config.model.bn_statistics = "two_pass"
    # ResNeSt only: the program of the split-attention blocks' grouped 3x3 convolution: "grouped" (one convolution
    # with feature groups), "split" (one plain convolution per radix split) or "block_diagonal" (one plain convolution
    # with a block-diagonal kernel, twice the arithmetic); the same function and parameters (BENCHMARKS.md).
    config.model.grouped_conv = "grouped"

    config.cam = ml_collections.ConfigDict()
    # Loss terms, as the authors' --loss_option: cl (plain CAM), cl_pcl, cl_re, cl_pcl_re (Puzzle-CAM).
    config.cam.loss_option = "cl_pcl_re"
    # Tiles per side of the puzzle grid (2 = the authors' num_pieces 4).
    config.cam.grid = 2
    # Maps both puzzle terms use (the puzzle class loss and the reconstruction): "feature" (raw class maps, the
    # authors' default) or "cam" (each map normalised by its maximum, their make_cam).
    config.cam.level = "feature"
    # Reconstruction norm: "l1" or "l2".
    config.cam.re_loss = "l1"
    # Reconstruction reduction: "masking" (GT classes, mean over all), "selection" or "none".
    config.cam.re_loss_option = "masking"
    # Final weight of the reconstruction loss (README 4.0).
    config.cam.alpha = 4.0
    # Fraction of training over which alpha ramps up linearly from 0 (0 = constant alpha).
    config.cam.alpha_schedule = 0.5

    # The pretrain stage: classification only, from random weights, on images disjoint from train_cam's split: the
    # stand-in for ImageNet weights where they cannot be had (the demo). Its split must exist in the dataset.
    config.pretrain = training_section(
        split="pretrain", batch_size=32, epochs=10, learning_rate=0.1, crop_size=512, rescale_range=(320, 640)
    )

    # The train_cam stage: the authors' classifier recipe on VOC's train_aug (10,582 images): batch 32, 15 epochs,
    # lr 0.1, crop 512 after a random long-side rescale to 320-640. Start it from ImageNet weights:
    # --config.train_cam.init_from=weights/<arch> (README, "Pretrained weights").
    config.train_cam = training_section(
        split="train_aug",
        batch_size=32,
        epochs=15,
        learning_rate=0.1,
        crop_size=512,
        rescale_range=(320, 640),
        validation_split="val",
    )

    # The train_aff stage: AffinityNet's edge branches (spec §8) on a frozen backbone, the authors' recipe: batch 32,
    # 3 epochs, lr 0.1 (one group: the edge layers; the backbone gets no update), wd 1e-4, crop 512 after a random
    # long-side rescale to 320-640. Its split must be the split aff_labels labelled (config.infer.split); the
    # authors: train_aug. init_from: ImageNet weights (--config.train_aff.init_from=weights/<arch>), NOT the
    # Puzzle-CAM classifier; "" = a random backbone.
    config.train_aff = training_section(
        split="train_aug", batch_size=32, epochs=3, learning_rate=0.1, crop_size=512, rescale_range=(320, 640)
    )
    # Search radius of the labelled pixel pairs on the stride-4 grid (the authors' 10; the random walk uses 5).
    config.train_aff.radius = 10

    # The train_seg stage: DeepLabv3+ (spec §9) on the pseudo labels of config.infer.split (seg.labels), the authors'
    # recipe: batch 32, 50 epochs, lr 0.007 (head x10, head biases x20), wd 4e-5, poly decay, crop 512 after a random
    # long-side rescale to 256-1024. init_from: ImageNet weights (--config.train_seg.init_from=weights/<arch>). The
    # last checkpoint is exported (the authors keep the best on VOC val against ground truth, pixel labels a weakly
    # supervised method must not use); validation_split is scored against its ground truth after training, for the
    # log only ("" = not scored).
    config.train_seg = training_section(
        split="train_aug",
        batch_size=32,
        epochs=50,
        learning_rate=0.007,
        crop_size=512,
        rescale_range=(256, 1024),
        validation_split="val",
    )
    # The authors' DeepLab weight decay.
    config.train_seg.weight_decay = 4e-5

    # The segmenter (train_seg, infer_seg, eval_seg): its labels, head and inference.
    config.seg = ml_collections.ConfigDict()
    # What train_seg learns from: "pseudo_labels" (this workdir's pseudo_labels/labels/, made for config.infer.split,
    # which must then be train_seg.split), "ground_truth" (the split's own masks: the fully supervised reference) or
    # a folder of <image id>.png label maps (VOC palette or class ids; 255 ignored).
    config.seg.labels = "pseudo_labels"
    # GroupNorm (4 groups) in the ASPP and the decoder, as the authors' README runs it; False uses frozen BatchNorm.
    config.seg.use_gn = True
    # Channels of the ASPP's branches and of the decoder's 3x3 convolutions (the authors' 256).
    config.seg.head_features = 256
    # Channels of the decoder's projection of the stride-4 features (the authors' 48).
    config.seg.low_level_features = 48
    # Split infer_seg segments and eval_seg scores (VOC: "val"; "test" also writes the evaluation server's layout).
    config.seg.split = "val"
    # Input scales of infer_seg; each is also run flipped (seg.flip), and the logits are summed (spec §9).
    config.seg.scales = (0.5, 1.0, 1.5, 2.0)
    # Run the horizontally flipped image too.
    config.seg.flip = True
    # Mean-field steps of the dense CRF on the softmax (the authors' README: 10); 0 = the argmax, no CRF.
    config.seg.crf_iterations = 10
    # Worker processes running the CRF (one image each at a time); 0 = the CPU cores this process may use.
    config.seg.workers = 0

    config.infer = ml_collections.ConfigDict()
    # Split whose CAMs are computed and refined (aff_labels, infer_rw, pseudo_labels): the authors' train_aug, the
    # images AffinityNet and the segmenter learn from. Scored on eval.split's images (the paper's VOC train, 1,464,
    # inside train_aug); --config.infer.split=train --config.eval.split= makes and scores only those.
    config.infer.split = "train_aug"
    # Input scales of CAM inference; each is also run flipped and the maps are summed (spec §5).
    config.infer.scales = (0.5, 1.0, 1.5, 2.0)
    # Run the horizontally flipped image too.
    config.infer.flip = True
    # Images are padded up to a multiple of this side so XLA compiles once per size bucket, not once per image.
    config.infer.pad_multiple = 64
    # Inputs (one image at one scale, plus its flip) per forward call; inputs of the same padded size are batched
    # across images and each call is split over the mesh's devices.
    config.infer.images_per_call = 8
    # Threads that resize the next images' inputs while the device runs (PIL releases the GIL; the inputs travel as
    # uint8 and the device normalises them); 0 = the CPU cores, at most 8. The CAMs do not depend on it.
    config.infer.host_threads = 0
    # Padded input pixels one forward call may hold (inputs x flips x bucket height x width), for every inference stage
    # (infer_cam, infer_rw, infer_seg; and predict): calls of large size buckets carry fewer inputs, so a huge image
    # runs alone instead of in a batch of huge slots (which exhausted host memory and aborted the process). A ResNet-50
    # classifier at output stride 16 peaks at about 300 bytes per input pixel on the CPU (float32), so the default is
    # ~10 GB: it admits images_per_call=8 VOC or COCO images (up to 640x640) at scale 2.0 with their flips (26M)
    # unchanged. An input over it even alone (a 6000x4000 photo at scale 1.0 with its flip: 48.5M) fails the stage
    # naming the image and this field: raise it if the device has the memory. 0 = no limit. The results do not depend on
    # it.
    config.infer.max_pixels_per_call = 32_000_000

    config.eval = ml_collections.ConfigDict()
    # Split whose images eval_cam and the refinement stages score against ground truth; "" = infer.split. Its images
    # must be among infer.split's: the paper runs the chain on train_aug (10,582 images, the labels AffinityNet and
    # the segmenter learn from) but reports CAM and pseudo-label mIoU on VOC train (1,464, fine masks).
    config.eval.split = "train"
    # Background thresholds swept by eval_cam: start, stop (inclusive) and step (the authors: 0.05..0.75 by 0.05).
    config.eval.threshold_range = (0.05, 0.75, 0.05)
    # Images (spread over the split) drawn in eval_cam/gallery/ and pseudo_labels/gallery/ (the refinement chain),
    # worst IoU first; 0 = no galleries.
    config.eval.gallery_images = 24
    # Another workdir whose CAMs are shown beside these in the gallery (e.g. the plain-CAM run); "" = none.
    config.eval.compare_workdir = ""

    # The label stages (aff_labels, pseudo_labels) on config.infer.split: thresholds and CRF steps of the authors'
    # README (spec §7, §8); the hard-label dense CRF of IRN (refine/crf.py) runs in a pool of worker processes.
    config.refine = ml_collections.ConfigDict()
    # aff_labels: background score of the confident-foreground map (README 0.40; the script's default 0.30).
    config.refine.aff_fg_threshold = 0.40
    # aff_labels: background score of the confident-background map (README 0.10; the script's default 0.05).
    config.refine.aff_bg_threshold = 0.10
    # aff_labels: mean-field steps of the CRF on each of the two maps.
    config.refine.aff_crf_iterations = 10
    # pseudo_labels: background score added to the random walk's maps (README 0.35).
    config.refine.rw_threshold = 0.35
    # pseudo_labels: mean-field steps of the CRF (README --crf_iteration 1).
    config.refine.pseudo_crf_iterations = 1
    # Worker processes running the CRF (one image each at a time); 0 = the CPU cores this process may use. With
    # backend "ray": the CPUs kept busy (a Ray instance started here gets this many); 0 = all of Ray's.
    config.refine.workers = 0
    # Where the CRF of aff_labels, pseudo_labels and infer_seg runs: "local" (a pool of worker processes on this
    # machine) or "ray" (Ray tasks on ray_address; pip install -r requirements-ray.txt). The files are the same bit for
    # bit, so a stage may resume on the other backend; the workdir must be at the same path on every Ray node.
    config.refine.backend = "local"
    # backend "ray": "" starts a Ray instance on this machine (stopped at the end); "auto" (RAY_ADDRESS or the
    # cluster started on this machine with `ray start`) or host:port joins a running cluster.
    config.refine.ray_address = ""
    # backend "ray": reruns of an image's task that raised or whose worker died before the stage fails naming it.
    config.refine.max_retries = 3
    # infer_rw: each image (and its flip) is zero-padded to a canvas of this side for AffinityNet, as the authors pad
    # to 512 x 512 (VOC images are at most 500 px); larger images get the next multiple. The side branches' GroupNorm
    # takes statistics over the whole canvas, so the edges depend on it: keep the size the network was meant for.
    config.refine.edge_canvas = 512
    # infer_rw: radius of the walk's transitions on the stride-4 grid (training uses train_aff.radius, 10).
    config.refine.rw_radius = 5
    # infer_rw: exponent of the affinities (A ** beta) before the transition matrix is normalised.
    config.refine.rw_beta = 10
    # infer_rw: the CAMs are propagated 2 ** rw_exp_times steps (the authors square the transition matrix this often).
    config.refine.rw_exp_times = 8
    return config
