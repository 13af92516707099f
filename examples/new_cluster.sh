#!/usr/bin/env bash
# "A new cluster", end to end: measure the machine you are on, plan against that measurement, read the plan,
# then train with it. On a GPU node drop `--base cpu` (or name the closest preset, e.g. --base h100) and set
# --nproc-per-node to the GPUs per node; the rest is the same.
#
#     bash examples/new_cluster.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d -t meshplan-new-cluster-XXXX)}
mkdir -p "$out"

echo "== 1. calibrate: matmul and copy curves, per-op overhead, collectives between 2 processes"
meshplan calibrate --base cpu --nproc-per-node 2 --quick --out "$out/cluster.yaml"

echo "== 2. plan a small GPT for 2 ranks against the measured profile"
meshplan plan examples/gpt.py:build_gpt --cluster "$out/cluster.yaml" --world-size 2 --out "$out/plan.yaml"

echo "== 3. show the plan and the alternatives it beat"
meshplan show "$out/plan.yaml" --why

echo "== 4. execute: 3 training steps, measured time and memory beside the predictions"
meshplan execute "$out/plan.yaml" --steps 3
echo "files in $out"
