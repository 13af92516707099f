"""Capture and ModelGraph: layer chains, parameter counts, FLOPs against hand formulas, saved activations."""

from pathlib import Path

import pytest
import torch

from planner.capture import CaptureError
from planner.model_graph import build_model_graph
from planner.model_spec import ModelSpec, ModelSpecError, load_model_spec

ROOT = Path(__file__).resolve().parents[1]


def test_mlp_layers_params_and_flops():
    spec = load_model_spec(f"{ROOT}/tests/models.py:build_mlp", device="meta")
    graph = build_model_graph(spec)
    assert [layer.path for layer in graph.layers] == ["0", "1", "2", "3", "4"]
    assert [layer.num_params for layer in graph.layers] == [16 * 64 + 64, 0, 64 * 16 + 16, 0, 16 * 4 + 4]
    batch = spec.global_batch_size
    # a linear's forward is 2 * batch * in * out FLOPs; backward computes input and weight grads (2x),
    # except the first layer, whose input needs no gradient
    assert graph.layers[0].fwd_flops == 2 * batch * 16 * 64
    assert graph.layers[2].fwd_flops == 2 * batch * 64 * 16
    assert graph.layers[2].bwd_flops == 2 * graph.layers[2].fwd_flops
    assert graph.layers[0].bwd_flops == graph.layers[0].fwd_flops
    assert graph.num_params == sum(p.numel() for p in spec.model.parameters())
    for node, data in graph.graph.nodes(data=True):
        assert data["phase"] in ("forward", "backward"), node


def test_gpt_chain_kinds_and_tensor_parallel_units():
    spec = load_model_spec(f"{ROOT}/examples/gpt.py:build_gpt", device="meta")
    graph = build_model_graph(spec)
    paths = [layer.path for layer in graph.layers]
    assert paths == ["wte", "wpe", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "ln_f", "head"]
    kinds = {layer.kind for layer in graph.layers if layer.path.startswith("blocks.")}
    assert len(kinds) == 1, "identical blocks share one kind"
    assert len(graph.kinds()) == 5
    block = graph.layers[2]
    units = {(u.colwise, u.rowwise) for u in block.tp_units}
    assert units == {(("attn.k", "attn.q", "attn.v"), "attn.proj"), (("mlp.fc",), "mlp.proj")}
    hidden, seq, batch, heads = 64, 32, spec.global_batch_size, 4
    tokens = batch * seq
    linear_flops = 2 * tokens * (4 * hidden * hidden + 2 * hidden * 4 * hidden)
    attention_flops = 2 * 2 * batch * heads * seq * seq * (hidden // heads)
    assert block.fwd_flops == pytest.approx(linear_flops + attention_flops, rel=1e-6)
    # every parameter but the norms and the row linears' biases (added after the all-reduce) is sharded
    assert block.tp_num_params == block.num_params - 4 * hidden - 2 * hidden  # norms, row-linear biases
    assert block.tp_bwd_flops == pytest.approx(2 * block.tp_fwd_flops, rel=1e-6)
    assert block.tp_allreduce_bytes == 2 * tokens * hidden * 4
    assert 0 < block.tp_saved_bytes < block.saved_bytes
    assert graph.layers[-1].num_params == hidden * 256


def test_planning_allocates_no_weights():
    spec = load_model_spec(f"{ROOT}/examples/gpt.py:build_gpt", device="meta")
    assert all(p.device.type == "meta" for p in spec.model.parameters())
    build_model_graph(spec)


def test_untraceable_model_names_the_line():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum().item() > 0:  # reads a value: cannot be traced on fake tensors
                return self.lin(x)
            return x

    spec = ModelSpec(model=DataDependent(), make_batch=lambda b, s: ((torch.randn(b, 4),), torch.randn(b, 4)),
                     loss_fn=torch.nn.functional.mse_loss, global_batch_size=2)
    with pytest.raises(CaptureError, match=r"test_capture.py:\d+"):
        build_model_graph(spec)


@pytest.mark.parametrize("source, message", [
    ("no_colon", "must look like"),
    ("missing.py:f", "not found"),
    (f"{ROOT}/tests/models.py:nope", "has no function"),
    (f"{ROOT}/tests/models.py:torch", "has no function"),
])
def test_bad_model_reference(source, message):
    with pytest.raises(ModelSpecError, match=message):
        load_model_spec(source)


class _ListIndexHeads(torch.nn.Module):
    """Falcon's multi-query split: `fused[..., [-1], :]` indexes with a Python list, which makes a constant
    index tensor on the model's device (meta while planning), not a fake one."""

    def __init__(self):
        super().__init__()
        self.fused = torch.nn.Linear(8, 12)

    def forward(self, x):
        fused = self.fused(x).view(x.shape[0], 3, 4)
        return (fused[:, :-2, :] * fused[:, [-2], :] + fused[:, [-1], :]).sum(1)


class _GroupedExperts(torch.nn.Module):
    """Experts as one `grouped_mm`, transformers' default MoE kernel: its CPU kernel takes float32, its fake
    kernel wants bfloat16."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x):
        offs = torch.tensor([x.shape[0] // 2, x.shape[0]], dtype=torch.int32, device=x.device)
        return torch.nn.functional.grouped_mm(x, self.weight, offs=offs)


def _spec(model):
    return ModelSpec(model=model, make_batch=lambda b, s: ((torch.randn(b, 8),), torch.randn(b, 4)),
                     loss_fn=lambda out, target: (out[:, :4] - target).pow(2).mean(), global_batch_size=4)


def test_constant_index_tensors_made_inside_forward_trace_on_meta():
    with torch.device("meta"):
        spec = _spec(_ListIndexHeads())
    assert build_model_graph(spec).num_params == 8 * 12 + 12


def test_a_fake_kernel_dtype_rule_names_the_op_and_the_moe_implementation_to_use():
    from planner.capture import capture_training_step

    with torch.device("meta"):
        spec = _spec(_GroupedExperts())
    with pytest.raises(CaptureError) as caught:
        capture_training_step(spec, 4)
    message = str(caught.value)
    assert "grouped_mm" in message and "fake (meta) kernel refuses these dtypes" in message, message
    assert 'config._experts_implementation = "batched_mm"' in message
    assert "needs one: `torch.library.register_fake`" not in message
