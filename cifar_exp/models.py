"""Model registry: architecture name -> builder of an ``nn.Module`` mapping (B, 3, 32, 32) to logits."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from cifar_exp.errors import ConfigError

NUM_CLASSES = 10

# A builder takes (num_classes, widths=..., [hidden=...]) and returns the network.
ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Architecture:
    """A registered model family: its builder and its own (default) width knobs."""

    builder: ModelBuilder
    widths: tuple[int, int, int]  # output channels of the three conv stages
    hidden: int | None  # width of the hidden linear layer; None: the family has no hidden layer


_REGISTRY: dict[str, Architecture] = {}


def register(
    name: str, *, widths: tuple[int, int, int], hidden: int | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = Architecture(builder, widths, hidden)
        return builder

    return add


def model_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def architecture(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(model_names())}"
        ) from None


def build_model(
    name: str,
    num_classes: int = NUM_CLASSES,
    *,
    widths: tuple[int, int, int] | None = None,
    hidden: int | None = None,
) -> nn.Module:
    """Model ``name``; ``widths`` / ``hidden`` replace its own conv widths / hidden size when given."""
    arch = architecture(name)
    if widths is not None and (len(widths) != 3 or min(widths) < 1):
        raise ConfigError(f"model {name} needs three positive conv widths, got {','.join(map(str, widths))}")
    if hidden is not None and arch.hidden is None:
        raise ConfigError(f"model {name} has no hidden layer (--hidden {hidden})")
    if hidden is not None and hidden < 1:
        raise ConfigError(f"model {name} needs a hidden size >= 1, got {hidden}")
    knobs: dict[str, object] = {"widths": tuple(widths) if widths is not None else arch.widths}
    if arch.hidden is not None:
        knobs["hidden"] = hidden if hidden is not None else arch.hidden
    return arch.builder(num_classes, **knobs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


SEED_WIDTHS = (64, 64, 64)
SEED_HIDDEN = 1024


def _seed_network(
    pool: int,
    num_classes: int,
    widths: tuple[int, int, int] = SEED_WIDTHS,
    hidden: int = SEED_HIDDEN,
    batch_norm: bool = False,
    report_order: bool = False,
) -> nn.Sequential:
    def block(in_channels: int, out_channels: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
        relu_pool = [nn.ReLU(inplace=True), nn.MaxPool2d(pool)]
        # The report's Conv -> ReLU -> MaxPool, computed as Conv -> MaxPool -> ReLU: ReLU is monotonic,
        # so both give the same values and gradients, but ReLU (and its backward) then touch pool**2
        # times fewer elements. Neither layer has parameters, so state dicts are unchanged.
        return [nn.Conv2d(in_channels, out_channels, 3, padding=1), *norm,
                *(relu_pool if report_order else relu_pool[::-1])]

    side = 32 // pool // pool // pool  # MaxPool2d(3): 32 -> 10 -> 3 -> 1; MaxPool2d(2): 32 -> 16 -> 8 -> 4
    first, second, third = widths
    return nn.Sequential(
        *block(3, first),
        *block(first, second),
        *block(second, third),
        nn.Flatten(),  # (B, third, side, side) -> (B, third * side**2)
        nn.Linear(third * side * side, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


@register("seed", widths=SEED_WIDTHS, hidden=SEED_HIDDEN)
def seed(
    num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = SEED_WIDTHS, hidden: int = SEED_HIDDEN
) -> nn.Module:
    # The report's network: three Conv3x3(64) -> ReLU -> MaxPool blocks, then Linear(64 -> 1024)
    # -> ReLU -> Linear(1024 -> 10). A first linear layer of 64 inputs and "~150k parameters" hold
    # together only if pooling collapses 32x32 to 1x1, which MaxPool2d(3) in every block does:
    # 32 -> 10 -> 3 -> 1, so (B, 64, 1, 1) -> 64 features and exactly 152,458 parameters.
    return _seed_network(pool=3, num_classes=num_classes, widths=widths, hidden=hidden)


def seed_as_reported(
    num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = SEED_WIDTHS, hidden: int = SEED_HIDDEN
) -> nn.Module:
    """``seed`` with the report's literal layer order (ReLU before MaxPool): same function, slower."""
    return _seed_network(pool=3, num_classes=num_classes, widths=widths, hidden=hidden, report_order=True)


