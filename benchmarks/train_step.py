"""Cost of one full HisynSeg stage-1 training step against plain DeepLabV3+ steps.

The full step is what :class:`hisynseg.training.module.HisynSegModule` does per batch:
one synthetic batch and one real batch concatenated through the network (DeepLabV3+ with
the CAM head), the classification, Dice and consistency losses, backward, AdamW step.

The baseline is smp's bare ``DeepLabV3Plus`` with the same encoder, trained on the same
images with a plain cross-entropy: one forward/backward/AdamW step on the synthetic batch
and one on the real batch ("two bare passes"), which is what the two loaders would cost
without HisynSeg's extras. Both are measured in the same run, interleaved iteration by
iteration so that machine load affects both alike; the fastest (least disturbed) and the
median iteration are reported.

Target: full step <= 1.15 x two bare passes. For reference it also times one bare pass
over both batches concatenated, which isolates what the CAM head and the three losses
add to the same forward/backward, and the full step with ``trainer.split_forward`` (the
two batches through the network in two passes, one optimizer step): on CPUs one pass over
2N images can cost more than two passes over N.

    python benchmarks/train_step.py                       # CPU, resnet18, 8+8 at 160 px
    python benchmarks/train_step.py --device cuda --encoder efficientnet-b6 --batch 32 \\
        --size 224 --amp --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

NUM_CLASSES = 4
BACKGROUND = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(batch: int, size: int, device: torch.device) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, NUM_CLASSES + 1, (batch, size, size), generator=g)
    label = torch.stack(
        [torch.bincount(m[m < NUM_CLASSES], minlength=NUM_CLASSES) > 0 for m in mask]
    )
    syn = {
        "image": torch.randn(batch, 3, size, size, generator=g),
        "mask": mask,
        "label": label.float(),
    }
    real = {
        "image": torch.randn(batch, 3, size, size, generator=g),
        "label": torch.randint(0, 2, (batch, NUM_CLASSES), generator=g).float(),
        # Only the bare baseline uses a mask for the real batch (its cross-entropy target).
        "mask": torch.randint(0, NUM_CLASSES, (batch, size, size), generator=g),
    }
    move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
    return move(syn), move(real)


def build_steps(
    encoder: str, batch: int, size: int, device: torch.device, amp: bool, channels_last: bool
) -> dict[str, Callable[[], None]]:
    """Callables that each run one training iteration over the same ``2 x batch`` images:
    ``full`` (joint forward), ``split`` (``trainer.split_forward``), ``bare`` (two bare
    passes) and ``one`` (one bare pass over both batches concatenated, which isolates the
    cost of the CAM head and the extra losses)."""
    import segmentation_models_pytorch as smp

    from hisynseg.config import Config, apply_overrides, config_to_dict
    from hisynseg.datasets.spec import get_dataset_spec
    from hisynseg.training.module import HisynSegModule

    spec = get_dataset_spec("luad-histoseg")
    cfg = apply_overrides(
        Config(), [f"data.patch_size={size}", f"trainer.channels_last={channels_last}"]
    )
    module = HisynSegModule(
        model={"encoder": encoder, "num_classes": spec.num_classes},
        dataset=spec.to_dict(),
        config=config_to_dict(cfg),
    ).to(device)
    module.train()
    full_opt = module.configure_optimizers()

    bare = smp.DeepLabV3Plus(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_output_stride=16,
        classes=spec.num_classes,
    ).to(device)
    if channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    bare.train()
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, weight_decay=0.05)

    syn, real = _batches(batch, size, device)
    batch_dict = {"labelled": syn, "real": {k: real[k] for k in ("image", "label")}}
    use_amp = amp and device.type == "cuda"
    full_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    bare_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def autocast() -> contextlib.AbstractContextManager:
        if use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def full_step(split: bool = False) -> None:
        module.cfg.trainer.split_forward = split
        full_opt.zero_grad(set_to_none=True)
        with autocast():
            loss = module.compute_losses(batch_dict)["loss"]
        full_scaler.scale(loss).backward()
        full_scaler.step(full_opt)
        full_scaler.update()

    def bare_pass(data: dict) -> None:
        x = data["image"]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bare_opt.zero_grad(set_to_none=True)
        with autocast():
            logits = bare(x)
        loss = F.cross_entropy(logits.float(), data["mask"], ignore_index=BACKGROUND)
        bare_scaler.scale(loss).backward()
        bare_scaler.step(bare_opt)
        bare_scaler.update()

    def two_bare_passes() -> None:
        bare_pass(syn)
        bare_pass(real)

    both = {k: torch.cat([syn[k], real[k]]) for k in ("image", "mask")}

    def one_bare_pass() -> None:
        bare_pass(both)

    return {
        "full": full_step,
        "split": lambda: full_step(split=True),
        "bare": two_bare_passes,
        "one": one_bare_pass,
    }


def measure(
    encoder: str = "resnet18",
    batch: int = 8,
    size: int = 160,
    device: str = "cpu",
    iters: int = 5,
    warmup: int = 2,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Seconds per iteration of both (min and median), images/second, and their ratios."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    steps = build_steps(encoder, batch, size, dev, amp, channels_last)
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(iters):
        # Rotate the order so that none always runs right after the same other one.
        k = i % len(names)
        for name in names[k:] + names[:k]:
            _sync(dev)
            start = time.perf_counter()
            steps[name]()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
    images = 2 * batch
    result: dict[str, float] = {}
    # The minimum is the least disturbed iteration (a shared machine adds only delays);
    # the median shows the typical one.
    for stat, fn in (("min", min), ("median", statistics.median)):
        for name in names:
            result[f"{name}_s_{stat}"] = fn(times[name])
            result[f"{name}_images_per_s_{stat}"] = images / fn(times[name])
        result[f"ratio_{stat}"] = result[f"full_s_{stat}"] / result[f"bare_s_{stat}"]
        result[f"ratio_split_{stat}"] = result[f"split_s_{stat}"] / result[f"bare_s_{stat}"]
        result[f"ratio_one_{stat}"] = result[f"full_s_{stat}"] / result[f"one_s_{stat}"]
    return result


def parse_args(argv: list[str] | None = None, **defaults: object) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--batch", type=int, default=8, help="images per loader (synthetic = real)")
    p.add_argument("--size", type=int, default=160, help="image side (multiple of 32)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--amp", action="store_true", help="float16 autocast + grad scaling (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.set_defaults(**defaults)
    return p.parse_args(argv)


def report(args: argparse.Namespace, r: dict[str, float]) -> None:
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        device = f"{device} ({torch.get_num_threads()} threads)"
    print(
        f"device {device}, encoder {args.encoder}, {args.batch}+{args.batch} images of "
        f"{args.size}px, amp {args.amp}, channels_last {args.channels_last}, "
        f"{args.iters} timed iterations after {args.warmup} warm-up"
    )
    for stat in ("min", "median"):
        print(f"[{stat} of {args.iters}]")
        print(
            f"  full stage-1 step : {r[f'full_s_{stat}']:.3f} s "
            f"{r[f'full_images_per_s_{stat}']:8.1f} images/s"
        )
        print(
            f"  full, split fwd   : {r[f'split_s_{stat}']:.3f} s "
            f"{r[f'split_images_per_s_{stat}']:8.1f} images/s"
        )
        print(
            f"  two bare passes   : {r[f'bare_s_{stat}']:.3f} s "
            f"{r[f'bare_images_per_s_{stat}']:8.1f} images/s"
        )
        print(
            f"  one bare pass x{2 * args.batch:<3}: {r[f'one_s_{stat}']:.3f} s "
            f"{r[f'one_images_per_s_{stat}']:8.1f} images/s"
        )
        verdict = "within" if r[f"ratio_{stat}"] <= 1.15 else "ABOVE"
        print(
            f"  ratio full / two bare passes : {r[f'ratio_{stat}']:.3f}  ({verdict} the 1.15 target)"
        )
        verdict = "within" if r[f"ratio_split_{stat}"] <= 1.15 else "ABOVE"
        print(
            f"  ratio split / two bare passes: {r[f'ratio_split_{stat}']:.3f}  "
            f"({verdict} the 1.15 target)"
        )
        print(f"  ratio full / one bare pass   : {r[f'ratio_one_{stat}']:.3f}  (CAM head + losses)")


def run(args: argparse.Namespace) -> int:
    """Measure as ``args`` say and print the figures."""
    torch.manual_seed(0)
    r = measure(
        args.encoder,
        args.batch,
        args.size,
        args.device,
        args.iters,
        args.warmup,
        args.amp,
        args.channels_last,
    )
    report(args, r)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
