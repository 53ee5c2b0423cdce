import math

import pytest
import torch

from cifar_exp.config import DataConfig, TrainConfig
from cifar_exp.data import load_splits
from cifar_exp.errors import ConfigError, TrainingDivergedError
from cifar_exp.train import evaluate, fit, resolve_device

TINY = dict(epochs=4, batch_size=32, lr=0.05, eval_batch_size=64)


@pytest.fixture(scope="module")
def splits(tiny_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_splits(DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=str(cache)))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_training_lowers_the_loss_and_beats_chance(splits, amp):
    seen = []
    result = fit(TrainConfig(**TINY, amp=amp, amp_dtype="bfloat16" if amp else "auto"), splits,
                 on_epoch_end=seen.append)
    assert [s.epoch for s in seen] == [1, 2, 3, 4] and seen == result.history
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_accuracy > 0.5  # chance is 0.1
    assert result.amp_dtype == (torch.bfloat16 if amp else None)
    test = evaluate(result.model, splits.test)
    assert test.accuracy > 0.5
    assert test.probabilities.shape == (100, 10)
    torch.testing.assert_close(torch.from_numpy(test.probabilities.sum(1)), torch.ones(100))


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
    assert stats.train_images_per_second > 0 and stats.epoch_seconds > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="--device cuda was asked for, but no CUDA GPU is available"):
        resolve_device("cuda")
