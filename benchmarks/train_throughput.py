"""Training throughput: the project's tensor pipeline vs. the seed report's DataLoader pipeline.

Both train the same `seed` model with the same optimizer (SGD lr 0.1) at batch 64, alternating round
by round, so machine noise hits both alike. The seed pipelines run in a child process of their own with
the C library's default allocator settings (the project's CPU training changes them for its process,
see ``train.keep_freed_memory_in_process``). The seed pipeline is rebuilt as the report's code did it:
torchvision ``ImageFolder`` + ``ToTensor`` + ``Normalize(0.5, 0.5)`` + ``DataLoader`` (shuffle,
workers, pinned memory on CUDA), the loss read back (``loss.item()``) every step, default memory
format and layer order (Conv -> ReLU -> MaxPool). On a CPU both use the autocast dtype that ``--amp``
resolves to; where that is fp32 (no native bf16) the seed pipeline is also timed with the bf16
autocast its own AMP code would run. On CUDA the seed pipeline runs fp16 with a GradScaler, as the
report's did, and the project's runs bf16, replayed as CUDA graphs (the default there) and eagerly.

    python benchmarks/train_throughput.py --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/train_throughput.py --device cuda --workers 2 8 --full-recipe   # + 50-epoch recipe
    # accuracy of the two pipelines: the 50-epoch seed recipe end to end, no throughput rounds
    python benchmarks/train_throughput.py --rounds 0 --full-recipe project --recipe-seeds 0 1 2
    python benchmarks/train_throughput.py --rounds 0 --full-recipe seed-dataloader --recipe-seeds 0

Prints images/s for each pipeline per round, the median ratio and each round's, peak memory and
the hardware. ``--full-recipe`` also trains the whole seed recipe (50 epochs, the 0.95 decay, the
stratified validation split that ``cifar-exp train`` carves, validated every epoch) with the project's
pipeline, the seed-style one or (no value) both, and prints each run's time and test accuracy and
their mean ± std over ``--recipe-seeds``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import multiprocessing
import resource
import signal
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from cifar_exp import interrupts
from cifar_exp.config import DataConfig, TrainConfig
from cifar_exp.data import DeviceBatches, ImageSet, Splits, load_dataset, load_splits, stratified_split_indices
from cifar_exp.errors import CifarExpError
from cifar_exp.models import seed_as_reported
from cifar_exp.train import (
    build_classifier,
    build_optimizer,
    build_scheduler,
    build_train_step,
    cpu_name,
    evaluate,
    fit,
    resolve_amp_dtype,
    resolve_device,
    train_epoch,
)


def project_pipeline(cfg: TrainConfig, train: ImageSet, steps: int, device: torch.device) -> tuple[float, str]:
    """(images/s, peak memory) of the project's training epoch over ``steps`` batches."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    subset = ImageSet("train", train.images[: steps * cfg.batch_size], train.labels[: steps * cfg.batch_size])
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_classifier(cfg, 10).to(device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    batches = DeviceBatches(subset, cfg.batch_size, device=device, shuffle=True, augment=cfg.augment,
                            seed=cfg.seed, channels_last=cfg.channels_last)
    scheduler = build_scheduler(cfg, optimizer, len(batches))
    step = build_train_step(cfg, model, optimizer, scheduler, resolve_amp_dtype(cfg, device))
    train_epoch(step, batches)  # warm-up (and compilation or graph capture)
    _sync(device)
    start = time.perf_counter()
    train_epoch(step, batches)
    _sync(device)
    return len(subset) / (time.perf_counter() - start), peak_memory(device)


def seed_pipeline(cfg: TrainConfig, loader: DataLoader, steps: int, device: torch.device) -> tuple[float, str]:
    """(images/s, peak memory) of the seed report's loop over ``steps`` batches, DataLoader workers
    already running."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = seed_as_reported().to(device)  # Normalize happens in the transform instead
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    amp_dtype = resolve_amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    model.train()

    def run(count: int) -> tuple[int, float]:
        """Train ``count`` batches; (images, seconds), timed from the first batch's arrival: a new
        iterator first resets the persistent workers, which is not the pipeline's steady state."""
        batches = iter(loader)
        first = next(batches)
        start = time.perf_counter()
        seen = 0
        for images, labels in itertools.chain([first], itertools.islice(batches, count - 1)):
            seed_step(model, optimizer, scaler, amp_dtype, images, labels)
            seen += len(labels)
        _sync(device)
        return seen, time.perf_counter() - start

    run(5)  # warm-up: workers started, first batches decoded
    seen, seconds = run(steps)
    return seen / seconds, peak_memory(device)


def seed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              amp_dtype: torch.dtype | None, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step of the report's loop; its loss, read back as the report's loop did (a host
    sync every step)."""
    device = next(model.parameters()).device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    optimizer.zero_grad()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(images), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB process RSS so far"


def _serve_seed_pipelines(connection: Connection, data_dir: str, device_type: str,
                          specs: dict[str, tuple[int, str]], steps: int) -> None:
    """Child process: measure the named seed pipeline on each request, until None arrives."""
    _die_with_parent()
    device = torch.device(device_type)
    folder = datasets.ImageFolder(
        str(Path(data_dir) / "train"),
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)]),
    )
    loaders = {workers: DataLoader(folder, batch_size=64, shuffle=True, num_workers=workers,
                                   pin_memory=device.type == "cuda", persistent_workers=workers > 0)
               for workers, _ in specs.values()}
    connection.send("ready")
    while (name := connection.recv()) is not None:
        workers, amp_dtype = specs[name]
        connection.send(seed_pipeline(TrainConfig(device=device_type, amp_dtype=amp_dtype), loaders[workers],
                                      steps, device))


class SeedPipelines:
    """The seed-style pipelines, each timed on request in one child process that keeps its loaders."""

    def __init__(self, data_dir: str, device_type: str, specs: dict[str, tuple[int, str]], steps: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        # Not a daemon: daemonic processes cannot start the DataLoader's worker processes.
        self.process = context.Process(target=_serve_seed_pipelines,
                                       args=(child, data_dir, device_type, specs, steps))
        self.process.start()
        child.close()  # the child's end lives in the child: a crash there ends recv() here with EOFError
        # Wait for its imports and loaders, so that they do not run beside a timed project round.
        if self.connection.recv() != "ready":
            raise RuntimeError("the seed pipelines' process did not start")

    def measure(self, name: str) -> tuple[float, str]:
        self.connection.send(name)
        return self.connection.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.connection.send(None)
            self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def full_recipe(splits: Splits, cfg: TrainConfig) -> tuple[float, float, int]:
    """Wall time of ``fit`` (50 epochs with per-epoch validation), test accuracy (of the fp32 model)
    and training images of the seed recipe on ``splits``, loaded beforehand."""
    start = time.perf_counter()
    result = fit(cfg, splits)
    seconds = time.perf_counter() - start
    test = evaluate(result.model, splits.test, channels_last=True)  # no autocast: the fp32 model, as exported
    return seconds, test.accuracy, len(splits.train)


def seed_recipe_split(data_dir: str, data: DataConfig, transform=None) -> tuple[Subset, Subset]:
    """The training and validation images of the seed report's loop: those ``full_recipe`` trains and
    validates on. ImageFolder lists them in the order the project's loader does (sorted classes,
    sorted file names), so the same stratified split indices pick the same images."""
    folder = datasets.ImageFolder(str(Path(data_dir) / "train"), transform=transform)
    train_indices, val_indices = stratified_split_indices(torch.tensor(folder.targets), data.val_size,
                                                          data.split_seed)
    return Subset(folder, train_indices.tolist()), Subset(folder, val_indices.tolist())


def seed_recipe(data_dir: str, val_size: int, device_type: str, workers: int,
                seed: int) -> tuple[float, float, int]:
    """The seed report's own 50-epoch training loop, run end to end on ``seed_recipe_split``'s images:
    wall time (with its per-epoch validation), test accuracy and training images."""
    device = torch.device(device_type)
    torch.manual_seed(seed)  # weights and the DataLoader's shuffling
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    train_images, val_images = seed_recipe_split(data_dir, DataConfig(val_size=val_size), transform)

    def loader(dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    train_loader = loader(train_images, 64, True)
    val_loader = loader(val_images, 1000, False)
    test_loader = loader(datasets.ImageFolder(str(Path(data_dir) / "test"), transform=transform), 1000, False)
    model = seed_as_reported().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    amp_dtype = resolve_amp_dtype(TrainConfig(device=device_type), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def accuracy(batches: DataLoader, autocast: bool = True) -> float:
        model.eval()
        correct = seen = 0
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype,
                                                    enabled=autocast and amp_dtype is not None):
            for images, labels in batches:
                predictions = model(images.to(device)).argmax(1).cpu()
                correct, seen = correct + (predictions == labels).sum().item(), seen + len(labels)
        return correct / seen

    start = time.perf_counter()
    for _ in range(TrainConfig().epochs):
        model.train()
        for images, labels in train_loader:
            seed_step(model, optimizer, scaler, amp_dtype, images, labels)
        scheduler.step()
        accuracy(val_loader)  # the report's per-epoch validation curve
    seconds = time.perf_counter() - start
    return seconds, accuracy(test_loader, autocast=False), len(train_images)  # fp32, as full_recipe


PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def _die_with_parent() -> None:
    """In a child process: be sent SIGTERM when the parent dies, also killed outright (SIGKILL), where it
    cannot stop its children; the DataLoader's workers then end with this process. Linux only."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _call_in_child(connection: Connection, function, *args) -> None:
    _die_with_parent()
    connection.send(function(*args))


