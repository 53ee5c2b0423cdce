import pytest
import torch

from cifar_exp.config import TrainConfig
from cifar_exp.errors import ConfigError
from cifar_exp.inference import count_macs
from cifar_exp.models import (
    Classifier,
    RepConv,
    architecture,
    build_model,
    count_parameters,
    model_names,
    reparameterized,
    seed_as_reported,
    shipped_copy,
)
from cifar_exp.train import build_classifier, build_shipped_classifier, parameter_count_tags


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


@pytest.mark.parametrize("name", ["seed", "seed-wide", "seed-bn", "resnet8", "pico", "pico-rep"])
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


@pytest.mark.parametrize(("knobs", "message"), [
    ({"hidden": 0}, "model seed needs a hidden size >= 1, got 0"),
    ({"widths": (0, 1, 1)}, "model seed needs three positive conv widths, got 0,1,1"),
    ({"widths": (8, 8)}, "model seed needs three positive conv widths, got 8,8"),
])
def test_knob_values_a_network_cannot_have_are_named(knobs, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        build_model("seed", **knobs)


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    # Fresh BatchNorms are identities (mean 0, var 1, scale 1, shift 0): folding them proves little.
    generator = torch.Generator().manual_seed(0)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for tensor, low, high in ((norm.running_mean, -1, 1), (norm.running_var, 0.2, 3),
                                  (norm.weight, -2, 2), (norm.bias, -1, 1)):
            if tensor is not None:  # affine=False: no weight or bias
                tensor.data.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


def test_pico_rep_trains_with_branches_and_ships_pico_sized():
    widths = (24, 48, 80)
    convs = list(zip((3, 24, 24, 48, 48, 80), (24, 24, 48, 48, 80, 80)))  # (in, out) of the six 3x3 convs
    shipped = sum(9 * c_in * c_out + c_out for c_in, c_out in convs) + 80 * 10 + 10  # convs with biases, linear
    # While training each conv also has a 1x1 conv (in*out) and two BatchNorms (2*out each: the 3x3's
    # and the 1x1's, in place of the shipped bias), and same-width convs an identity BatchNorm (2*out).
    trained = (sum(9 * c_in * c_out + c_in * c_out + 4 * c_out + (2 * c_out if c_in == c_out else 0)
                   for c_in, c_out in convs) + 80 * 10 + 10)
    assert (shipped, trained) == (130_210, 145_770)
    model = build_model("pico-rep", widths=widths)
    assert count_parameters(model) == trained <= 150_000
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(reparameterized(model)) == shipped
    assert not any(isinstance(m, (RepConv, torch.nn.BatchNorm2d)) for m in model.modules())
    # Runs tag both counts; three classes take fewer output weights.
    assert parameter_count_tags(TrainConfig(model="pico-rep"), 10) == {
        "parameter_count": "130210", "training_parameter_count": "145770"}
    assert parameter_count_tags(TrainConfig(model="pico-rep"), 3) == {
        "parameter_count": str(130_210 - 7 * 81), "training_parameter_count": str(145_770 - 7 * 81)}
    # Shipped, it does pico's convolutions: the same MACs per image.
    assert count_macs(build_shipped_classifier(TrainConfig(model="pico-rep"), 10)) == \
        count_macs(build_classifier(TrainConfig(model="pico"), 10))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["pico-rep", "pico", "pico-res", "pico-sep", "resnet8", "seed-bn"])
def test_the_shipped_form_computes_what_the_trained_one_did(name, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name).to(memory_format=memory_format)
    _randomise_batch_norms(model)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=memory_format)
    with torch.no_grad():
        before = model.eval()(images)
        shipped = reparameterized(model)
        after = shipped(images)
    assert shipped is model and not model.training
    assert before.abs().max() > 0.1  # not a vanishing signal, which would hide a wrong fold
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # No RepConv, and no BatchNorm right after a conv, is left; the folded convs keep the memory format.
    assert not any(isinstance(m, RepConv) for m in model.modules())
    for sequence in (m for m in model.modules() if isinstance(m, torch.nn.Sequential)):
        assert not any(isinstance(a, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d)
                       for a, b in zip(sequence, sequence[1:]))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=memory_format) for conv in convs)
    assert count_parameters(model) < count_parameters(build_model(name))


@pytest.mark.parametrize("given", [torch.contiguous_format, torch.channels_last])
def test_a_shipped_copy_is_fp32_channels_last_in_eval_mode_and_leaves_the_model_alone(given):
    # channels_last because PyTorch's CPU convolutions run these networks 1.25-5x faster in it.
    model = build_model("seed-bn").to(torch.bfloat16, memory_format=given).train()
    shipped = shipped_copy(model)
    assert shipped is not model and not shipped.training and model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in shipped.parameters())
    convs = [p for p in shipped.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.dtype == torch.bfloat16 and p.is_contiguous(memory_format=given)
               for p in model.parameters() if p.dim() == 4)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shipped(images), model.eval().float()(images))


def test_the_shipped_form_of_a_model_without_batch_norm_is_the_model():
    model = build_model("seed").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert reparameterized(model) is model and not model.training
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_pico_sep_spends_its_parameters_on_width():
    stem = 48  # half the first of the default widths 96, 160, 208
    separable = list(zip((stem, 96, 96, 160, 160, 208), (96, 96, 160, 160, 208, 208)))  # (in, out) of the six
    # Per separable conv: a depthwise 3x3 (9*in) and its BN (2*in), a pointwise 1x1 (in*out) and its BN (2*out).
    trained = (9 * 3 * stem + 2 * stem  # the full-conv stem and its BN (after the pool)
               + sum(9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out for c_in, c_out in separable)
               + 208 * 10 + 10)
    # Shipped, each BN right after a conv becomes that conv's bias (one number per channel, not two);
    # the stem's BN follows a max-pool and stays.
    shipped = trained - sum(c_in + c_out for c_in, c_out in separable)
    assert (trained, shipped) == (145_114, 143_418)
    model = build_model("pico-sep")
    assert count_parameters(model) == trained <= 150_000
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(reparameterized(model)) == shipped
    pointwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [m.out_channels for m in pointwise] == [96, 96, 160, 160, 208, 208]
    narrow = build_model("pico-sep", widths=(8, 16, 24))
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert [m.out_channels for m in narrow.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)] \
        == [8, 8, 16, 16, 24, 24]
    assert count_parameters(architecture("pico-sep").builder(10)) == trained


def test_a_batch_norm_without_running_statistics_is_not_folded():
    # Such a BatchNorm normalises with each batch's statistics even in eval mode: no fixed conv equals it.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                                torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4, affine=False))
    _randomise_batch_norms(model[2:])
    images = torch.randn(5, 3, 8, 8)
    before = model.eval()(images)
    reparameterized(model)
    assert isinstance(model[1], torch.nn.BatchNorm2d) and isinstance(model[3], torch.nn.Identity)
    torch.testing.assert_close(model(images), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pico-rep", "pico"])
def test_a_shipped_model_keeps_its_dtype_and_every_parameter_trainable(name):
    model = build_model(name).double()
    reparameterized(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert all(p.requires_grad for p in model.parameters())  # the new biases of bias-free convs too
    assert model(torch.rand(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
