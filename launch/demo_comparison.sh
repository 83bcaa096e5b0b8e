#!/usr/bin/env bash
# Reproduces the README's demo table: Puzzle-CAM (cl_pcl_re) vs plain CAM (cl) from the same pretrained
# backbone, for two training seeds, on the built-in demo data. About 6 minutes per run on a 2-core CPU.
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
      --config.stages=$stages --config.cam.loss_option=$option --config.model.init_from="$pretrained"
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