def in_child_process(function, *args):
    """``function(*args)`` in a fresh process: with the C library's default allocator settings, as the
    report's code ran (the project's CPU training changes them for its process)."""
    context = multiprocessing.get_context("spawn")
    connection, child = context.Pipe()
    process = context.Process(target=_call_in_child, args=(child, function, *args))  # not a daemon: workers
    process.start()
    child.close()
    try:
        return connection.recv()  # EOFError if the child died
    except BaseException:  # e.g. Ctrl-C or SIGTERM here: the child's training must not go on alone
        process.terminate()
        raise
    finally:
        process.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} torch threads"


FULL_RECIPE_PIPELINES = ("project", "seed-dataloader")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg-dev")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=150, help="Timed batches per pipeline per round.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating throughput rounds (0: none).")
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="DataLoader workers of the seed pipeline; several values time one pipeline each.")
    parser.add_argument("--compile", action="store_true", help="Also time the project pipeline compiled.")
    parser.add_argument("--full-recipe", nargs="*", choices=FULL_RECIPE_PIPELINES,
                        help="Also train the 50-epoch seed recipe end to end and print its time and test accuracy, "
                        "with the project's pipeline (on CUDA: as CUDA graphs and eagerly), the seed-style "
                        "DataLoader pipeline (the first --workers value), or (no value) both.")
    parser.add_argument("--recipe-seeds", type=int, nargs="+", default=[0],
                        help="Seeds of the --full-recipe runs (mean and std over them).")
    parser.add_argument("--val-size", type=int, default=DataConfig().val_size,
                        help="Training images the --full-recipe runs carve off for validation.")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 0:
        parser.error(f"--steps must be >= 1 and --rounds >= 0, got {args.steps} and {args.rounds}")
    if min(args.workers) < 0:
        parser.error(f"--workers must be >= 0, got {' '.join(map(str, args.workers))}")

    try:
        device = resolve_device(args.device)
    except CifarExpError as error:
        parser.error(str(error))
    cfg = TrainConfig(device=device.type)
    amp_dtype = resolve_amp_dtype(cfg, device)
    if not (Path(args.data_dir) / "train").is_dir():
        parser.error(f"the seed pipeline reads an ImageFolder tree: {Path(args.data_dir) / 'train'} is not a folder")
    try:
        train, _, classes, _ = load_dataset(DataConfig(data_dir=args.data_dir))  # all of train/: no validation here
        if args.full_recipe is not None:  # its split, before any round: a --val-size the data cannot give fails now
            stratified_split_indices(train.labels, args.val_size, DataConfig().split_seed, classes)
    except CifarExpError as error:
        parser.error(str(error))
    # The seed's AMP: fp16 with a GradScaler on its RTX 3060; on a CPU the autocast --amp resolves to.
    seed_amp = {"": "float16" if device.type == "cuda" else "auto"}
    if device.type == "cpu" and amp_dtype is None:
        seed_amp["-bf16"] = "bfloat16"  # no native bf16 here (--amp: fp32); the seed's code would autocast
    seed_specs = {
        ("seed-dataloader" if len(set(args.workers)) == 1 else f"seed-dataloader-{workers}w") + suffix: (workers, dtype)
        for workers in dict.fromkeys(args.workers) for suffix, dtype in seed_amp.items()
    }
    print(f"hardware: {_hardware(device)}; torch {torch.__version__}; project autocast: {amp_dtype or 'fp32'}")
    if args.rounds:
        measure_throughput(args, cfg, train, device, seed_specs)
    if args.full_recipe is not None:
        train_full_recipes(args, device)
    sys.stdout.flush()


