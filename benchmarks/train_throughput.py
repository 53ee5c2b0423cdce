"""Training throughput: the project's tensor pipeline vs. the seed report's DataLoader pipeline.

Both train the same `seed` model with the same optimizer (SGD lr 0.1) at batch 64, alternating in one
process, so machine noise hits both alike. The seed pipeline is rebuilt as the report's code did it:
torchvision ``ImageFolder`` + ``ToTensor`` + ``Normalize(0.5, 0.5)`` + ``DataLoader`` (shuffle,
workers, pinned memory on CUDA), the loss read back (``loss.item()``) every step, default memory
format and layer order (Conv -> ReLU -> MaxPool). Both use the autocast dtype that ``--amp``
resolves to on this device; on a CPU without native bf16 (where that is fp32) the seed pipeline is
also timed with the bf16 autocast its own AMP code would run.

    python benchmarks/train_throughput.py --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/train_throughput.py --device cuda --full-recipe   # + the 50-epoch seed recipe

Prints images/s for each pipeline per round, the median ratio, peak memory and the hardware.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cifar_exp.config import DataConfig, TrainConfig
from cifar_exp.data import DeviceBatches, ImageSet, load_splits
from cifar_exp.models import seed_as_reported
from cifar_exp.train import (
    build_classifier,
    build_optimizer,
    build_scheduler,
    cpu_name,
    fit,
    resolve_amp_dtype,
    resolve_device,
    train_epoch,
)


def project_pipeline(cfg: TrainConfig, train: ImageSet, steps: int, device: torch.device) -> float:
    """Images/s of the project's training epoch over ``steps`` batches."""
    subset = ImageSet("train", train.images[: steps * cfg.batch_size], train.labels[: steps * cfg.batch_size])
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_classifier(cfg, 10).to(device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    batches = DeviceBatches(subset, cfg.batch_size, device=device, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed, channels_last=cfg.channels_last)
    scheduler = build_scheduler(cfg, optimizer, len(batches))
    amp_dtype = resolve_amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step_model = torch.compile(model) if cfg.compile else model
    train_epoch(step_model, batches, optimizer, scheduler, scaler, amp_dtype, 0.0, None)  # warm-up
    _sync(device)
    start = time.perf_counter()
    train_epoch(step_model, batches, optimizer, scheduler, scaler, amp_dtype, 0.0, None)
    _sync(device)
    return len(subset) / (time.perf_counter() - start)


def seed_pipeline(cfg: TrainConfig, loader: DataLoader, steps: int, device: torch.device) -> float:
    """Images/s of the seed report's loop over ``steps`` batches, DataLoader workers already running."""
    model = seed_as_reported().to(device)  # Normalize happens in the transform instead
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    amp_dtype = resolve_amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model.train()

    def run(count: int) -> int:
        seen, running_loss = 0, 0.0
        for step, (images, labels) in enumerate(loader):
            if step == count:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running_loss += loss.item()  # as the report's loop did: a host sync every step
            seen += len(labels)
        return seen

    run(5)  # warm-up: workers started, first batches decoded
    start = time.perf_counter()
    seen = run(steps)
    _sync(device)
    return seen / (time.perf_counter() - start)


def full_recipe_seconds(data_dir: str, device: torch.device) -> tuple[float, float]:
    """Wall time and test accuracy of the whole 50-epoch seed recipe through ``fit``."""
    splits = load_splits(DataConfig(data_dir=data_dir))
    start = time.perf_counter()
    result = fit(TrainConfig(device=device.type), splits)
    seconds = time.perf_counter() - start
    from cifar_exp.train import evaluate

    test = evaluate(result.model, splits.test, amp_dtype=result.amp_dtype, channels_last=True)
    return seconds, test.accuracy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg-dev")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=150, help="Timed batches per pipeline per round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the seed pipeline.")
    parser.add_argument("--compile", action="store_true", help="Also time the project pipeline compiled.")
    parser.add_argument("--full-recipe", action="store_true", help="Also time the 50-epoch seed recipe.")
    args = parser.parse_args()

    device = resolve_device(args.device)
    cfg = TrainConfig(device=device.type)
    amp_dtype = resolve_amp_dtype(cfg, device)
    train = load_splits(DataConfig(data_dir=args.data_dir)).train
    folder = datasets.ImageFolder(
        str(Path(args.data_dir) / "train"),
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]),
    )
    loader = DataLoader(folder, batch_size=64, shuffle=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    print(f"hardware: {_hardware(device)}; torch {torch.__version__}; autocast: {amp_dtype or 'fp32'}")
    print(f"seed model, batch 64, {args.steps} timed steps per pipeline, {args.rounds} alternating rounds")
    pipelines = {"project": lambda: project_pipeline(cfg, train, args.steps, device),
                 "seed-dataloader": lambda: seed_pipeline(cfg, loader, args.steps, device)}
    if device.type == "cpu" and amp_dtype is None:
        # No native bf16 here, so --amp resolves to fp32; the seed's own code would still autocast.
        seed_amp = TrainConfig(device="cpu", amp_dtype="bfloat16")
        pipelines["seed-dataloader-bf16"] = lambda: seed_pipeline(seed_amp, loader, args.steps, device)
    if args.compile:
        compiled = TrainConfig(device=device.type, compile=True)
        pipelines["project+compile"] = lambda: project_pipeline(compiled, train, args.steps, device)
    results: dict[str, list[float]] = {name: [] for name in pipelines}
    for round_index in range(args.rounds):
        for name, measure in pipelines.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            results[name].append(measure())
            peak = (f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
                    if device.type == "cuda"
                    else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process RSS so far")
            print(f"round {round_index + 1} {name:<16} {results[name][-1]:8.0f} images/s  (peak {peak})")
    baseline = statistics.median(results["seed-dataloader"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<16} median {median:8.0f} images/s  spread {min(values):.0f}-{max(values):.0f}  "
              f"ratio vs seed pipeline {median / baseline:.2f}x")
    if args.full_recipe:
        seconds, accuracy = full_recipe_seconds(args.data_dir, device)
        print(f"full seed recipe (50 epochs, 40k images, batch 64): {seconds:.1f} s, test accuracy {accuracy:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
