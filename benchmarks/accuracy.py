"""Accuracy evidence: train a recipe over several seeds and report mean ± std next to its cost.

Every seed is a full tracked `cifar-exp train` run (MLflow experiment ``--experiment``), so each
number below can be opened in the UI. Reports final validation accuracy (what recipes are chosen on)
and test accuracy (reported, never selected on), training time, parameters, MACs per image, and the
batch-1 CPU latency of the model next to the `seed` model's, measured side by side.

    python benchmarks/accuracy.py --recipe seed --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/accuracy.py --recipe pico --seeds 0 1 2 --data-dir ../shared/data/cifar10-jpeg-dev
    python benchmarks/accuracy.py --recipe pico --model resnet8 --seeds 0 1 2   # a model with a recipe
    python benchmarks/accuracy.py --recipe pico --latency-only   # just the latency comparison, no training
    python benchmarks/accuracy.py --recipe pico --set cutout=8 --set widths=24,56,80   # recipe variants
    python benchmarks/accuracy.py --recipe pico --untracked --skip-latency   # e.g. on a GPU box without MLflow
    python benchmarks/accuracy.py --recipe pico --teacher-set model=pico-res --teacher-set widths=64,256,256
    python benchmarks/accuracy.py --recipe pico --teacher-set model=pico-res --teacher-set widths=64,256,256 \
        --teacher-dir models --untracked   # distil from the teachers an earlier --save-dir models kept
    python benchmarks/accuracy.py --recipe pico --val-size 500 --model pico-sep --set distill_mirror=true \
        --teacher-set model=pico-res --teacher-set label_smoothing=0 --teacher-set lr=0.2 \
        --teacher-set widths=48,112,160 --teacher-ensemble   # issue 6's best: each student learns from 3 teachers

With ``--teacher-set``, each seed first trains a teacher (the recipe with those overrides, the same
seed), reports it, and then distils the seed's model from it (``--teacher``): tracked, the student
loads the teacher's logged model as `cifar-exp train --teacher runs:/ID/model` would. With
``--teacher-ensemble`` every seed's teacher is trained first, and each student learns from all of
them (their logits averaged, as ``--teacher URI,URI,...``). With ``--teacher-dir`` the teachers are
not trained but loaded from the files an earlier run's ``--save-dir`` wrote (e.g. teachers trained
on a GPU, students distilled on a CPU).

Run the latency comparison on a quiet machine: it alternates the two models, but other jobs on the
same cores still distort both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pickle
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from cifar_exp import interrupts
from cifar_exp.cli import CHATTY_LOGGERS
from cifar_exp.config import DataConfig, ExperimentConfig, TrackingConfig, TrainConfig, recipe_config
from cifar_exp.data import ImageSet, Splits, load_splits
from cifar_exp.errors import CifarExpError, ConfigError, ExportError
from cifar_exp.inference import check_writable_folder, count_macs, measure_latency
from cifar_exp.models import NUM_CLASSES, Ensemble, count_parameters
from cifar_exp.train import (
    EvalResult,
    build_classifier,
    build_network,
    build_shipped_classifier,
    evaluate,
    fit,
    parameter_counts,
    served_validation_accuracy,
)


LATENCY_BACKENDS = ("pytorch-fp32", "onnxruntime-fp32")
LATENCY_ROUNDS = 5


def compare_latency(model: torch.nn.Module, seed_model: torch.nn.Module) -> None:
    """Batch-1 p50 latency (all cores) of ``model`` and the seed model, alternating them so that
    machine noise hits both alike: the median over rounds, the range of the rounds, and the ratio as
    the median of each round's ratio (a VM whose speed shifts between rounds moves both of a round)."""
    for backend in LATENCY_BACKENDS:
        latencies = {"model": [], "seed": []}
        for _ in range(LATENCY_ROUNDS):
            for name, network in (("model", model), ("seed", seed_model)):
                latencies[name].append(measure_latency(network, 1, repeats=3, seconds_per_repeat=1.0,
                                                       backend=backend).p50_ms)
        model_ms, seed_ms = (statistics.median(v) for v in latencies.values())
        ratios = [m / s for m, s in zip(latencies["model"], latencies["seed"], strict=True)]
        print(f"batch-1 CPU latency ({backend}): {model_ms:.3f} ms ({min(latencies['model']):.3f}-"
              f"{max(latencies['model']):.3f}); seed model {seed_ms:.3f} ms ({min(latencies['seed']):.3f}-"
              f"{max(latencies['seed']):.3f}); ratio {statistics.median(ratios):.2f}x (rounds "
              f"{min(ratios):.2f}-{max(ratios):.2f}x)")


