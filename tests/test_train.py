import dataclasses
import math
import platform
import subprocess
import sys
import time

import pytest
import torch
from conftest import PALETTE

from cifar_exp.config import DataConfig, TrainConfig
from cifar_exp.data import DeviceBatches, ImageSet, load_splits
from cifar_exp.errors import ConfigError, TrainingDivergedError
from cifar_exp.train import (
    GraphedTrainStep,
    TrainStep,
    build_classifier,
    build_optimizer,
    build_scheduler,
    build_train_step,
    evaluate,
    fit,
    resolve_device,
    train_epoch,
)

TINY = dict(epochs=4, batch_size=32, lr=0.05, eval_batch_size=64)


@pytest.fixture(scope="module")
def splits(tiny_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_splits(DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=str(cache)))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_training_lowers_the_loss_and_beats_chance(splits, amp):
    seen = []
    training_conv_dtypes = set()  # what the convolutions computed in while training
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: training_conv_dtypes.add(output.dtype)
        if isinstance(module, torch.nn.Conv2d) and module.training else None)
    try:
        result = fit(TrainConfig(**TINY, amp=amp, amp_dtype="bfloat16" if amp else "auto"), splits,
                     on_epoch_end=seen.append)
    finally:
        hook.remove()
    assert training_conv_dtypes == {torch.bfloat16 if amp else torch.float32}
    assert [s.epoch for s in seen] == [1, 2, 3, 4] and seen == result.history
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_accuracy > 0.5  # chance is 0.1
    assert result.amp_dtype == (torch.bfloat16 if amp else None)
    test = evaluate(result.model, splits.test)
    assert test.accuracy > 0.5
    assert test.probabilities.shape == (100, 10)
    torch.testing.assert_close(torch.from_numpy(test.probabilities.sum(1)), torch.ones(100))


def test_a_model_with_training_branches_comes_back_folded(splits):
    from cifar_exp.models import RepConv

    result = fit(TrainConfig(**TINY, model="pico-rep", amp=False), splits)
    assert not any(isinstance(m, RepConv) for m in result.model.modules())
    assert not result.model.training
    # The folded model is what the last epoch validated, unfolded: the same predictions.
    val = evaluate(result.model, splits.val, batch_size=TINY["eval_batch_size"])
    assert val.accuracy == result.history[-1].val_accuracy > 0.5
    # Not bit-equal: the folded convs round differently (on CUDA, PyTorch's default TF32 convs: 1e-3).
    assert val.loss == pytest.approx(result.history[-1].val_loss, rel=1e-2)