def measure_throughput(args: argparse.Namespace, cfg: TrainConfig, train: ImageSet, device: torch.device,
                       seed_specs: dict[str, tuple[int, str]]) -> None:
    # The seed pipelines run in a process of their own, as the report's code ran: with the C
    # library's default allocator settings, which the project's CPU training changes for its process.
    seed_process = SeedPipelines(args.data_dir, device.type, seed_specs, args.steps)
    print(f"seed model, batch 64, {args.steps} timed steps per pipeline, {args.rounds} alternating rounds")
    pipelines = {"project": lambda: project_pipeline(cfg, train, args.steps, device)}  # on CUDA: graphs
    if device.type == "cuda":
        eager = TrainConfig(device="cuda", cuda_graphs=False)
        pipelines["project-eager"] = lambda: project_pipeline(eager, train, args.steps, device)
    if args.compile:
        compiled = TrainConfig(device=device.type, compile=True)
        pipelines["project+compile"] = lambda: project_pipeline(compiled, train, args.steps, device)
    for name in seed_specs:
        pipelines[name] = lambda name=name: seed_process.measure(name)
    results: dict[str, list[float]] = {name: [] for name in pipelines}
    try:
        for round_index in range(args.rounds):
            for name, measure in pipelines.items():
                images_per_second, peak = measure()  # a seed pipeline's peak is its own process's
                results[name].append(images_per_second)
                print(f"round {round_index + 1} {name:<22} {images_per_second:8.0f} images/s  (peak {peak})",
                      flush=True)
    finally:
        seed_process.close()  # also when a pipeline failed: the child would otherwise wait forever
    # The ratio is taken against the fastest seed-style pipeline measured.
    baseline_name = max((name for name in results if name.startswith("seed-dataloader")),
                        key=lambda name: statistics.median(results[name]))
    baseline = statistics.median(results[baseline_name])
    for name, values in results.items():
        median = statistics.median(values)
        # This machine's speed wanders from minute to minute: the ratio within each round compares
        # measurements seconds apart.
        per_round = ", ".join(f"{value / base:.2f}" for value, base in zip(values, results[baseline_name]))
        print(f"{name:<22} median {median:8.0f} images/s  spread {min(values):.0f}-{max(values):.0f}  "
              f"ratio vs {baseline_name} {median / baseline:.2f}x (per round: {per_round})")


