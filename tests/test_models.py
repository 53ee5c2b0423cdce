import pytest
import torch

from cifar_exp.config import TrainConfig
from cifar_exp.errors import ConfigError
from cifar_exp.models import Classifier, architecture, build_model, count_parameters, model_names, seed_as_reported
from cifar_exp.train import build_classifier


@pytest.mark.parametrize(("name", "parameters"), [("seed", 152_458), ("seed-wide", 1_135_498)])
def test_parameter_counts_match_the_report(name, parameters):
    model = build_model(name)
    assert count_parameters(model) == parameters
    assert model(torch.rand(5, 3, 32, 32)).shape == (5, 10)


def test_seed_pools_32x32_down_to_one_pixel():
    # The report's Linear(64 -> 1024) needs the conv stack to end at (B, 64, 1, 1).
    features = build_model("seed")[:9](torch.rand(2, 3, 32, 32))  # the three conv blocks
    assert features.shape == (2, 64, 1, 1)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'.*seed, seed-wide"):
        build_model("resnet9000")
    assert {"seed", "seed-wide"} <= set(model_names())


def test_classifier_normalises_inside():
    network = build_model("seed")
    model = Classifier(network, mean=0.5, std=0.5)
    images = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(model(images), network((images - 0.5) / 0.5))


def test_pooling_before_relu_matches_the_reports_order():
    model = build_model("seed")
    report_order = seed_as_reported()
    report_order.load_state_dict(model.state_dict())  # same parameter names: only parameter-free layers moved
    assert [type(m).__name__ for m in report_order[:3]] == ["Conv2d", "ReLU", "MaxPool2d"]
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    ours, theirs = model(images), report_order(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad(ours.sum(), images)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), images)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=0)


def test_width_knobs_give_the_counted_seed():
    widths, hidden = (32, 32, 32), 256
    convs = sum(3 * 3 * c_in * c_out + c_out for c_in, c_out in zip((3, *widths[:2]), widths))
    linears = (widths[2] * 1 * 1) * hidden + hidden + hidden * 10 + 10  # MaxPool2d(3) x3: 1x1 pixel left
    model = build_model("seed", widths=widths, hidden=hidden)
    assert count_parameters(model) == convs + linears == 30_410
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # The training config reaches the same network (the Classifier's normalisation has no parameters).
    assert count_parameters(build_classifier(TrainConfig(widths="32,32,32", hidden=256), 10)) == 30_410


@pytest.mark.parametrize("name", ["seed", "seed-wide", "seed-bn", "resnet8", "pico"])
def test_every_model_takes_three_conv_widths(name):
    default = build_model(name)
    narrow = build_model(name, widths=(8, 16, 24))
    assert count_parameters(narrow) < count_parameters(default)
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in narrow.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert {m.out_channels for m in convs} == {8, 16, 24}
    # The widths the registry records are the builder's own defaults, which build_model uses without knobs.
    assert count_parameters(architecture(name).builder(10)) == count_parameters(default)


def test_a_knob_the_model_lacks_is_named():
    with pytest.raises(ConfigError, match=r"^model pico has no hidden layer \(--hidden 128\)$"):
        build_model("pico", hidden=128)
    with pytest.raises(ConfigError, match=r"model resnet8 has no hidden layer \(--hidden 64\)"):
        build_classifier(TrainConfig(model="resnet8", hidden=64), 10)
    assert architecture("pico").hidden is None and architecture("seed").hidden == 1024
