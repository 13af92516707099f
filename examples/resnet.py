"""Hugging Face transformers' ResNet (ResNetForImageClassification) as a meshplan MODEL: a tiny config with
random weights built from `ResNetConfig` (nothing is downloaded).

    meshplan plan examples/resnet.py:build_resnet --cluster cpu --world-size 4 --out plan.yaml
    meshplan execute plan.yaml --steps 5
    python examples/resnet.py [--world-size 4] [--steps 5]   # both steps from Python

BatchNorm: the model trains in train mode, so each data-parallel rank normalises with the statistics of its
own slice of the batch and updates its own running statistics (FSDP2 leaves buffers alone; DDP overwrites them
with rank 0's before every forward, `broadcast_buffers`). A run on dp ranks therefore equals one process that
runs each dp slice through the model separately and averages the gradients, not one that normalises the whole
global batch at once (that needs `torch.nn.SyncBatchNorm`, which refuses CPU tensors in torch 2.13; on GPUs
convert the model with `nn.SyncBatchNorm.convert_sync_batchnorm` in this builder). Tensor parallelism and
pipeline stages leave BatchNorm exact: every tp rank of a dp group sees the same slice.
torchvision's resnet18 is not used: the torchvision 0.29.1 wheel does not load beside torch 2.13.0+cpu
(its compiled ops fail to register: "operator torchvision::nms does not exist").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification

from meshplan import ModelSpec


class ResNetLogits(nn.Module):
    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.resnet = ResNetForImageClassification(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.resnet(pixel_values=pixel_values).logits


def build_resnet(image_size: int = 32, num_classes: int = 4, global_batch_size: int = 8) -> ModelSpec:
    """ResNet with basic blocks, stages of 16 / 32 channels, one block each, on 32x32 images whose class is the
    quadrant holding a bright square."""
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", num_labels=num_classes)
    model = ResNetLogits(config)

    def make_batch(batch_size: int, step: int):
        gen = torch.Generator().manual_seed(2000 + step)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        half = image_size // 2
        for i, label in enumerate(labels.tolist()):
            row, col = divmod(label % 4, 2)
            images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 1.0
        return (images,), labels

    return ModelSpec(model=model, make_batch=make_batch, loss_fn=F.cross_entropy,
                     global_batch_size=global_batch_size, learning_rate=1e-3)


def main() -> None:
    """Plan for --world-size CPU ranks, print the plan's summary, train --steps steps and print the report."""
    import argparse
    from pathlib import Path

    from meshplan import execute, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    chosen = plan(f"{Path(__file__).resolve()}:build_resnet", cluster="cpu", world_size=args.world_size)
    mesh = chosen.mesh
    print(f"plan: pp={mesh.pp} x dp={mesh.dp} x tp={mesh.tp}, {chosen.data_parallel.kind}, "
          f"predicted {chosen.predicted.step_time_ms:.2f} ms per step")
    report = execute(chosen, steps=args.steps, quiet=True)
    print(f"trained {args.steps} steps: loss {report.losses[0]:.4f} -> {report.losses[-1]:.4f}")
    print(report.format())


if __name__ == "__main__":
    main()
