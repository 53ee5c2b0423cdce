"""Models, optimizer, schedules and recipes beyond the seed's."""

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cifar_exp.cli import build_config, main
from cifar_exp.config import RECIPES, TrainConfig, recipe_config
from cifar_exp.data import DeviceBatches, ImageSet, cutout
from cifar_exp.errors import ConfigError
from cifar_exp.models import Ensemble, Shortcut, build_model, count_parameters
from cifar_exp.train import (
    Distillation,
    build_classifier,
    build_optimizer,
    build_scheduler,
    build_train_step,
    distillation_loss,
    lr_factor,
)


@pytest.mark.parametrize(("name", "parameters"), [
    ("seed-bn", 152_458 + 3 * 2 * 64),  # the seed plus a BatchNorm scale and shift per conv channel
    # MLPerf Tiny ResNet-8: 77,706 conv/dense weights and biases + 480 BN scales/shifts (Keras also
    # counts the 480 running statistics: 78,666).
    ("resnet8", 78_186),
    ("pico", 130_514),
    ("pico-res", 130_514),  # pico's layers; the identity shortcuts have no weights
])
def test_model_sizes_and_outputs(name, parameters):
    model = build_model(name)
    assert count_parameters(model) == parameters
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_resnet8_counts_like_the_mlperf_reference():
    model = build_model("resnet8")
    running_stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert count_parameters(model) + running_stats == 78_666


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adamw"])
def test_weight_decay_skips_biases_and_batchnorm(optimizer):
    model = build_classifier(TrainConfig(model="seed-bn"), 10)
    built = build_optimizer(TrainConfig(model="seed-bn", weight_decay=5e-4, momentum=0.9, optimizer=optimizer),
                            model)
    decayed = {id(p) for g in built.param_groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    undecayed = {id(p) for g in built.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, parameter in model.named_parameters():
        expected = name.endswith("weight") and parameter.ndim > 1  # conv and linear weights only
        assert (id(parameter) in decayed) == expected and (id(parameter) in undecayed) != expected, name
    assert isinstance(built, torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)
    if optimizer != "adamw":
        assert built.param_groups[0]["nesterov"] == (optimizer == "nesterov")


def test_training_step_uses_label_smoothing_as_defined():
    images, labels, eps = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)), 0.1
    cfg = TrainConfig(label_smoothing=eps, amp=False, channels_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].weight.mul_(20)  # confident logits, where smoothing changes the loss a lot
    log_probs = model(images).log_softmax(1)  # the step measures its loss before it updates the weights
    expected = ((1 - eps) * -log_probs.gather(1, labels[:, None]).squeeze(1) - eps * log_probs.mean(1)).mean()
    optimizer = build_optimizer(cfg, model)
    step = build_train_step(cfg, model, optimizer, build_scheduler(cfg, optimizer, 1), None)
    step(images, labels)
    loss, _ = step.read(len(labels))
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss - F.cross_entropy(log_probs, labels).item()) > 1e-3  # smoothing changed it


def test_distillation_loss_is_t_squared_kl_and_pulls_toward_the_teacher():
    logits = torch.randn(6, 10, requires_grad=True)
    teacher_logits, temperature = 3 * torch.randn(6, 10), 4.0
    p_model = (logits / temperature).softmax(1)
    p_teacher = (teacher_logits / temperature).softmax(1)
    kl = (p_teacher * (p_teacher.log() - p_model.log())).sum(1).mean()  # KL(teacher || model), per image
    loss = distillation_loss(logits, teacher_logits, temperature)
    assert loss.item() == pytest.approx(temperature**2 * kl.item(), rel=1e-5)
    loss.backward()
    # d/dz of T^2 KL at temperature T is T (p_model - p_teacher) per image: the T^2 keeps it O(1).
    torch.testing.assert_close(logits.grad, temperature * (p_model - p_teacher).detach() / 6)
    assert distillation_loss(teacher_logits, teacher_logits, temperature).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize(("weight", "mirror"), [(0.5, False), (1.0, False), (0.9, True)])
def test_training_step_mixes_label_and_distillation_losses(weight, mirror):
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cfg = TrainConfig(amp=False, channels_last=False)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():  # the step measures its loss before it updates the weights
        logits, teacher_logits = student(images), teacher(images)
        if mirror:  # the teacher's logits averaged over each image and its left-right mirror image
            teacher_logits = (teacher_logits + teacher(images.flip(3))) / 2
    expected = ((1 - weight) * F.cross_entropy(logits, labels)
                + weight * distillation_loss(logits, teacher_logits, 2.0))
    optimizer = build_optimizer(cfg, student)
    step = build_train_step(cfg, student, optimizer, build_scheduler(cfg, optimizer, 1), None,
                            Distillation(teacher, weight, 2.0, mirror))
    step(images, labels)
    loss, _ = step.read(len(labels))
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher only predicts