def train_full_recipes(args: argparse.Namespace, device: torch.device) -> None:
    """The 50-epoch seed recipe with each pipeline asked for, once per seed, on the --val-size split
    (the seed-style pipeline on the same images): time and test accuracy."""
    pipelines = args.full_recipe or FULL_RECIPE_PIPELINES
    runs = {}
    if "project" in pipelines:
        # Once for every run (decoded, or from the cache), and not before the rounds: their peak memory.
        splits = load_splits(DataConfig(data_dir=args.data_dir, val_size=args.val_size))
        runs["project"] = lambda seed: full_recipe(splits, TrainConfig(device=device.type, seed=seed))
        if device.type == "cuda":
            runs["project, eager steps"] = lambda seed: full_recipe(
                splits, TrainConfig(device="cuda", cuda_graphs=False, seed=seed))
    if "seed-dataloader" in pipelines:
        runs[f"seed-dataloader, {args.workers[0]} workers"] = lambda seed: in_child_process(
            seed_recipe, args.data_dir, args.val_size, device.type, args.workers[0], seed)
    for name, run in runs.items():
        accuracies, times = [], []
        for seed in args.recipe_seeds:
            seconds, accuracy, images = run(seed)
            accuracies.append(accuracy)
            times.append(seconds)
            print(f"full seed recipe, {name}, seed {seed} (50 epochs of {images} images, batch 64, validation "
                  f"every epoch): {seconds:.1f} s, test accuracy {accuracy:.4f}", flush=True)
        spread = f" ± {statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else ""
        print(f"full seed recipe, {name}: test accuracy {statistics.mean(accuracies):.4f}{spread} over seeds "
              f"{', '.join(map(str, args.recipe_seeds))}; median time {statistics.median(times):.1f} s", flush=True)


if __name__ == "__main__":
    interrupts.run_script(main)
