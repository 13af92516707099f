#!/usr/bin/env bash
# One GPU (H100 or H200): install, calibrate, then plan and execute three plans of a 1.3B-class GPT (GPT-3 XL:
# 24 layers, hidden 2048, 16 heads, vocab 51200; seq 1024, global batch 4) and print predicted vs measured step
# time, peak memory and MFU. Meant to finish in under 8 minutes (about 1 min install + calibrate, 1-2 min per plan).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Plans (world size 1, dp1): fp32 without activation checkpointing, fp32 with full checkpointing on every block,
# and bf16 mixed precision (fp32 master weights) as the planner chooses it. MFU = model FLOPs of a step (the
# traced forward + backward FLOPs, recomputation not counted) / (step time x the profile's peak for the compute
# dtype). Nothing outside the machine is needed when torch, networkx, pulp, highspy and pyyaml are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d -t meshplan-gpu-check-XXXX)}
mkdir -p "$out"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start )) s] $*"; }

stamp "0. install"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
if python -c "import networkx, pulp, highspy, yaml" 2>/dev/null; then
  pip install -q --no-deps --no-build-isolation -e . || pip install -q --no-deps -e .
else
  pip install -q -e .   # needs the package index
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

stamp "1. calibrate this GPU (quick: matmul and copy curves per dtype, per-op overhead, host link)"
meshplan calibrate --nproc-per-node 1 --quick --out "$out/gpu.yaml"

cat > "$out/gpt13.py" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent / "examples"))
from gpt import build_gpt


def build():
    """GPT-3 XL shape (1.3B parameters), seq 1024, global batch 4: one GPU, no micro-batching needed."""
    return build_gpt(vocab=51200, seq_len=1024, hidden=2048, num_heads=16, num_layers=24, global_batch_size=4)
PY
cp -r examples "$out/"

stamp "2. plan three dp1 plans (fp32 no checkpointing, fp32 full checkpointing, bf16 mixed precision)"
python - "$out" <<'PY'
import sys
from pathlib import Path

from costmodel import load_cluster
from planner.api import plan
from planner.model_graph import build_model_graph
from planner.model_spec import load_model_spec
from planner.recost import recost_plan

out = Path(sys.argv[1])
model = f"{out}/gpt13.py:build"
cluster = str(out / "gpu.yaml")
spec = load_model_spec(model, device="meta")
graph = build_model_graph(spec)
flops = sum(layer.fwd_flops + layer.bwd_flops for layer in graph.layers)
(out / "model_flops.txt").write_text(f"{flops:.6e}\n")
for name, dtype, ckpt in (("fp32", "float32", "none"), ("fp32-ckpt", "float32", "full"),
                          ("bf16", "bfloat16", None)):
    p = plan(model, cluster, 1, mesh=(1, 1, 1), param_dtype=dtype)
    if ckpt is not None:  # pin the checkpointing of every block, then price the edited plan again
        for layer in p.layers:
            layer.checkpoint = ckpt if layer.path.startswith("blocks.") else "none"
            layer.offload_activations = False
        recosted = recost_plan(p, spec.model, graph, load_cluster(cluster).for_world_size(1))
        p.predicted = recosted.prediction
    p.save(out / f"{name}.yaml")
    print(f"{name}: predicted {p.predicted.step_time_ms:.1f} ms, {p.predicted.peak_memory_mib / 1024:.2f} GiB; "
          f"checkpoint {sorted({layer.checkpoint for layer in p.layers})}")
print(f"model FLOPs per step (traced forward + backward): {flops:.3e}")
PY

for name in fp32 fp32-ckpt bf16; do
  stamp "3. execute $name (6 steps)"
  timeout 240 meshplan execute "$out/$name.yaml" --steps 6 --report-json "$out/$name.json" --quiet \
    || echo "$name: execute failed (status $?)"
done

stamp "4. predicted vs measured"
python - "$out" <<'PY'
import json
import sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
flops = float((out / "model_flops.txt").read_text())
profile = yaml.safe_load((out / "gpu.yaml").read_text())
print(f"{'plan':<11}{'pred ms':>9}{'meas ms':>9}{'error':>8}{'pred GiB':>10}{'meas GiB':>10}{'error':>8}"
      f"{'MFU':>7}  peak used")
for name, dtype in (("fp32", "float32"), ("fp32-ckpt", "float32"), ("bf16", "bfloat16")):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"{name:<11}  no report (execute failed)")
        continue
    r = json.loads(path.read_text())
    t_pred, t_meas = r["predicted_step_time_ms"], r["measured_step_time_ms"]
    m_pred, m_meas = r["predicted_peak_memory_mib"] / 1024, r["measured_peak_memory_mib"] / 1024
    peak = profile["peak_tflops"].get(dtype, profile["peak_tflops"]["float32"]) * 1e12
    mfu = flops / (t_meas / 1e3) / peak
    print(f"{name:<11}{t_pred:>9.1f}{t_meas:>9.1f}{(t_pred - t_meas) / t_meas:>+8.0%}{m_pred:>10.2f}{m_meas:>10.2f}"
          f"{(m_pred - m_meas) / m_meas:>+8.0%}{mfu:>7.1%}  {peak / 1e12:.0f} TFLOP/s ({dtype})")
PY
stamp "done; files in $out"