class PaletteTeacher(torch.nn.Module):
    """Knows the tiny dataset's rule (mean colour -> class), but names each class ``shift`` places on."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        palette = torch.from_numpy(PALETTE) / 255  # (10, 3)
        self.register_buffer("palette", palette.roll(shift, 0))  # class c gets colour c - shift

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colours = images.mean((2, 3))  # (B, 3)
        return -20 * torch.cdist(colours, self.palette)  # (B, 10)


def test_distillation_learns_what_the_teacher_says_not_the_labels(splits):
    # A teacher that calls class c "c + 1": trained on its predictions alone (weight 1), the student
    # predicts c + 1 for images labelled c; the labels' cross-entropy would teach c.
    teacher = PaletteTeacher(shift=1)
    val = splits.val
    shifted = (val.labels + 1) % 10
    with torch.inference_mode():
        assert (teacher(val.images.float() / 255).argmax(1) == shifted).float().mean() > 0.9
    cfg = TrainConfig(**{**TINY, "epochs": 6}, amp=False, teacher="a teacher", distill_weight=1.0,
                      distill_temperature=2.0)
    model = fit(cfg, splits, teacher=teacher).model
    predictions = torch.from_numpy(evaluate(model, val).predictions)
    assert (predictions == shifted).float().mean() > 0.8
    assert (predictions == val.labels).float().mean() < 0.1
    with pytest.raises(ValueError, match="loaded teacher"):
        fit(cfg, splits)  # cfg names a teacher that was never loaded


class RecordingTeacher(PaletteTeacher):
    """A PaletteTeacher that keeps every batch it is shown."""

    def __init__(self) -> None:
        super().__init__(shift=0)
        self.batches: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(images.detach().clone())
        return super().forward(images)


@pytest.mark.parametrize("mirror", [False, True])
def test_distill_mirror_shows_the_teacher_each_training_batch_and_its_mirror_image(splits, mirror):
    teacher = RecordingTeacher()
    cfg = TrainConfig(**{**TINY, "epochs": 1}, amp=False, teacher="a teacher", distill_mirror=mirror,
                      augment="flip-crop")
    fit(cfg, splits, teacher=teacher)
    sizes = [len(batch) for batch in teacher.batches]
    training_batches = [min(32, len(splits.train) - start) for start in range(0, len(splits.train), 32)]
    if not mirror:
        assert sizes == training_batches
        return
    assert sizes == [2 * size for size in training_batches]
    for batch in teacher.batches:  # (2B, 3, 32, 32): the augmented batch, then the same images mirrored
        images, mirrored = batch.chunk(2)
        assert torch.equal(mirrored, images.flip(-1)) and not torch.equal(mirrored, images)


def test_learning_rate_decays_per_epoch(splits):
    result = fit(TrainConfig(**{**TINY, "epochs": 3}, lr_decay=0.5), splits)
    assert [s.lr for s in result.history] == pytest.approx([0.05, 0.025, 0.0125])


def test_equal_seeds_give_identical_runs(splits):
    cfg = TrainConfig(**{**TINY, "epochs": 2}, augment="flip-crop", seed=7)
    first, second = fit(cfg, splits), fit(cfg, splits)
    for a, b in zip(first.history, second.history):
        assert (a.train_loss, a.val_loss, a.val_accuracy) == (b.train_loss, b.val_loss, b.val_accuracy)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)
    other = fit(TrainConfig(**{**TINY, "epochs": 2}, augment="flip-crop", seed=8), splits)
    assert other.history[0].train_loss != first.history[0].train_loss


def test_diverging_loss_stops_training(splits):
    seen = []
    with pytest.raises(TrainingDivergedError, match=r"training loss became (nan|inf) in epoch 1"):
        fit(TrainConfig(**{**TINY, "lr": 1e6}, amp=False), splits, on_epoch_end=seen.append)
    assert seen == []


def test_metrics_are_real_numbers(splits):
    stats = fit(TrainConfig(**{**TINY, "epochs": 1}), splits).history[0]
    for name, value in stats.metrics().items():
        assert math.isfinite(value) and value >= 0, name
    assert 0 <= stats.train_accuracy <= 1 and 0 <= stats.val_accuracy <= 1
    assert stats.lr == TINY["lr"]  # the seed's schedule decays only after the first epoch
    # images/s counts the training pass only, not the validation the epoch also ran.
    assert 0 < len(splits.train) / stats.train_images_per_second < stats.epoch_seconds


def test_train_seconds_count_the_epochs_not_the_callbacks(splits):
    # on_epoch_end logs to MLflow and writes Optuna's storage: slow stores must not inflate the
    # training time the run reports.
    start = time.perf_counter()
    result = fit(TrainConfig(**{**TINY, "epochs": 2}), splits, on_epoch_end=lambda stats: time.sleep(1.0))
    wall = time.perf_counter() - start
    assert result.train_seconds == pytest.approx(sum(s.epoch_seconds for s in result.history))
    assert result.train_seconds <= wall - 2.0


def test_training_batches_are_augmented_as_asked_with_cutout_filled_with_the_normalisation_mean(splits, monkeypatch):
    import cifar_exp.train as train_module

    served = []

    class Recording(DeviceBatches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            served.append((self.shuffle, self.augment, self.cutout, self.cutout_fill))

    monkeypatch.setattr(train_module, "DeviceBatches", Recording)
    fit(TrainConfig(**{**TINY, "epochs": 1}, augment="flip-crop", cutout=8, norm_mean=0.3), splits)
    assert served[0] == (True, "flip-crop", 8, 0.3)  # the training batches
    assert all(not shuffle and augment == "none" for shuffle, augment, _, _ in served[1:])  # evaluation's


def test_fit_distils_with_the_weight_and_temperature_asked_for(splits, monkeypatch):
    import cifar_exp.train as train_module

    made = []

    class Recording(train_module.Distillation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self.weight, self.temperature, self.mirror))

    monkeypatch.setattr(train_module, "Distillation", Recording)
    fit(TrainConfig(**{**TINY, "epochs": 1}, teacher="a teacher", distill_weight=0.3, distill_temperature=2.5),
        splits, teacher=PaletteTeacher(shift=0))
    assert made == [(0.3, 2.5, False)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="--device cuda was asked for, but no CUDA GPU is available"):
        resolve_device("cuda")


def test_fit_autotunes_cudnn_on_cuda_and_gives_the_callers_setting_back(splits, monkeypatch):
    # fit switched torch.backends.cudnn.benchmark on for the whole process and left it so. (No GPU
    # needed: the device is made to read as CUDA, and training stops at its first step.)
    import cifar_exp.train as train_module

    seen = []

    def first_step(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        raise RuntimeError("stopped")

    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(train_module, "resolve_amp_dtype", lambda cfg, device: None)
    monkeypatch.setattr(train_module, "_fit", first_step)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="stopped"):
        fit(TrainConfig(**TINY), splits)
    assert seen == [True] and torch.backends.cudnn.benchmark is False


def test_cuda_graphs_leave_cpu_training_eager(splits):
    cfg = TrainConfig(**TINY, device="cpu")
    assert cfg.cuda_graphs  # the default: on wherever training runs on CUDA
    model = build_classifier(cfg, 10)
    optimizer = build_optimizer(cfg, model)
    step = build_train_step(cfg, model, optimizer, build_scheduler(cfg, optimizer, 10), None)
    assert type(step) is TrainStep
    assert fit(cfg, splits).history[-1].val_accuracy > 0.5


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI)")


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adamw"])
def test_cuda_graphs_train_like_eager_steps(splits, optimizer):
    # 350 training images in batches of 32: 10 full batches (3 eager warm-up steps, then graph replays)
    # and a last batch of 30 run eagerly. lr halves every epoch, so a graph that kept its capture-time
    # lr, stale gradients or wrong accumulators would drift far from the eager run. The two runs still
    # differ by float noise (cuDNN picks its algorithms per run): on an H100 the SGD weights differed by
    # at most 0.002 in 12 of 36,864 elements, and AdamW's epoch loss of ~0.01 by 2%.
    cfg = TrainConfig(**{**TINY, "epochs": 3, "lr": 0.05 if optimizer != "adamw" else 0.003}, device="cuda",
                      amp=False, lr_decay=0.5, optimizer=optimizer, momentum=0.9, weight_decay=5e-4)
    graphed = fit(cfg, splits)
    eager = fit(dataclasses.replace(cfg, cuda_graphs=False), splits)
    torch.manual_seed(cfg.seed)
    initial = build_classifier(cfg, 10).cuda()  # fit's weights before training (same seed)
    for a, b in zip(eager.history, graphed.history):
        assert b.lr == a.lr
        assert b.train_loss == pytest.approx(a.train_loss, rel=0.05, abs=1e-3)
        assert b.train_accuracy == pytest.approx(a.train_accuracy, abs=0.02)
    # Each tensor's two trajectories end within 5% of the distance it travelled in training.
    for p, q, p0 in zip(eager.model.parameters(), graphed.model.parameters(), initial.parameters()):
        assert torch.linalg.vector_norm(q - p) <= 0.05 * torch.linalg.vector_norm(p - p0)


@needs_cuda
def test_cuda_graphs_distill_like_eager_steps(splits):
    # The teacher's forward pass is captured in the graph with the student's step: replayed, it must
    # predict each new batch (not the captured one), so graphed and eager distillation agree.
    teacher = PaletteTeacher(shift=1)
    # 6 epochs, as the CPU test: after 3, eager steps on CPU too predict the shifted class only 40% of the time
    cfg = TrainConfig(**{**TINY, "epochs": 6}, device="cuda", amp=False, teacher="a teacher", distill_weight=1.0,
                      distill_temperature=2.0)
    graphed = fit(cfg, splits, teacher=teacher)
    eager = fit(dataclasses.replace(cfg, cuda_graphs=False), splits, teacher=teacher)
    for a, b in zip(eager.history[:3], graphed.history[:3]):  # later, float noise has had time to grow
        assert b.train_loss == pytest.approx(a.train_loss, rel=0.05, abs=1e-3)
    shifted = (splits.val.labels + 1) % 10
    assert (torch.from_numpy(evaluate(graphed.model, splits.val).predictions) == shifted).float().mean() > 0.8


@needs_cuda
def test_default_cuda_training_replays_a_captured_graph(splits):
    cfg = TrainConfig(**TINY, device="cuda")
    model = build_classifier(cfg, 10).cuda().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    batches = DeviceBatches(splits.train, cfg.batch_size, device=torch.device("cuda"), shuffle=True,
                            channels_last=True)
    step = build_train_step(cfg, model, optimizer, build_scheduler(cfg, optimizer, len(batches)), torch.bfloat16)
    assert type(step) is GraphedTrainStep
    train_epoch(step, batches)
    assert step.graph is not None and not step.capture_failed


@needs_cuda
def test_cuda_graphs_step_aside_for_fp16_and_compile():
    for cfg, amp_dtype in ((TrainConfig(device="cuda", amp_dtype="float16"), torch.float16),
                           (TrainConfig(device="cuda", compile=True), torch.bfloat16)):
        model = build_classifier(cfg, 10).cuda()
        optimizer = build_optimizer(cfg, model)
        step = build_train_step(cfg, model, optimizer, build_scheduler(cfg, optimizer, 10), amp_dtype)
        assert type(step) is TrainStep


@needs_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
def test_cuda_bf16_autocast_learns(splits, cuda_graphs):
    result = fit(TrainConfig(**TINY, device="cuda", cuda_graphs=cuda_graphs), splits)
    assert result.amp_dtype == torch.bfloat16  # auto on a GPU with bf16
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert evaluate(result.model, splits.test).accuracy > 0.5
    assert result.peak_memory_bytes > 0


MMAPPED_BYTES_AFTER_A_16_MIB_TENSOR = """
import ctypes, sys, torch
from cifar_exp.train import keep_freed_memory_in_process

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory_in_process()
before = libc.mallinfo2().hblkhd
gradient = torch.zeros(64, 64, 32, 32)  # the seed's first max-pool input gradient at batch 64: 16 MiB
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_cpu_training_keeps_large_blocks_off_fresh_mmap_pages():
    def mmapped_bytes(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_AFTER_A_16_MIB_TENSOR, mode],
                             capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert mmapped_bytes("default") >= 16 * 2**20  # glibc's default: its own mmap, page-faulted in
    assert mmapped_bytes("keep") == 0  # from the heap, whose freed pages stay mapped for the next step


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_the_allocator_is_set_once_per_process(monkeypatch):
    from cifar_exp import train

    calls = []

    class FakeLibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(train.ctypes, "CDLL", lambda name: FakeLibc())
    train.keep_freed_memory_in_process.cache_clear()
    try:
        assert train.keep_freed_memory_in_process() and train.keep_freed_memory_in_process()
    finally:
        train.keep_freed_memory_in_process.cache_clear()  # the next caller sets the real allocator again
    assert calls == [(-3, 32 * 2**20), (-1, 2**30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD: once each


def test_mirror_tta_averages_the_probabilities_of_each_image_and_its_mirror():
    data = ImageSet("test", torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8), torch.arange(30) % 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))  # not mirror-symmetric
    images = data.images.float() / 255
    expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)).detach() / 2  # (30, 10)
    result = evaluate(model, data, batch_size=8, tta=True)  # 4 batches, the last one uneven
    torch.testing.assert_close(torch.from_numpy(result.probabilities), expected)
    assert result.loss == pytest.approx(-expected.log()[torch.arange(30), data.labels].mean().item(), rel=1e-5)
    plain = evaluate(model, data, batch_size=8)
    assert not torch.allclose(torch.from_numpy(plain.probabilities), expected)
    assert result.one_pass_accuracy == plain.accuracy and plain.one_pass_accuracy is None


