"""Data: the tfds builders (the built-in demo set, PASCAL VOC 2012 + SBD, COCO 2014, a user's VOC-layout folder),
the dataset registry, host-side transforms and the grain input pipelines.

Modules, each importing only those listed before it (and `puzzle_jax.labels`, which owns label maps):
  records         the record schema every builder stores and every stage reads (image, mask, id, labels, and
                  optionally parts: the body and the discriminative part of each object).
  readers         readers of example files: split lists, images, VOC XML labels, SBD masks.
  manual_builder  the base of the builders of downloaded data: `root`, config names, bad-example policy.
  demo            the procedurally generated "puzzle_demo" builder.
  voc             the "voc2012_aug" builder (PASCAL VOC 2012 + SBD) and VOC's class names.
  voc_folder      the "voc_folder" builder: a user's dataset in VOC layout.
  coco            the "coco2014" builder: semantic masks rendered from COCO's instances.
  datasets        name -> builder registry, `load_split` (decoded random-access records), and a split joined
                  with a folder of label PNGs written by an earlier stage.
  cli             command lines: `check-folder` (prepare and report a dataset), `preview-demo`.
  transforms      numpy/PIL augmentation and normalisation (spec §4).
  input_pipeline  grain train loader and each training task's transform, eval iterator, steps per epoch.
"""
