import pytest
import torch

from cifar_exp.errors import ConfigError
from cifar_exp.models import Classifier, build_model, count_parameters, model_names, seed_as_reported


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