def test_ensemble_averages_its_members_logits():
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)) for _ in range(3)]
    images = torch.rand(4, 3, 32, 32)
    expected = sum(member(images) for member in members) / 3
    ensemble = Ensemble(members)
    torch.testing.assert_close(ensemble(images), expected)
    assert not any(module.training for module in ensemble.eval().modules())
    assert all(module.training for module in ensemble.train().modules())
    assert not any(module.training for module in ensemble.train(False).modules())


def test_distillation_settings_are_checked():
    assert TrainConfig().teacher_uris() == ()
    assert TrainConfig(teacher=" runs:/a/model, models:/b@champion").teacher_uris() == (
        "runs:/a/model", "models:/b@champion")
    with pytest.raises(ConfigError, match="teacher must be comma-separated model URIs, got 'runs:/a/model,'"):
        TrainConfig(teacher="runs:/a/model,")
    with pytest.raises(ConfigError, match=r"distill-weight must be in \(0, 1\], got 0.0"):
        TrainConfig(teacher="runs:/a/model", distill_weight=0.0)
    with pytest.raises(ConfigError, match="distill-temperature must be > 0, got -1.0"):
        TrainConfig(teacher="runs:/a/model", distill_temperature=-1.0)
    with pytest.raises(ConfigError, match="distill-temperature 2.0 needs --teacher"):
        TrainConfig(distill_temperature=2.0)
    with pytest.raises(ConfigError, match="distill-mirror True needs --teacher"):
        TrainConfig(distill_mirror=True)
    with pytest.raises(ConfigError, match="teacher names a model twice"):
        TrainConfig(teacher="runs:/a/model,runs:/a/model")


def _lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_exp_schedule_is_the_seeds_per_epoch_decay():
    lrs = _lrs(TrainConfig(epochs=3, lr=0.1, lr_decay=0.5), steps_per_epoch=4)
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4)


def test_exp_schedule_with_warmup_ramps_to_lr_then_decays_per_epoch():
    lrs = _lrs(TrainConfig(epochs=3, lr=0.1, lr_decay=0.5, warmup_epochs=1), steps_per_epoch=4)
    # linear warm-up over the first epoch's 4 steps, then the seed's schedule: lr, then x0.5 per epoch
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 4 + [0.05] * 4)
    # A warm-up of several epochs reaches lr too: the decay waits for it.
    lrs = _lrs(TrainConfig(epochs=4, lr=0.1, lr_decay=0.5, warmup_epochs=2), steps_per_epoch=2)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 2 + [0.05] * 2)
    # A fractional warm-up ends mid-epoch: that epoch finishes at lr, and the decay still steps at
    # epoch starts (the logged per-epoch lr is the epoch's only rate).
    lrs = _lrs(TrainConfig(epochs=4, lr=0.1, lr_decay=0.5, warmup_epochs=0.5), steps_per_epoch=4)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1] + [0.1] * 4 + [0.05] * 4 + [0.025] * 4)


def test_cosine_schedule_with_warmup():
    cfg = TrainConfig(epochs=10, lr=0.2, schedule="cosine", warmup_epochs=2)
    lrs = _lrs(cfg, steps_per_epoch=5)  # 50 steps, 10 of warm-up
    assert lrs[0] == pytest.approx(0.2 / 10) and lrs[4] == pytest.approx(0.2 * 5 / 10)
    assert lrs[9] == pytest.approx(0.2)  # warm-up done: peak
    assert lrs[30] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))  # half-way: 0.1
    assert lrs[-1] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert lr_factor(cfg, 50, 5) == pytest.approx(0.0)


def test_onecycle_schedule_peaks_after_warmup():
    lrs = _lrs(TrainConfig(epochs=10, lr=0.4, schedule="onecycle", warmup_epochs=2, momentum=0.9,
                           optimizer="nesterov"), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.4 / 25)  # OneCycleLR starts at max_lr / div_factor
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 19  # peak after 2 of 10 epochs
    assert lrs[-1] < 1e-4


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "warmup_epochs"), [(10, 7, 2.0), (5, 9, 0.0), (50, 3, 10.0)])
def test_onecycle_schedule_is_pytorchs(epochs, steps_per_epoch, warmup_epochs):
    cfg = TrainConfig(epochs=epochs, lr=0.4, schedule="onecycle", warmup_epochs=warmup_epochs)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch,
        pct_start=warmup_epochs / epochs if warmup_epochs else 0.3, cycle_momentum=False)
    expected = []
    for _ in range(epochs * steps_per_epoch):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert _lrs(cfg, steps_per_epoch) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("warmup_epochs", "steps_per_epoch"), [(2.0, 4), (0.25, 4)])  # all steps; one step
