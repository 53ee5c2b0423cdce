"""The compute floor of inference on this CPU: how fast could a model run if only its MACs cost time?

Measures the multiply-accumulate rate a large matrix product sustains (fp32 SGEMM and int8 GEMM,
each at a few sizes and thread counts), divides each model's MACs per image by it, and, given
``benchmark.json`` files written by ``cifar-exp benchmark``, prints how far each backend's measured
batch-1 p50 and batch-256 throughput are from that floor, side by side in one run.

    .venv/bin/python benchmarks/inference_floor.py [benchmark.json ...] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from cifar_exp import interrupts
from cifar_exp.config import TrainConfig
from cifar_exp.inference import available_cores, count_macs, cpu_name, measure_matmul_rate
from cifar_exp.models import model_names
from cifar_exp.train import build_shipped_classifier

SIZES = (1024, 2048, 4096)
# The targets: (faster backend, baseline, batch size, the largest ratio allowed).
TARGETS = (
    ("onnxruntime-fp32", "pytorch-fp32", 1, 1 / 5),
    ("onnxruntime-int8", "onnxruntime-fp32", 1, 0.7),
    ("onnxruntime-int8", "onnxruntime-fp32", 256, 0.7),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="*", type=Path, help="benchmark.json files to compare with the floor")
    parser.add_argument("--threads", type=int, default=available_cores(), help="threads (default: all cores)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per matrix product")
    args = parser.parse_args()
    if args.threads < 1 or not args.seconds > 0:
        parser.error(f"--threads must be >= 1 and --seconds > 0, got {args.threads} and {args.seconds}")
    try:
        reports = {path: read_report(path) for path in args.reports}
    except ValueError as error:
        parser.error(str(error))

    print(f"{cpu_name()}, {available_cores()} cores available")
    thread_counts = sorted({1, args.threads, *(report["machine"]["threads"] for report in reports.values())})
    rates: dict[tuple[str, int], float] = {}  # (precision, threads) -> best sustained MAC/s
    for precision in ("fp32", "int8"):
        for threads in thread_counts:
            for size in SIZES:
                rate = measure_matmul_rate(precision, threads=threads, size=size, seconds=args.seconds)
                if rate is None:
                    continue
                print(f"{precision} {size}x{size} matmul, {threads} thread(s): {rate / 1e9:7.1f} G MAC/s")
                rates[precision, threads] = max(rates.get((precision, threads), 0.0), rate)
    print(f"\nfloor = MACs per image / best sustained rate at {args.threads} thread(s)")
    for name in model_names():
        macs = count_macs(build_shipped_classifier(TrainConfig(model=name), 10))
        floors = ", ".join(f"{p} {macs / r * 1e6:6.1f} µs" for (p, t), r in rates.items() if t == args.threads)
        print(f"  {name:<10} {macs / 1e6:6.2f} M MACs/image: {floors}")

    for path, report in reports.items():
        macs = report["model"]["macs_per_image"]
        print(f"\n{path} ({report['model']['name']}, {report['machine']['threads']} threads)")
        threads = report["machine"]["threads"]  # each report against the floor at its own thread count
        for backend in report["backends"]:
            precision = "int8" if backend["precision"] == "int8" and ("int8", threads) in rates else "fp32"
            rate = rates[precision, threads]
            floor_ms = macs / rate * 1e3
            line = f"  {backend['name']:<18}"
            if "1" in backend["latency"]:
                p50 = backend["latency"]["1"]["p50_ms"]
                line += f" batch 1: p50 {p50 * 1e3:8.1f} µs = {p50 / floor_ms:5.1f}x the {precision} floor"
            if "256" in backend["latency"]:
                achieved = backend["latency"]["256"]["images_per_second"] * macs
                line += f"; batch 256: {achieved / 1e9:6.1f} G MAC/s = {achieved / rate:6.1%} of the {precision} peak"
            print(line)
        _print_targets(report)


def read_report(path: Path) -> dict:
    """The ``benchmark.json`` at ``path``; ValueError, in one line, for a file that is not one."""
    try:
        report = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:  # not JSON
        raise ValueError(f"{path} is not a benchmark.json of `cifar-exp benchmark`: {error}") from None
    try:
        for keys in (("machine", "threads"), ("model", "macs_per_image"), ("model", "name"), ("backends",)):
            functools.reduce(lambda part, key: part[key], keys, report)
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a benchmark.json of `cifar-exp benchmark`: no {'.'.join(keys)}") from None
    return report


def _print_targets(report: dict) -> None:
    """Each target's p50 ratio, and the ratio within each repeat (both timed seconds apart)."""
    backends = {backend["name"]: backend["latency"] for backend in report["backends"]}
    for fast, base, batch_size, limit in TARGETS:
        if fast not in backends or base not in backends or str(batch_size) not in backends[fast]:
            continue
        fast_stats, base_stats = backends[fast][str(batch_size)], backends[base][str(batch_size)]
        paired = [f / b for f, b in zip(fast_stats["repeat_p50_ms"], base_stats["repeat_p50_ms"])]
        ratio = fast_stats["p50_ms"] / base_stats["p50_ms"]
        print(f"  target {fast} / {base} at batch {batch_size} <= {limit:.2f}: p50 ratio {ratio:.3f} "
              f"({'met' if ratio <= limit else 'NOT met'}); per repeat "
              + ", ".join(f"{r:.3f}" for r in paired))


if __name__ == "__main__":
    interrupts.run_script(main)