def parameters(cfg: TrainConfig, num_classes: int) -> str:
    """The shipped model's parameter count, and the training form's where that has more."""
    shipped, trained = parameter_counts(cfg, num_classes)
    return f"{shipped:,}" + (f" ({trained:,} while training)" if trained != shipped else "")


def parse_override(text: str, flag: str = "--set") -> tuple[str, object]:
    """``"cutout=8"`` -> ("cutout", 8), converted as `cifar-exp train`'s option for that setting would."""
    import click

    from cifar_exp.cli import train

    name, separator, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if name not in {f.name for f in dataclasses.fields(TrainConfig)} or not separator:
        raise ConfigError(f"{flag} needs FIELD=VALUE with a train setting as FIELD, got {text!r}")
    if name in ("recipe", "seed"):
        raise ConfigError(f"{flag} {name}: use --{name}{'s' if name == 'seed' else ''} instead")
    option = next(param for param in train.params if param.name == name)
    try:
        return name, option.type_cast_value(click.Context(train), value)
    except click.BadParameter as error:
        raise ConfigError(f"{flag} {name}: {error.format_message()}") from None


@dataclasses.dataclass(frozen=True)
class Outcome:
    val_accuracy: float  # final epoch (with the recipe's TTA)
    served_val_accuracy: float  # the shipped model's, fp32, one pass: what a choice between variants compares
    test_accuracy: float
    one_pass_accuracy: float | None  # the test accuracy without TTA, where the recipe has TTA
    seconds: float
    run: str  # the MLflow run id, or "untracked"
    model: torch.nn.Module
    teacher_uri: str  # what a student's TrainConfig.teacher names to learn from this model


def untracked_uri(name: str | Path) -> str:
    """What an untracked student's ``TrainConfig.teacher`` names its in-memory teacher by: a label, with
    commas escaped, since a list of teachers is comma-separated (a --teacher-dir may hold one)."""
    return "untracked:" + str(name).replace("%", "%25").replace(",", "%2C")


def evaluate_as_tracked(model: torch.nn.Module, images: ImageSet, cfg: TrainConfig) -> EvalResult:
    """``images`` evaluated as a tracked run evaluates its test split: fp32, with the recipe's TTA."""
    return evaluate(model, images, batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last, tta=cfg.tta)


def train_untracked(cfg: ExperimentConfig, splits: Splits, teacher: torch.nn.Module | None = None) -> Outcome:
    """``fit`` and the test evaluation of ``train_and_track`` without MLflow, for machines that train
    but do not track."""
    result = fit(cfg.train, splits, teacher=teacher)
    test = evaluate_as_tracked(result.model, splits.test, cfg.train)
    return Outcome(result.history[-1].val_accuracy, served_validation_accuracy(result, splits.val, cfg.train),
                   test.accuracy, test.one_pass_accuracy, result.train_seconds, "untracked", result.model,
                   teacher_uri=untracked_uri(cfg.tracking.run_name))


def train_tracked(cfg: ExperimentConfig, splits: Splits) -> Outcome:
    """A tracked `cifar-exp train` run; a teacher is loaded from the run ``cfg.train.teacher`` names,
    as `cifar-exp train --teacher` loads it."""
    from cifar_exp.experiment import train_and_track  # MLflow only where runs are tracked

    outcome = train_and_track(cfg, splits=splits, tags={"benchmark": "accuracy"})
    return Outcome(outcome.fit.history[-1].val_accuracy, outcome.served_val_accuracy, outcome.test.accuracy,
                   outcome.test.one_pass_accuracy, outcome.fit.train_seconds, outcome.run_id, outcome.fit.model,
                   teacher_uri=f"runs:/{outcome.run_id}/model")


def seed_run_name(recipe: str, model: str, seed: int, *, teacher: bool = False) -> str:
    """The run (and --save-dir file) name of one seed's student, or of its teacher."""
    return f"{recipe}-{model}-seed{seed}" + ("-teacher" if teacher else "")


def saved_model_path(folder: str, run_name: str) -> Path:
    """Where --save-dir keeps (and --teacher-dir finds) the weights of run ``run_name``."""
    return Path(folder).expanduser() / f"{run_name}.pt"