@register("seed-wide", widths=SEED_WIDTHS, hidden=SEED_HIDDEN)
def seed_wide(
    num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = SEED_WIDTHS, hidden: int = SEED_HIDDEN
) -> nn.Module:
    # The other reading of the report: MaxPool2d(2) gives 32 -> 16 -> 8 -> 4, (B, 64, 4, 4) ->
    # 1024 features, Linear(1024 -> 1024): 1,135,498 parameters.
    return _seed_network(pool=2, num_classes=num_classes, widths=widths, hidden=hidden)


@register("seed-bn", widths=SEED_WIDTHS, hidden=SEED_HIDDEN)
def seed_bn(
    num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = SEED_WIDTHS, hidden: int = SEED_HIDDEN
) -> nn.Module:
    # The seed network with BatchNorm after every conv: what normalisation alone buys.
    return _seed_network(pool=3, num_classes=num_classes, widths=widths, hidden=hidden, batch_norm=True)


def conv_bn(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=bias), nn.BatchNorm2d(out_channels)]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut (1x1 conv when the shape changes), as in ResNet v1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(in_channels, out_channels, stride, bias),
            nn.ReLU(inplace=True),
            *conv_bn(out_channels, out_channels, 1, bias),
        )
        self.shortcut = (
            nn.Identity() if stride == 1 and in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


RESNET8_WIDTHS = (16, 32, 64)


@register("resnet8", widths=RESNET8_WIDTHS)
def resnet8(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = RESNET8_WIDTHS) -> nn.Module:
    # MLPerf Tiny's image-classification reference (ResNet v1, 3 stacks of one block, 16/32/64 filters,
    # convolutions with biases as in its Keras model). Keras counts 78,666 parameters including the
    # 480 BatchNorm running statistics, which PyTorch keeps as buffers: 78,186 trainable here.
    first, second, third = widths
    return nn.Sequential(
        *conv_bn(3, first, bias=True), nn.ReLU(inplace=True),  # (B, first, 32, 32)
        ResidualBlock(first, first, 1, bias=True),  # (B, first, 32, 32)
        ResidualBlock(first, second, 2, bias=True),  # (B, second, 16, 16)
        ResidualBlock(second, third, 2, bias=True),  # (B, third, 8, 8)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(third, num_classes),
    )


class Shortcut(nn.Module):
    """``x + body(x)``: an identity shortcut around ``body``, which keeps the shape."""

    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _pico_block(in_channels: int, out_channels: int, shortcut: bool = False) -> list[nn.Module]:
    # conv -> pool -> BN -> ReLU -> conv -> BN -> ReLU (airbench's layout): the first conv works at the
    # block's input resolution, the second at half of it, where it costs a quarter as much.
    second = [*conv_bn(out_channels, out_channels), nn.ReLU(inplace=True)]
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        *([Shortcut(*second)] if shortcut else second),
    ]


PICO_WIDTHS = (24, 48, 80)


@register("pico", widths=PICO_WIDTHS)
def pico(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = PICO_WIDTHS) -> nn.Module:
    # Our accuracy-per-millisecond design: 130,514 parameters, 9.1 M MACs (seed: 5.9 M). Batch-1 CPU
    # latency is set by the work done at high resolution, so only one narrow conv sees 32x32 and the
    # width is spent at 8x8 and 4x4, where it is cheap; six BN-ReLU convs give depth (the seed has three
    # and no normalisation); global max-pooling feeds a single linear layer (no 1024-wide hidden layer).
    first, second, third = widths
    return nn.Sequential(
        *_pico_block(3, first),  # (B, first, 16, 16)
        *_pico_block(first, second),  # (B, second, 8, 8)
        *_pico_block(second, third),  # (B, third, 4, 4)
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(third, num_classes),
    )


@register("pico-res", widths=PICO_WIDTHS)
def pico_res(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = PICO_WIDTHS) -> nn.Module:
    # pico with an identity shortcut around each block's second conv (ResNet-9's layout, as airbench
    # uses it): the same 130,514 parameters, one addition per block, at 16x16, 8x8 and 4x4.
    first, second, third = widths
    return nn.Sequential(
        *_pico_block(3, first, shortcut=True),  # (B, first, 16, 16)
        *_pico_block(first, second, shortcut=True),  # (B, second, 8, 8)
        *_pico_block(second, third, shortcut=True),  # (B, third, 4, 4)
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(third, num_classes),
    )


