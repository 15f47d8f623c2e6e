"""Images/second of the paper's stage-1 training step on a GPU.

The recipe of METHOD §5: DeepLabV3+ with an EfficientNet-b6 encoder, 32 synthetic + 32
real images of 224 px per step, float16 mixed precision, channels-last memory format,
all three losses and the AdamW step; the bare smp DeepLabV3+ passes over the same images
are measured in the same run for reference (see ``train_step.py``).

    python benchmarks/gpu_step.py                 # cuda:0
    python benchmarks/gpu_step.py --device cuda:1 --iters 20

Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import parse_args, run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        argv,
        device="cuda",
        encoder="efficientnet-b6",
        batch=32,
        size=224,
        iters=10,
        warmup=3,
        amp=True,
        channels_last=True,
    )
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (gpu_step.py needs one)")
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
