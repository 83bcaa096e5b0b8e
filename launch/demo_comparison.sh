#!/usr/bin/env bash
# Reproduces the README's demo table: Puzzle-CAM (cl_pcl_re) vs plain CAM (cl) from the same pretrained
# backbone, for two training seeds, on the built-in demo data. About 14 minutes in all on a 2-core CPU.
#   launch/demo_comparison.sh [ROOT=runs/demo_comparison]
set -euo pipefail
root=${1:-runs/demo_comparison}
cd "$(dirname "$0")/.."
pretrained=$root/pcl_seed0/pretrain/model
for seed in 0 1; do
  for option in cl_pcl_re cl; do
    workdir=$root/${option}_seed$seed
    if [[ $option == cl_pcl_re && $seed == 0 ]]; then
      stages=pretrain,train_cam,infer_cam,eval_cam   # the one run that also pretrains
      workdir=$root/pcl_seed0
    else
      stages=train_cam,infer_cam,eval_cam
    fi
    python3 -m puzzle_jax.main --config=configs/demo.py --workdir="$workdir" --config.seed=$seed \
      --config.stages=$stages --config.cam.loss_option=$option --config.train_cam.init_from="$pretrained"
  done
done
python3 - "$root" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "eval_cam", "summary.json"))):
    run = path.split(os.sep)[-3]
    summary = json.load(open(path))
    rows.append(f"| {run} | {summary['miou']:.2f} | {summary['best_threshold']:.2f} |")
print("| run | CAM mIoU % (train) | best threshold |\n|---|---|---|\n" + "\n".join(rows))
PY
# The README's picture: the first eight training images (not picked), each as image | plain CAM | Puzzle-CAM
# (seed 0; every map is the maximum over the image's classes).
python3 - "$root" <<'PY'
import os, sys
import cv2
import numpy as np
from configs import demo
from puzzle_jax import cam_files
from puzzle_jax.data.datasets import load_split_from_config
from puzzle_jax.pipeline import Workdir
from puzzle_jax.viz.overlays import cam_overlay
root = sys.argv[1]
source, _ = load_split_from_config(demo.get_config().data, "train")
cells = []
for index in range(8):
    record = source[index]
    image = record["image"]
    height, width = image.shape[:2]
    triplet = [image]
    for run in ("cl_seed0", "pcl_seed0"):
        cams = cam_files.read_cam_file(cam_files.path_of(Workdir(os.path.join(root, run)).cam_dir(), record["id"]))
        cams = cams["hr_cam"]
        triplet.append(cam_overlay(image, cams.max(axis=0)[:height, :width]))
    cells.append(np.concatenate([cv2.resize(view, (128, 128), interpolation=cv2.INTER_AREA) for view in triplet], 1))
sheet = np.concatenate([np.concatenate(cells[row : row + 2], 1) for row in range(0, 8, 2)], 0)
cv2.imwrite(os.path.join(root, "cams_cl_vs_puzzle.jpg"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
print("picture:", os.path.join(root, "cams_cl_vs_puzzle.jpg"))
PY
