"""Accuracy evidence: train a recipe over several seeds and report mean ± std next to its cost.

Every seed is a full tracked `cifar-exp train` run (MLflow experiment ``--experiment``), so each
number below can be opened in the UI. Reports final validation accuracy (what recipes are chosen on)
and test accuracy (reported, never selected on), training time, parameters, MACs per image, and the
batch-1 CPU latency of the model next to the `seed` model's, measured side by side.

    python benchmarks/accuracy.py --recipe seed --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/accuracy.py --recipe pico --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/accuracy.py --recipe pico --model resnet8 --seeds 0 1 2   # a model with a recipe
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

import torch

from cifar_exp.config import DataConfig, ExperimentConfig, TrackingConfig, recipe_config
from cifar_exp.data import load_splits
from cifar_exp.experiment import train_and_track
from cifar_exp.inference import count_macs, measure_latency
from cifar_exp.models import count_parameters
from cifar_exp.train import build_classifier


def latency_ms(model: torch.nn.Module) -> float:
    """Batch-1 PyTorch fp32 p50 latency in ms on all cores."""
    return measure_latency(model.cpu().eval(), 1, repeats=3, seconds_per_repeat=1.0).p50_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="seed")
    parser.add_argument("--model", help="Override the recipe's model.")
    parser.add_argument("--epochs", type=int, help="Override the recipe's epochs.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg-dev")
    parser.add_argument("--experiment", default="accuracy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    overrides = {k: v for k, v in (("model", args.model), ("epochs", args.epochs)) if v is not None}
    base = ExperimentConfig(
        data=DataConfig(data_dir=args.data_dir),
        train=recipe_config(args.recipe, **overrides),
        tracking=TrackingConfig(experiment_name=args.experiment, register=False),
    )
    splits = load_splits(base.data)
    rows = []
    for seed in args.seeds:
        cfg = replace(base, train=replace(base.train, seed=seed),
                      tracking=replace(base.tracking, run_name=f"{args.recipe}-{base.train.model}-seed{seed}"))
        outcome = train_and_track(cfg, splits=splits, tags={"benchmark": "accuracy"})
        rows.append((seed, outcome.fit.history[-1].val_accuracy, outcome.test.accuracy, outcome.fit.train_seconds))
        print(f"seed {seed}: val {rows[-1][1]:.4f}  test {rows[-1][2]:.4f}  {rows[-1][3]:.0f} s  run {outcome.run_id}",
              flush=True)

    model = build_classifier(base.train, len(splits.classes)).eval()
    seed_model = build_classifier(recipe_config("seed"), len(splits.classes)).eval()
    # Alternate the two models so that machine noise hits both alike.
    latencies = {"model": [], "seed": []}
    for _ in range(3):
        latencies["model"].append(latency_ms(model))
        latencies["seed"].append(latency_ms(seed_model))
    model_ms, seed_ms = (statistics.median(v) for v in latencies.values())

    def mean_std(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}%"

    print(f"\nrecipe {args.recipe}, model {base.train.model}, {base.train.epochs} epochs, seeds {args.seeds}")
    print(f"validation accuracy (final epoch): {mean_std([r[1] for r in rows])}")
    print(f"test accuracy:                      {mean_std([r[2] for r in rows])}")
    print(f"training time per run:              {statistics.mean(r[3] for r in rows):.0f} s")
    print(f"parameters:                         {count_parameters(model):,}")
    print(f"MACs per image:                     {count_macs(model) / 1e6:.2f} M")
    print(f"batch-1 CPU latency (PyTorch fp32): {model_ms:.3f} ms  (seed model: {seed_ms:.3f} ms, "
          f"ratio {model_ms / seed_ms:.2f}x)")


if __name__ == "__main__":
    main()
