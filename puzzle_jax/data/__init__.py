"""Data: tfds builders (the built-in demo set; VOC/COCO later), the dataset registry, host-side
transforms and the grain input pipelines.

Modules:
  datasets        name -> builder registry and `load_split` (decoded random-access records).
  demo            the procedurally generated "puzzle_demo" builder and its preview.
  transforms      numpy/PIL augmentation and normalisation (spec §4).
  input_pipeline  grain train loader, eval iterator, steps per epoch.
"""