def test_onecycle_schedule_takes_every_warmup_the_config_allows(warmup_epochs, steps_per_epoch):
    # PyTorch's OneCycleLR divides by zero on these (an empty falling or rising phase).
    cfg = TrainConfig(epochs=2, lr=0.4, schedule="onecycle", warmup_epochs=warmup_epochs)
    lrs = _lrs(cfg, steps_per_epoch)
    assert max(lrs) == pytest.approx(0.4) and all(0 < lr <= 0.4 for lr in lrs)
    assert lr_factor(cfg, 2 * steps_per_epoch, steps_per_epoch) > 0  # the step after the last one


def test_recipe_seed_is_exactly_the_default():
    # What `cifar-exp train --recipe seed` and a bare `cifar-exp train` build, through click.
    from cifar_exp.cli import train

    def built(args):
        with train.make_context("train", args) as context:
            return build_config(context.params)

    assert built(["--recipe", "seed"]) == built([])
    assert built(["--recipe", "seed"]).train == recipe_config("seed") == TrainConfig()
    assert built(["--recipe", "pico"]).train != TrainConfig()  # a recipe does change the config


def test_best_recipe_options_are_overridable_on_the_command_line(monkeypatch):
    best = next(name for name in RECIPES if name != "seed")
    seen = {}

    def record(cfg, **kwargs):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("cifar_exp.experiment.train_and_track", record)
    result = CliRunner().invoke(main, ["train", "--recipe", best, "--epochs", "20"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"].train
    assert cfg.recipe == best and cfg.epochs == 20
    for key, value in RECIPES[best].items():
        if key != "epochs":
            assert getattr(cfg, key) == value, key


def test_unknown_recipe_and_bad_recipe_values():
    with pytest.raises(ConfigError, match="unknown recipe 'fastest'"):
        recipe_config("fastest")
    with pytest.raises(ConfigError, match="optimizer nesterov needs --momentum > 0"):
        TrainConfig(optimizer="nesterov")
    with pytest.raises(ConfigError, match="label-smoothing must be in"):
        TrainConfig(label_smoothing=1.0)


def test_cutout_blanks_one_square_per_image():
    images = torch.zeros(64, 3, 32, 32)
    out = cutout(images, 8, torch.Generator().manual_seed(0), fill=0.5)
    blanked = (out[:, 0] == 0.5).sum(dim=(1, 2))  # pixels per image
    assert bool((blanked <= 64).all()) and bool((blanked > 0).all())
    assert int((blanked == 64).sum()) > 20  # most squares lie fully inside the image
    assert torch.equal(out[:, 0], out[:, 2])  # the same square on every channel
    for mask in out[:, 0] == 0.5:  # (32, 32): one axis-aligned block, at most 8 by 8
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        assert len(rows) <= 8 and len(cols) <= 8
        assert int(mask.sum()) == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_cutout_squares_are_the_normalisation_mean():
    # Filled with --norm-mean, a cut-out square becomes 0 after the model's normalisation.
    cfg = TrainConfig(cutout=8, norm_mean=0.3, norm_std=0.2)
    data = ImageSet("train", torch.zeros(16, 3, 32, 32, dtype=torch.uint8), torch.zeros(16, dtype=torch.int64))
    images, _ = next(iter(DeviceBatches(data, 16, device=torch.device("cpu"), cutout=cfg.cutout,
                                        cutout_fill=cfg.norm_mean)))
    classifier = build_classifier(cfg, 10)
    normalised = (images - classifier.mean) / classifier.std  # what the classifier's forward does first
    assert normalised.unique().tolist() == pytest.approx([-1.5, 0.0])  # black pixels, and the squares


def test_pico_res_is_pico_plus_identity_shortcuts():
    plain, residual = build_model("pico").eval(), build_model("pico-res").eval()
    # The same layers in the same order: pico's weights load into pico-res position by position.
    residual.load_state_dict(dict(zip(residual.state_dict(), plain.state_dict().values())))
    shortcuts = [m for m in residual.modules() if isinstance(m, Shortcut)]
    assert len(shortcuts) == 3
    x = torch.rand(2, 24, 16, 16)
    torch.testing.assert_close(shortcuts[0](x), x + shortcuts[0].body(x))
    images = torch.rand(4, 3, 32, 32)
    assert not torch.allclose(residual(images), plain(images))  # the shortcuts change the function