@pytest.mark.parametrize("tta", [False, True])
def test_the_loss_of_a_confidently_wrong_model_is_its_cross_entropy(tta):
    # A 300-nat margin for the wrong class: float32 softmax gives the label probability 0 exactly,
    # so a loss computed as log(softmax) would be capped; the cross-entropy is 300 per image.
    data = ImageSet("test", torch.zeros((6, 3, 32, 32), dtype=torch.uint8), torch.ones(6, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([300.0] + [0.0] * 9))
    result = evaluate(model, data, batch_size=4, tta=tta)
    assert result.loss == pytest.approx(300.0)
    assert (result.predictions == 0).all() and result.probabilities[:, 0] == pytest.approx(1.0)


def _can_reset_peak_resident_set() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or a /proc (gVisor, WSL1, read-only) that refuses it
        return False


@pytest.mark.skipif(not _can_reset_peak_resident_set(), reason="this system cannot reset the peak resident set")
def test_each_fit_reports_its_own_peak_memory_on_cpu(splits):
    # A tuning process runs fit after fit: each trial's peak must be its own, not the process's
    # lifetime peak (here: a 1 GiB tensor freed before the fit).
    def process_peak() -> int:
        status = open("/proc/self/status").read().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024

    big = torch.ones(2**28)  # 1 GiB, resident
    del big
    before = process_peak()
    result = fit(TrainConfig(**{**TINY, "epochs": 1}, device="cpu"), splits)
    assert 0 < result.peak_memory_bytes < before - 2**29


@pytest.mark.slow  # inductor compiles the training step on first use (~30 s on 2 cores)
def test_a_compiled_training_step_trains_as_the_eager_one_and_returns_a_plain_model(splits, monkeypatch):
    cfg = TrainConfig(**{**TINY, "epochs": 2}, amp=False)
    eager = fit(cfg, splits)
    compiled_models = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled_models.append(model) or compile_(model))
    compiled = fit(dataclasses.replace(cfg, compile=True), splits)
    assert len(compiled_models) == 1
    # The same weights and batches: only the kernels' summation order differs.
    for ours, theirs in zip(compiled.history, eager.history, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-3)
        assert ours.val_loss == pytest.approx(theirs.val_loss, rel=1e-3)
    # What is logged and exported is the model itself, not torch.compile's wrapper of it.
    assert type(compiled.model) is type(eager.model)
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    assert (evaluate(compiled.model, splits.test).predictions == evaluate(eager.model, splits.test).predictions).mean() > 0.95


def test_progress_bars_go_to_stderr_and_change_nothing(splits, capsys):
    cfg = TrainConfig(**{**TINY, "epochs": 2}, amp=False)
    quiet = fit(cfg, splits)
    assert capsys.readouterr().err == ""
    shown = fit(cfg, splits, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "epoch 1/2" in captured.err and "epoch 2/2" in captured.err and "batch" in captured.err
    assert [s.train_loss for s in shown.history] == [s.train_loss for s in quiet.history]
