"""Training tasks: what the generic driver (``puzzle_jax.driver``) needs from each model family.

A task owns its model's construction from the config, its objective, its input transform, the records it reads and
which parts of an exported model ``init_from`` may initialise; the driver owns everything else a training stage does
(data loading, mesh, steps, optimizer, remat, the loop, the export). See ``base.Task``.

Modules:
  base        the ``Task`` interface and what every task shares (normalising the loader's uint8 crops).
  classifier  the CAM classifier: classification (the ``pretrain`` stage) and the Puzzle-CAM objective
              (``train_cam``).
  affinity    AffinityNet's edge branches on a frozen backbone, trained on affinity labels (``train_aff``).
"""