def load_saved_teacher(cfg: ExperimentConfig, splits: Splits, path: Path) -> Outcome:
    """The teacher an earlier run saved at ``path`` (``--save-dir``, shipped form), evaluated as a
    trained teacher is."""
    model = build_shipped_classifier(cfg.train, len(splits.classes))
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError:  # (torch's message suggests weights_only=False: not for a file of unknown origin)
        reason = "not a state_dict that --save-dir wrote"
    except (OSError, RuntimeError) as error:
        # A shape mismatch lists every tensor, one per line: the first says enough.
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        reason = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    else:
        reason = None
    if reason:
        raise ConfigError(f"--teacher-dir: cannot load {path} as a {cfg.train.model} of these --teacher-set "
                          f"settings: {reason}")
    val, test = (evaluate_as_tracked(model, images, cfg.train) for images in (splits.val, splits.test))
    return Outcome(val.accuracy, val.served_accuracy, test.accuracy, test.one_pass_accuracy, 0.0, f"loaded from {path}",
                   model, teacher_uri=untracked_uri(path))


def save(model: torch.nn.Module, folder: str | None, name: str) -> None:
    if folder:
        try:
            path = saved_model_path(folder, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            # CPU tensors: weights trained on a GPU then load on machines without one (no map_location needed)
            torch.save({key: value.cpu() for key, value in model.state_dict().items()}, path)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            raise ExportError(f"cannot save {name}.pt in {folder}: {error}") from None


def ensemble_of(teachers: list[Outcome], splits: Splits, cfg: TrainConfig) -> Outcome:
    """One teacher of several, their logits averaged as `cifar-exp train --teacher URI,URI,...` averages
    them, evaluated as one trained teacher is."""
    model = Ensemble([t.model for t in teachers])
    val, test = (evaluate_as_tracked(model, images, cfg) for images in (splits.val, splits.test))
    return Outcome(val.accuracy, val.served_accuracy, test.accuracy, test.one_pass_accuracy,
                   sum(t.seconds for t in teachers), "ensemble of " + ", ".join(t.run for t in teachers), model,
                   teacher_uri=",".join(t.teacher_uri for t in teachers))


def tta_label(train: TrainConfig) -> str:
    return " (mirror TTA: two passes per image)" if train.tta else ""


def describe(outcome: Outcome) -> str:
    return (f"val {outcome.val_accuracy:.4f} (served {outcome.served_val_accuracy:.4f})  test {outcome.test_accuracy:.4f}"
            + (f" (one pass {outcome.one_pass_accuracy:.4f})" if outcome.one_pass_accuracy is not None else "")
            + f"  {outcome.seconds:.0f} s  run {outcome.run}")


def train_seeds(args: argparse.Namespace, base: ExperimentConfig, teacher_base: TrainConfig | None,
                splits: Splits) -> tuple[list[Outcome], list[Outcome], Outcome | None]:
    """Train each of ``args.seeds`` (first its own teacher, with ``teacher_base``); returns the
    students' and the teachers' outcomes, and with ``--teacher-ensemble`` the teachers' ensemble."""
    def train(cfg: ExperimentConfig, teacher: Outcome | None = None) -> Outcome:
        # Untracked, the teacher is handed over in memory; tracked, the run loads it through its URI.
        if args.untracked:
            return train_untracked(cfg, splits, teacher.model if teacher else None)
        return train_tracked(cfg, splits)

    def named(seed: int, *, teacher: bool = False) -> ExperimentConfig:
        run_name = seed_run_name(args.recipe, base.train.model, seed, teacher=teacher)
        train_cfg = replace(teacher_base if teacher else base.train, seed=seed)
        return replace(base, train=train_cfg, tracking=replace(base.tracking, run_name=run_name))

    def train_teacher(seed: int) -> Outcome:
        cfg = named(seed, teacher=True)
        if args.teacher_dir:
            teacher = load_saved_teacher(cfg, splits, saved_model_path(args.teacher_dir, cfg.tracking.run_name))
        else:
            teacher = train(cfg)
        print(f"seed {seed} teacher: {describe(teacher)}", flush=True)  # before a save that may fail
        if not args.teacher_dir:  # a loaded teacher is on disk already
            save(teacher.model, args.save_dir, cfg.tracking.run_name)
        return teacher

    teachers: list[Outcome] = []
    ensemble = None
    if teacher_base is not None and args.teacher_ensemble:  # every teacher before the first student
        teachers = [train_teacher(seed) for seed in args.seeds]
        ensemble = ensemble_of(teachers, splits, teacher_base) if len(teachers) > 1 else teachers[0]
        print(f"teacher ensemble: {describe(ensemble)}", flush=True)
    rows: list[Outcome] = []
    for seed in args.seeds:
        cfg = named(seed)
        if teacher_base is None:
            teacher = None
        elif ensemble is not None:
            teacher = ensemble
        else:
            teacher = train_teacher(seed)
            teachers.append(teacher)
        if teacher is not None:
            cfg = replace(cfg, train=replace(cfg.train, teacher=teacher.teacher_uri))
        rows.append(train(cfg, teacher))
        print(f"seed {seed}: {describe(rows[-1])}", flush=True)
        save(rows[-1].model, args.save_dir, cfg.tracking.run_name)

    return rows, teachers, ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="seed")
    parser.add_argument("--model", help="Override the recipe's model.")
    parser.add_argument("--epochs", type=int, help="Override the recipe's epochs.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="Override any train setting of the recipe, e.g. --set cutout=8 (repeatable).")
    parser.add_argument("--teacher-set", dest="teacher_overrides", action="append", default=[],
                        metavar="FIELD=VALUE",
                        help="Distil each seed's model from a teacher trained first with the same seed: the recipe "
                        "with these overrides (repeatable; --model and --set do not apply to it, --epochs does "
                        "unless one sets epochs here).")
    parser.add_argument("--teacher-ensemble", action="store_true",
                        help="With --teacher-set: train every seed's teacher first, then distil each seed's model "
                        "from all of them (their logits averaged) instead of from its own.")
    parser.add_argument("--teacher-dir", help="With --teacher-set and --untracked: load each seed's teacher from "
                        "the RUN_NAME-teacher.pt an earlier run's --save-dir wrote here instead of training it "
                        "(--teacher-set gives its architecture).")
    parser.add_argument("--save-dir", help="Also save each trained model's state_dict here as RUN_NAME.pt, in "
                        "its shipped form (load it into cifar_exp.train.build_shipped_classifier), e.g. to check "
                        "untracked models elsewhere.")
    parser.add_argument("--untracked", action="store_true",
                        help="Train and test without MLflow (no runs logged), e.g. where MLflow is not installed.")
    parser.add_argument("--skip-latency", action="store_true",
                        help="Skip the batch-1 CPU latency comparison (meaningless on a busy machine).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Seeds to train (at least 3 give a spread; fewer are reported without one).")
    parser.add_argument("--data-dir", default="../shared/data/cifar10-jpeg-dev")
    parser.add_argument("--val-size", type=int, default=DataConfig().val_size,
                        help="Training images carved off for validation.")
    parser.add_argument("--experiment", default="accuracy")
    parser.add_argument("--latency-only", action="store_true",
                        help="Skip training: compare the batch-1 latency of the architecture with the seed model's.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", *CHATTY_LOGGERS):  # the CLI's, and MLflow's run links
        logging.getLogger(noisy).setLevel(logging.WARNING)

    try:
        if len(set(args.seeds)) != len(args.seeds):
            raise ConfigError(f"--seeds must differ, got {' '.join(map(str, args.seeds))}")
        overrides = dict(parse_override(text) for text in args.overrides)
        overrides.update({k: v for k, v in (("model", args.model), ("epochs", args.epochs)) if v is not None})
        teacher_base = None
        if args.teacher_overrides:
            if "teacher" in overrides:
                raise ConfigError("--teacher-set trains the teacher: drop --set teacher")
            teacher_overrides = {"epochs": args.epochs} if args.epochs is not None else {}
            teacher_overrides.update(parse_override(t, "--teacher-set") for t in args.teacher_overrides)
            try:
                teacher_base = recipe_config(args.recipe, **teacher_overrides)
                build_network(teacher_base)
            except ConfigError as error:
                raise ConfigError(f"--teacher-set: {error}") from None
            overrides["teacher"] = "untracked:teacher"  # stands in for each seed's teacher, named per seed
        elif args.teacher_ensemble:
            raise ConfigError("--teacher-ensemble needs --teacher-set (the teachers to train)")
        base = ExperimentConfig(
            data=DataConfig(data_dir=args.data_dir, val_size=args.val_size),
            train=recipe_config(args.recipe, **overrides),
            tracking=TrackingConfig(experiment_name=args.experiment, register=False),
        )
        build_network(base.train)  # an unknown model or knob fails here, before the data loads
        if args.untracked and base.train.teacher_uris() and teacher_base is None:
            raise ConfigError("--set teacher needs MLflow to load the teacher's models: drop --untracked")
        if args.untracked and teacher_base is not None and teacher_base.teacher_uris():
            raise ConfigError("--teacher-set teacher needs MLflow to load the teacher's own teachers: drop --untracked")
        if args.teacher_dir:
            if teacher_base is None or not args.untracked:
                raise ConfigError("--teacher-dir needs --teacher-set (the teachers' architecture) and --untracked "
                                  "(a tracked student loads its teacher from a logged run)")
            for seed in args.seeds:  # every file before the data loads and the first student trains
                path = saved_model_path(args.teacher_dir, seed_run_name(args.recipe, base.train.model, seed,
                                                                         teacher=True))
                if not path.is_file():
                    raise ConfigError(f"--teacher-dir: no teacher for seed {seed}: {path} is not a file")
        if args.save_dir and not args.latency_only:
            check_writable_folder(Path(args.save_dir))  # before hours of training, not after the first run
    except (ConfigError, ExportError) as error:
        parser.error(str(error))
    seed_model = build_classifier(recipe_config("seed"), NUM_CLASSES).eval()
    if args.latency_only:
        model = build_shipped_classifier(base.train, NUM_CLASSES)
        print(f"recipe {args.recipe}, model {base.train.model}: {parameters(base.train, NUM_CLASSES)} parameters, "
              f"{count_macs(model) / 1e6:.2f} M MACs per image")
        compare_latency(model, seed_model)
        return
    try:
        if not args.untracked:
            from cifar_exp.tracking import check_tracking_store  # MLflow only where runs are tracked

            check_tracking_store()  # an unreachable store fails here, before the data loads
        splits = load_splits(base.data)
    except CifarExpError as error:
        parser.error(str(error))
    try:
        rows, teachers, ensemble = train_seeds(args, base, teacher_base, splits)
    except CifarExpError as error:  # e.g. a diverged run, or the tracking store gone: one line, exit 1
        sys.exit(f"{parser.prog}: error: {error}")
    model = build_shipped_classifier(base.train, len(splits.classes))

    def mean_std(values: list[float]) -> str:
        if len(values) == 1:
            return f"{100 * values[0]:.2f}% (one seed: no spread)"
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}% (sample std)"

    tta = tta_label(base.train)
    print(f"\nrecipe {args.recipe}, model {base.train.model}, {base.train.epochs} epochs, seeds {args.seeds}"
          + (f", overrides {' '.join(args.overrides)}" if args.overrides else ""))
    if teachers:
        print(f"teachers ({' '.join(args.teacher_overrides)}, {count_parameters(teachers[0].model):,} parameters), "
              f"test accuracy{tta_label(teacher_base)}: {mean_std([t.test_accuracy for t in teachers])}; "
              + (f"each student learned from all {len(teachers)} (logits averaged: test accuracy "
                 f"{100 * ensemble.test_accuracy:.2f}%); " if ensemble is not None else "")
              + (f"loaded from {args.teacher_dir}" if args.teacher_dir else
                 f"training time per teacher: {statistics.mean(t.seconds for t in teachers):.0f} s"))
    print(f"validation accuracy (final epoch){tta}: {mean_std([r.val_accuracy for r in rows])}")
    print("validation accuracy as served (fp32, one pass; choose variants on this): "
          f"{mean_std([r.served_val_accuracy for r in rows])}")
    print(f"test accuracy{tta}: {mean_std([r.test_accuracy for r in rows])}")
    if base.train.tta:
        print(f"test accuracy in one pass (as exported): {mean_std([r.one_pass_accuracy for r in rows])}")
    print(f"training time per run:              {statistics.mean(r.seconds for r in rows):.0f} s")
    print(f"parameters:                         {parameters(base.train, len(splits.classes))}")
    print(f"MACs per image:                     {count_macs(model) / 1e6:.2f} M")
    if not args.skip_latency:
        compare_latency(model, seed_model)
        if base.train.tta:
            print("(latency of one pass: mirror TTA's accuracy costs two per image)")


if __name__ == "__main__":
    interrupts.run_script(main)
