"""Where does 2-D tensor parallelism pay? Predicted per-layer cost of `tensor` against `tensor2d` grids.

    python benchmarks/tensor_parallel_2d.py

For GPT blocks of several widths, sequence lengths and micro-batches on one 8-GPU A100 node (bf16), prints
one transformer block's time per micro-batch (forward + backward, with its tensor-parallel communication) and
the activations it keeps, under 1-D tensor parallelism over tp = 8 (without and with sequence parallelism)
and on every 2-D grid of tp = 8. Then it plans the whole model (global batch 4 micro-batches) with the mesh
pinned to pp 2 x tp 8 on two nodes, where sequence parallelism is not offered (the runtime runs it without a
pipeline only), and shows what the planner's per-layer ILP chose for the blocks.
1-D all-reduces the full activation twice per unit whatever tp is; 2-D gathers 1/rows of it over the columns
and the weights over the rows, so it pays when a micro-batch holds many tokens per hidden feature.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodel import load_cluster  # noqa: E402
from planner.api import plan  # noqa: E402
from planner.layer_options import LayerOption, price_layer_option  # noqa: E402
from planner.model_graph import build_model_graph  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan import grid_rows_options  # noqa: E402
from planner.tensor_parallel_collectives import supports_tensor_parallel_2d  # noqa: E402

CLUSTER = "a100-80g"
TP = 8
DTYPE = "bfloat16"
# (hidden, heads, sequence length, micro-batch): a wide short-context block, then narrower, longer ones
SHAPES = [(12288, 96, 2048, 8), (4096, 32, 4096, 8), (2048, 16, 8192, 8), (1024, 16, 16384, 8),
          (512, 8, 16384, 16)]
LAYERS = 4


def write_gpt_model(folder: Path, hidden: int, heads: int, seq: int, global_batch: int) -> str:
    """A file holding a 4-block GPT of this shape, for `plan()` (which takes `file.py:function`); its source."""
    path = folder / f"gpt_{hidden}_{seq}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'examples')!r})\nfrom gpt import build_gpt\n\n\n"
                    f"def model():\n    return build_gpt(vocab=512, seq_len={seq}, hidden={hidden}, num_heads={heads},"
                    f" num_layers={LAYERS}, global_batch_size={global_batch})\n")
    return f"{path}:model"


def main() -> None:
    cluster = load_cluster(CLUSTER)
    print(f"one GPT block per micro-batch on {CLUSTER}, tp={TP}, {DTYPE}: time ms (tensor-parallel comm ms), "
          "activations MiB")
    grids = [f"2-D {r}x{TP // r}" for r in grid_rows_options(TP)]
    header = ["hidden", "seq", "mb", "tensor", "tensor + sp", *grids, "planner pp2 x tp8", "plan s"]
    print("  ".join(f"{h:>22}" if i >= 3 else f"{h:>6}" for i, h in enumerate(header)))
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, heads, seq, batch in SHAPES:
            source = write_gpt_model(Path(tmp), hidden, heads, seq, 4 * batch)
            spec = load_model_spec(source, device="meta")
            graph = build_model_graph(spec, sample_batch_size=1)
            block = next(layer for layer in graph.layers if layer.tp_units)
            cells = []
            for option in [LayerOption("tensor"), LayerOption("tensor", sequence_parallel=True)] + \
                    [LayerOption("tensor2d", tp_rows=r)
                                                     for r in grid_rows_options(TP)]:
                if option.tp_rows and not supports_tensor_parallel_2d(block, option.tp_rows, TP // option.tp_rows,
                                                                        batch):
                    cells.append("-")
                    continue
                cost = price_layer_option(block, option, TP, batch / graph.sample_batch_size, cluster, DTYPE)
                cells.append(f"{cost.time_s * 1e3:.2f} ({cost.tp_communication_s * 1e3:.2f}) "
                             f"{cost.activation_bytes / 2**20:.0f}")
            start = time.perf_counter()
            # a pipelined plan: 2-D competes with plain `tensor` and with sequence parallelism
            chosen = plan(source, CLUSTER, 2 * TP, mesh=(2, 1, TP), param_dtype=DTYPE)
            elapsed = time.perf_counter() - start
            strategies = Counter(f"{layer.strategy}{layer.tp_rows or ''}{'+sp' if layer.sequence_parallel else ''}"
                                 for layer in chosen.layers if layer.tensor_parallel)
            picked = ", ".join(f"{n} {s}" for s, n in sorted(strategies.items())) or "no unit sharded"
            print(f"{hidden:>6}  {seq:>6}  {batch:>6}  " + "  ".join(f"{c:>22}" for c in cells) +
                  f"  {picked:>22}  {elapsed:>6.1f}", flush=True)
    print("\n'2-D RxC': R rows (batch split) x C columns (features split); '-': the grid does not divide the "
          "micro-batch or the features. Planner column: blocks by strategy (tensor2d<rows>).")


if __name__ == "__main__":
    main()