def _fold_batch_norm(kernel: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel, bias) of one conv computing ``norm(conv(x))`` with ``norm``'s running statistics."""
    return fuse_conv_bn_weights(kernel, None, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)


class RepConv(nn.Module):
    """A 3x3 conv-BN trained beside a 1x1 conv-BN and, where the shape allows, an identity BN branch,
    the three outputs summed (RepVGG, Ding et al., 2021).

    The extra branches change how the model trains (a better-conditioned, ResNet-like optimisation),
    not what it can compute: in eval mode all three are linear in ``x``, so ``fused()`` folds them into
    one 3x3 conv with a bias, which is what is shipped (see ``reparameterized``).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv3x3 = nn.Sequential(*conv_bn(in_channels, out_channels))
        self.conv1x1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.identity = nn.BatchNorm2d(out_channels) if in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3x3(x) + self.conv1x1(x)
        return y + self.identity(x) if self.identity is not None else y

    @torch.no_grad()
    def fused(self) -> nn.Conv2d:
        """The one 3x3 conv (with bias) equal to this block in eval mode."""
        conv3x3, norm3x3 = self.conv3x3
        conv1x1, norm1x1 = self.conv1x1
        kernel, bias = _fold_batch_norm(conv3x3.weight, norm3x3)  # (out, in, 3, 3), (out,)
        kernel1x1, bias1x1 = _fold_batch_norm(conv1x1.weight, norm1x1)
        kernel = kernel + nn.functional.pad(kernel1x1, (1, 1, 1, 1))  # a 1x1 kernel is a 3x3 one's centre
        bias = bias + bias1x1
        if self.identity is not None:
            channels = conv3x3.in_channels
            eye = torch.zeros_like(conv3x3.weight)
            eye[torch.arange(channels), torch.arange(channels), 1, 1] = 1  # the identity as a 3x3 conv
            kernel_id, bias_id = _fold_batch_norm(eye, self.identity)
            kernel, bias = kernel + kernel_id, bias + bias_id
        conv = nn.Conv2d(conv3x3.in_channels, conv3x3.out_channels, 3, padding=1).to(kernel.device, kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        return conv


def reparameterized(model: nn.Module) -> nn.Module:
    """``model`` in eval mode in the form it ships in (in place; returned): every ``RepConv`` replaced by
    its fused conv, and every BatchNorm that directly follows a conv in an ``nn.Sequential`` folded into
    that conv's weights and bias (one after a pooling layer stays).

    The result computes the same function (up to rounding) with fewer parameters and layers: the form
    a trained model is evaluated, logged, exported and timed in. In eager PyTorch each folded BatchNorm
    is one kernel launch less per image, which at batch 1 is most of a small layer's cost (ONNX Runtime
    folds them itself). Models without either are unchanged.
    """
    model.eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, RepConv):
                setattr(parent, name, child.fused().to(memory_format=_memory_format(child)))
    for sequence in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(sequence)
        # A BatchNorm without running statistics normalises with each batch's, even in eval mode: not foldable.
        pairs = [i for i in range(len(layers) - 1)
                 if type(layers[i]) is nn.Conv2d and type(layers[i + 1]) is nn.BatchNorm2d
                 and layers[i + 1].running_mean is not None]
        for i in pairs:
            conv = fuse_conv_bn_eval(layers[i], layers[i + 1]).to(memory_format=_memory_format(layers[i]))
            sequence[i] = conv.requires_grad_(layers[i].weight.requires_grad)  # a new bias too
            sequence[i + 1] = nn.Identity()  # keeps the indices (and state-dict names) of the layers after it
    return model


def _memory_format(module: nn.Module) -> torch.memory_format:
    weight = next(module.parameters())
    return torch.channels_last if weight.is_contiguous(memory_format=torch.channels_last) and \
        not weight.is_contiguous() else torch.contiguous_format


def _pico_rep_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    # pico's block with each conv-BN a RepConv. BN now comes before the max-pool (a branch sum needs
    # each branch normalised), so the shipped block is conv(+bias) -> pool -> ReLU -> conv(+bias) -> ReLU.
    return [
        RepConv(in_channels, out_channels), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        RepConv(out_channels, out_channels), nn.ReLU(inplace=True),
    ]


@register("pico-rep", widths=PICO_WIDTHS)
def pico_rep(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = PICO_WIDTHS) -> nn.Module:
    # pico trained with RepVGG branches: 145,770 parameters while training (the 1x1 convs and extra
    # BNs), 130,210 shipped: pico's convs, with biases in place of its BatchNorms, and its 9.1 M MACs.
    first, second, third = widths
    return nn.Sequential(
        *_pico_rep_block(3, first),  # (B, first, 16, 16)
        *_pico_rep_block(first, second),  # (B, second, 8, 8)
        *_pico_rep_block(second, third),  # (B, third, 4, 4)
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(third, num_classes),
    )


def _separable(in_channels: int, out_channels: int) -> list[nn.Module]:
    # MobileNet's depthwise-separable conv: a 3x3 conv per channel, then a 1x1 conv mixing channels,
    # each with BN and ReLU: 9*in + in*out weights in place of a full 3x3 conv's 9*in*out.
    return [
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    ]


# Chosen among 64/128/256, 80/160/224 and 96/160/208, each distilled over seeds 0-2 (benchmarks/ACCURACY.md):
# the two wider ones validate alike (within the noise of 500 images) and beat 64/128/256; of those two,
# only 96/160/208 runs within 2x the seed's batch-1 latency in ONNX Runtime.
PICO_SEP_WIDTHS = (96, 160, 208)


@register("pico-sep", widths=PICO_SEP_WIDTHS)
def pico_sep(num_classes: int = NUM_CLASSES, widths: tuple[int, int, int] = PICO_SEP_WIDTHS) -> nn.Module:
    # pico's layout with depthwise-separable convs, which buy 2.6-4x pico's widths for about the same
    # parameters (145,114 while training) and MACs (9.3 M): a full conv stem of half the first width,
    # then two separable convs per stage at 16x16, 8x8 and 4x4.
    first, second, third = widths
    stem = max(1, first // 2)
    return nn.Sequential(
        nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
        *_separable(stem, first), *_separable(first, first), nn.MaxPool2d(2),  # (B, first, 8, 8)
        *_separable(first, second), *_separable(second, second), nn.MaxPool2d(2),  # (B, second, 4, 4)
        *_separable(second, third), *_separable(third, third),  # (B, third, 4, 4)
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(third, num_classes),
    )


class Classifier(nn.Module):
    """A network with its input normalisation built in, as shipped and logged to MLflow.

    Takes float images in [0, 1] of shape (B, 3, 32, 32) and returns logits (B, classes), so that
    whoever loads the model needs no knowledge of the training normalisation.
    """

    def __init__(self, network: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.full((1, 3, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, 3, 1, 1), float(std)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std)


class Ensemble(nn.Module):
    """Several classifiers as one: the mean of their logits (a distillation teacher of many models)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(images) for member in self.members]).mean(0)  # (B, classes)

    def train(self, mode: bool = True) -> Ensemble:
        # Not nn.Module's recursive train(): torch.export'ed members (as MLflow loads them) refuse it.
        set_training(self, mode)
        return self


# The layout a model ships in (see shipped_copy).
SHIPPED_MEMORY_FORMAT = torch.channels_last


def shipped_copy(model: nn.Module) -> nn.Module:
    """An fp32, channels_last CPU copy of ``model`` in eval mode: the model as it ships, whatever mode,
    device and layout it was in.

    channels_last because PyTorch's CPU convolutions run these networks faster in it than contiguous:
    1.25x to 5x for the untrained architectures measured, and the trained seed as MLflow loads it 1.4x at
    batch 1 (benchmarks/RESULTS.md, "Eager PyTorch's layout"). torch.export keeps the layout, so a logged
    model loads in it too.
    """
    shipped = copy.deepcopy(model).float().cpu().to(memory_format=SHIPPED_MEMORY_FORMAT)
    if not isinstance(shipped, torch.fx.GraphModule):  # torch.export'ed modules are frozen in eval
        shipped.eval()
    return shipped


def set_training(model: nn.Module, mode: bool) -> None:
    """``model.train(mode)`` for modules that refuse it: torch.export'ed ones, as MLflow loads them."""
    for module in model.modules():
        module.training = mode
