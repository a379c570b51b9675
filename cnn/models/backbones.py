"""ImageNet architectures as plain Flax modules, for `model.preset` and `cnn.models.pretrained`.

Each module rebuilds a reference implementation layer for layer, and names
its layers as that reference does, so a weight file's tensors find their
place by name (cnn/models/weights.py): `resnet50`, `mobilenet_v2` and
`efficientnet_b0` are `keras.applications`' ResNet50, MobileNetV2 and
EfficientNetB0 (layer names, paddings, epsilons, parameter counts);
`resnet18` is torchvision's ResNet-18. Each is called as
`Name(num_classes=N, **overrides)` and returns logits, so cnn trains it as
it trains your own module (cnn/models/module.py).

torchvision builds the first three a little differently (ResNet-50 v1.5:
the stride on the 3x3 convolution, no convolution biases; symmetric
padding where Keras pads as TensorFlow's 'same'; torch's batch-norm epsilon;
no input normalisation inside EfficientNet). `style='torchvision'` builds
that form, with torchvision's parameter counts; loading a torchvision or
timm file picks it.

Adding an architecture is one module here plus one entry in `BACKBONES`
naming it and, per weight source, the function that turns the module's
layer names into the file's and the style the module takes for it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.errors import ConfigError, ShapeError
from cnn.models.layers import BatchNorm, Conv, Pool

STYLES = ("keras", "torchvision")


def _check_size(x: jax.Array, module: nn.Module) -> None:
    """Refuses images smaller than the architecture's minimum (Keras' `min_size` for its applications)."""
    height, width = x.shape[1:3] if x.ndim == 4 else (0, 0)
    if x.ndim != 4 or min(height, width) < module.MIN_SIZE:
        shown = "x".join(map(str, x.shape[1:]))
        raise ShapeError(f"{module.PRESET} takes images (height, width, channels) of at least "
                         f"{module.MIN_SIZE}x{module.MIN_SIZE}, not {shown}; set data.image_size="
                         f"({module.MIN_SIZE}, {module.MIN_SIZE}) or larger")


def _pad(x: jax.Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Keras' ZeroPadding2D on NHWC."""
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _correct_pad(x: jax.Array, kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """keras.applications.imagenet_utils.correct_pad: the padding before a stride-2 'valid' convolution."""
    half = kernel // 2
    return tuple((half - (1 - size % 2), half) for size in x.shape[1:3])


def _torchvision(module: nn.Module) -> bool:
    """Whether the module is built in torchvision's form (its `style`)."""
    if module.style not in STYLES:
        raise ConfigError(f"{module.PRESET}(style={module.style!r}): style is one of {', '.join(map(repr, STYLES))}")
    return module.style == "torchvision"


def _same(x: jax.Array, kernel: int, stride: int, torchvision: bool):
    """(x, padding) of a 'same' convolution: torchvision pads kernel // 2 on every side; Keras pads as
    TensorFlow's 'same' (correct_pad before a stride-2 'valid' convolution, the same pixels)."""
    if torchvision:
        return x, ((kernel // 2, kernel // 2),) * 2
    if stride == 2:
        return _pad(x, _correct_pad(x, kernel)), "VALID"
    return x, "SAME"


def _conv(x, filters: int, kernel: int, stride: int = 1, padding="VALID", use_bias: bool = True, name=None,
          groups: int = 1, with_input: bool = False):
    """nn.Conv's parameters, as cnn's Conv; `with_input`: (output, x), x a residual block's identity shortcut,
    whose gradient cnn/kernels can then add in the convolution's backward call."""
    return Conv(filters, (kernel, kernel), (stride, stride), padding=padding, use_bias=use_bias,
                feature_group_count=groups, name=name)(x, with_input=with_input)


def _bn(x, train: bool, name: str, epsilon: float = 1e-3, momentum: float = 0.99, relu: bool = False,
        residual=None, relu6: bool = False):
    """Batch norm, then a residual block's shortcut added and relu, or relu6 (one call cnn/kernels can fuse): cnn's
    BatchNorm, nn.BatchNorm's parameters."""
    return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, name=name)(
        x, relu=relu, relu6=relu6, residual=residual)


def _norm(module: nn.Module, train: bool, epsilon: float, momentum: float) -> Callable:
    """The module's batch norm: Keras' epsilon and momentum, or torch's (1e-5; momentum 0.1, Flax's 0.9) in
    torchvision's form."""
    if _torchvision(module):
        epsilon, momentum = 1e-5, 0.9
    return lambda x, name, relu=False, residual=None, relu6=False: _bn(x, train, name, epsilon, momentum, relu,
                                                                      residual, relu6)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Keras' _make_divisible for MobileNetV2 widths: the nearest multiple of `divisor`, at most 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ResNet50(nn.Module):
    """keras.applications.ResNet50 (He et al. 2016, v1 with biases in every convolution): 25,636,712 weights; or
    torchvision's v1.5 (the stride on the 3x3 convolution, no convolution biases): 25,557,032 parameters."""

    num_classes: int = 1000
    style: str = "keras"
    PRESET: ClassVar[str] = "resnet50"
    MIN_SIZE: ClassVar[int] = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        torchvision, bn = _torchvision(self), _norm(self, train, 1.001e-5, 0.99)
        conv = lambda x, filters, kernel, stride, name, with_input=False: _conv(
            x, filters, kernel, stride, ((kernel // 2,) * 2,) * 2, not torchvision, name, with_input=with_input)
        x = conv(x, 64, 7, 2, "conv1_conv")
        x = bn(x, "conv1_bn", relu=True)
        x = Pool("max", (3, 3), (2, 2), "VALID", name="pool1_pool")(_pad(x, ((1, 1), (1, 1))))
        for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for block in range(blocks):
                name = f"conv{stage + 2}_block{block + 1}"
                stride = 2 if stage > 0 and block == 0 else 1
                if block == 0:
                    shortcut = bn(conv(x, 4 * filters, 1, stride, f"{name}_0_conv"), f"{name}_0_bn")
                    y = conv(x, filters, 1, 1 if torchvision else stride, f"{name}_1_conv")
                else:
                    y, shortcut = conv(x, filters, 1, 1, f"{name}_1_conv", with_input=True)
                y = bn(y, f"{name}_1_bn", relu=True)
                y = bn(conv(y, filters, 3, stride if torchvision else 1, f"{name}_2_conv"), f"{name}_2_bn", relu=True)
                x = bn(conv(y, 4 * filters, 1, 1, f"{name}_3_conv"), f"{name}_3_bn", relu=True, residual=shortcut)
        return nn.Dense(self.num_classes, name="predictions")(x.mean(axis=(1, 2)))


class MobileNetV2(nn.Module):
    """keras.applications.MobileNetV2 (Sandler et al. 2018) with width multiplier `alpha`: 3,538,984 weights at
    alpha=1; or torchvision's (symmetric padding, dropout 0.2 before the head): 3,504,872 parameters."""

    num_classes: int = 1000
    alpha: float = 1.0
    style: str = "keras"
    PRESET: ClassVar[str] = "mobilenet_v2"
    MIN_SIZE: ClassVar[int] = 32
    # (filters, stride, expansion) of blocks 0..16
    BLOCKS: ClassVar[tuple] = ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6), (64, 2, 6),
                               (64, 1, 6), (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6), (160, 2, 6),
                               (160, 1, 6), (160, 1, 6), (320, 1, 6))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        torchvision, bn = _torchvision(self), _norm(self, train, 1e-3, 0.999)
        x, padding = _same(x, 3, 2, torchvision)
        x = _conv(x, _make_divisible(32 * self.alpha), 3, 2, padding, use_bias=False, name="Conv1")
        x = bn(x, "bn_Conv1", relu6=True)
        for block, (filters, stride, expansion) in enumerate(self.BLOCKS):
            inputs, channels = x, x.shape[-1]
            out = _make_divisible(int(filters * self.alpha))
            prefix = f"block_{block}_" if block else "expanded_conv_"
            residual = channels == out and stride == 1
            if block:  # a residual's input is also the shortcut: its gradient joins in the expand's backward call
                x = _conv(x, expansion * channels, 1, use_bias=False, name=f"{prefix}expand", with_input=residual)
                if residual:
                    x, inputs = x
                x = bn(x, f"{prefix}expand_BN", relu6=True)
            x, padding = _same(x, 3, stride, torchvision)
            x = _conv(x, x.shape[-1], 3, stride, padding, use_bias=False, groups=x.shape[-1],
                      name=f"{prefix}depthwise")
            x = bn(x, f"{prefix}depthwise_BN", relu6=True)
            x = bn(_conv(x, out, 1, use_bias=False, name=f"{prefix}project"), f"{prefix}project_BN")
            if residual:
                x = inputs + x
        last = _make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
        x = bn(_conv(x, last, 1, use_bias=False, name="Conv_1"), "Conv_1_bn", relu6=True).mean(axis=(1, 2))
        if torchvision:
            x = nn.Dropout(0.2, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, name="predictions")(x)


class Normalization(nn.Module):
    """Keras' Normalization layer: (x - mean) / sqrt(variance) per channel, with its statistics (and the count
    Keras keeps beside them) as batch statistics that nothing updates, loaded from a weight file."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1:]
        mean = self.variable("batch_stats", "mean", jnp.zeros, channels).value
        variance = self.variable("batch_stats", "variance", jnp.ones, channels).value
        self.variable("batch_stats", "count", jnp.zeros, ())
        return (x - mean) / jnp.maximum(jnp.sqrt(variance), 1e-7)


class EfficientNetB0(nn.Module):
    """keras.applications.EfficientNetB0 (Tan & Le 2019): 5,330,571 weights, its input Normalization's mean,
    variance and count included (as batch statistics: they are never trained).

    Inputs are pixels in [0, 255]: the model rescales and normalises them
    itself. `imagenet_rescaling` adds the division by ImageNet's standard
    deviations that Keras puts in only with weights='imagenet'; set it for
    Keras' ImageNet weight file. torchvision's form (5,288,548 parameters)
    has no normalisation inside: its inputs are normalised already
    (data.preprocessing='torch'), and its padding is symmetric.
    """

    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    imagenet_rescaling: bool = False
    style: str = "keras"
    PRESET: ClassVar[str] = "efficientnet_b0"
    MIN_SIZE: ClassVar[int] = 32
    # (kernel, repeats, filters in, filters out, expansion, stride) per stage; every block has SE ratio 0.25
    STAGES: ClassVar[tuple] = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
                               (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
    STDDEV: ClassVar[tuple] = (0.229, 0.224, 0.225)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        torchvision, bn = _torchvision(self), _norm(self, train, 1e-3, 0.99)
        if not torchvision:
            x = Normalization(name="normalization")(x / 255.0)
        if self.imagenet_rescaling and not torchvision:
            x = x / jnp.sqrt(jnp.asarray(self.STDDEV))
        x, padding = _same(x, 3, 2, torchvision)
        x = nn.swish(bn(_conv(x, 32, 3, 2, padding, use_bias=False, name="stem_conv"), "stem_bn"))
        total, b = sum(stage[1] for stage in self.STAGES), 0
        for i, (kernel, repeats, filters_in, filters_out, expansion, stride) in enumerate(self.STAGES):
            for j in range(repeats):
                x = self._block(x, train, bn, self.drop_connect_rate * b / total, f"block{i + 1}{chr(j + 97)}_",
                                filters_in if j == 0 else filters_out, filters_out, kernel,
                                stride if j == 0 else 1, expansion)
                b += 1
        x = nn.swish(bn(_conv(x, 1280, 1, use_bias=False, name="top_conv"), "top_bn"))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="top_dropout")(x.mean(axis=(1, 2)))
        return nn.Dense(self.num_classes, name="predictions")(x)

    def _block(self, inputs, train, bn, drop_rate, name, filters_in, filters_out, kernel, stride, expansion):
        """Keras' efficientnet.block (torchvision's MBConv): expand, depthwise, squeeze-and-excite, project,
        dropped-path residual."""
        filters, x = filters_in * expansion, inputs
        if expansion != 1:
            x = nn.swish(bn(_conv(x, filters, 1, use_bias=False, name=f"{name}expand_conv"), f"{name}expand_bn"))
        x, padding = _same(x, kernel, stride, self.style == "torchvision")
        x = _conv(x, filters, kernel, stride, padding, use_bias=False, groups=filters, name=f"{name}dwconv")
        x = nn.swish(bn(x, f"{name}bn"))
        se = x.mean(axis=(1, 2), keepdims=True)
        se = nn.swish(_conv(se, max(1, int(filters_in * 0.25)), 1, name=f"{name}se_reduce"))
        x = x * nn.sigmoid(_conv(se, filters, 1, name=f"{name}se_expand"))
        x = bn(_conv(x, filters_out, 1, use_bias=False, name=f"{name}project_conv"), f"{name}project_bn")
        if stride == 1 and filters_in == filters_out:
            if drop_rate > 0:
                x = nn.Dropout(drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train, name=f"{name}drop")(x)
            x = x + inputs
        return x


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv + BN, a 1x1 conv + BN shortcut where the shape changes."""

    filters: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda x, name, relu=False, residual=None: _bn(x, train, name, 1e-5, 0.9, relu, residual)
        identity = self.stride == 1 and x.shape[-1] == self.filters
        y = _conv(x, self.filters, 3, self.stride, ((1, 1), (1, 1)), False, "conv1", with_input=identity)
        if identity:
            y, shortcut = y
        else:
            shortcut = bn(_conv(x, self.filters, 1, self.stride, use_bias=False, name="downsample_0"), "downsample_1")
        y = _conv(bn(y, "bn1", relu=True), self.filters, 3, 1, ((1, 1), (1, 1)), False, "conv2")
        return bn(y, "bn2", relu=True, residual=shortcut)


class ResNet18(nn.Module):
    """torchvision.models.resnet18 (He et al. 2016): 11,689,512 parameters (its BN running averages are buffers,
    not parameters, there). Layers are named as in its state dict, with '.' as '_' or a nesting level."""

    num_classes: int = 1000
    PRESET: ClassVar[str] = "resnet18"
    MIN_SIZE: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        x = _conv(x, 64, 7, 2, ((3, 3), (3, 3)), False, "conv1")
        x = _bn(x, train, "bn1", epsilon=1e-5, momentum=0.9, relu=True)
        x = Pool("max", (3, 3), (2, 2), ((1, 1), (1, 1)), name="maxpool")(x)
        for stage, filters in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(filters, stride, name=f"layer{stage + 1}_{block}")(x, train)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def keras_names(name: str) -> str:
    """Keras applications' layer names are the modules' own."""
    return name


def _resnet50_torchvision(name: str) -> str:
    """conv3_block2_1_conv -> layer2.1.conv1, conv3_block1_0_bn -> layer2.0.downsample.1 (timm's ResNets too)."""
    if name in ("conv1_conv", "conv1_bn", "predictions"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn1", "predictions": "fc"}[name]
    match = re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", name)
    if match is None:
        return name
    stage, block, index, kind = int(match[1]) - 1, int(match[2]) - 1, match[3], match[4]
    layer = f"downsample.{int(kind == 'bn')}" if index == "0" else f"{kind}{index}"
    return f"layer{stage}.{block}.{layer}"


def _mobilenet_v2_torchvision(name: str) -> str:
    """block_3_expand -> features.4.conv.0.0, block_3_depthwise_BN -> features.4.conv.1.1, block_3_project ->
    features.4.conv.2 (block 0, expanded_conv_*, has no expansion: one step fewer)."""
    fixed = {"Conv1": "features.0.0", "bn_Conv1": "features.0.1", "Conv_1": "features.18.0",
             "Conv_1_bn": "features.18.1", "predictions": "classifier.1"}
    match = re.fullmatch(r"(?:expanded_conv|block_(\d+))_(expand|depthwise|project)(_BN)?", name)
    if name in fixed or match is None:
        return fixed.get(name, name)
    block, norm = int(match[1] or 0), int(match[3] is not None)
    step = ("expand", "depthwise", "project").index(match[2]) - (block == 0)
    place = f"{step + norm}" if match[2] == "project" else f"{step}.{norm}"
    return f"features.{block + 1}.conv.{place}"


def _efficientnet_b0_torchvision(name: str) -> str:
    """block2a_dwconv -> features.2.0.block.1.0, block2b_se_reduce -> features.2.1.block.2.fc1 (stage 1 has no
    expansion: its steps start one earlier)."""
    fixed = {"stem_conv": "features.0.0", "stem_bn": "features.0.1", "top_conv": "features.8.0",
             "top_bn": "features.8.1", "predictions": "classifier.1"}
    match = re.fullmatch(r"block(\d)([a-z])_(\w+)", name)
    if name in fixed or match is None:
        return fixed.get(name, name)
    stage, index, e = int(match[1]), ord(match[2]) - ord("a"), int(match[1] != "1")
    places = {"expand_conv": "0.0", "expand_bn": "0.1", "dwconv": f"{e}.0", "bn": f"{e}.1",
              "se_reduce": f"{e + 1}.fc1", "se_expand": f"{e + 1}.fc2", "project_conv": f"{e + 2}.0",
              "project_bn": f"{e + 2}.1"}
    return f"features.{stage}.{index}.block.{places.get(match[3], match[3])}"


def _resnet18_torchvision(name: str) -> str:
    """layer2_0/downsample_0 -> layer2.0.downsample.0: the module keeps the state dict's names."""
    return name.replace("/", ".").replace("_", ".")


@dataclasses.dataclass(frozen=True)
class Source:
    """How a backbone reads one source's weight files: the file's name for each of the module's layers (a
    nested layer's path joined by '/'), and the `style` the module is built in for them (None: one form only)."""

    rename: Callable[[str], str]
    style: str | None = None


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A named architecture: its module class, its head layer, and per weight source ('keras', 'torchvision':
    torchvision's and timm's state dicts) how it reads such a file (a source absent here is one cnn cannot
    read for it)."""

    module: type[nn.Module]
    sources: dict[str, Source]
    head: str = "predictions"
    default_size: int = 224


KERAS = Source(keras_names, "keras")
BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(ResNet50, {"keras": KERAS, "torchvision": Source(_resnet50_torchvision, "torchvision")}),
    "mobilenet_v2": Backbone(MobileNetV2, {"keras": KERAS,
                                           "torchvision": Source(_mobilenet_v2_torchvision, "torchvision")}),
    "efficientnet_b0": Backbone(EfficientNetB0, {"keras": KERAS,
                                                 "torchvision": Source(_efficientnet_b0_torchvision, "torchvision")}),
    "resnet18": Backbone(ResNet18, {"torchvision": Source(_resnet18_torchvision)}, head="fc"),
}

# preset -> (input shape, classes, parameter count, where it is published): the count is `summary()`'s total (Keras
# counts batch-norm moving statistics), or its trainable count where the source counts parameters only.
PUBLISHED: dict[str, tuple[tuple[int, ...], int, int, str, str]] = {
    "resnet50": ((224, 224, 3), 1000, 25_636_712, "Total", "keras.applications.ResNet50().summary()"),
    "mobilenet_v2": ((224, 224, 3), 1000, 3_538_984, "Total", "keras.applications.MobileNetV2().summary()"),
    "efficientnet_b0": ((224, 224, 3), 1000, 5_330_571, "Total", "keras.applications.EfficientNetB0().summary()"),
    "resnet18": ((224, 224, 3), 1000, 11_689_512, "Trainable", "torchvision.models.resnet18(): sum of parameters()"),
    "resnet50(style='torchvision')": ((224, 224, 3), 1000, 25_557_032, "Trainable",
                                      "torchvision.models.resnet50(): sum of parameters()"),
    "mobilenet_v2(style='torchvision')": ((224, 224, 3), 1000, 3_504_872, "Trainable",
                                          "torchvision.models.mobilenet_v2(): sum of parameters()"),
    "efficientnet_b0(style='torchvision')": ((224, 224, 3), 1000, 5_288_548, "Trainable",
                                             "torchvision.models.efficientnet_b0(): sum of parameters()"),
}


def fields(name: str) -> list[dataclasses.Field]:
    """The overrides a backbone takes: its module's fields but num_classes, parent and name."""
    return [f for f in dataclasses.fields(BACKBONES[name].module)
            if f.init and f.name not in ("num_classes", "parent", "name")]


def signature(name: str) -> str:
    """How the preset is written with its overrides, e.g. 'mobilenet_v2(alpha=1.0)'."""
    return f"{name}(" + ", ".join(f"{f.name}={f.default!r}" for f in fields(name)) + ")"


# The input scaling (data.preprocessing) each Keras application's weights were trained with; EfficientNetB0 scales
# its inputs itself. Weights from torchvision (and timm) expect 'torch'.
KERAS_PREPROCESSING: dict[str, str | None] = {"resnet50": "caffe", "mobilenet_v2": "tf", "efficientnet_b0": None}


def preprocessing(name: str, layout: str) -> str | None:
    """The data.preprocessing mode a backbone's weights from a file of `layout` (weights.read's) expect."""
    if layout in ("legacy", "keras3"):
        return KERAS_PREPROCESSING.get(name)
    return "torch"
