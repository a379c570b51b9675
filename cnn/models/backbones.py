"""ImageNet architectures as plain Flax modules, for `model.preset` and `cnn.models.pretrained`.

Each module rebuilds a reference implementation layer for layer, and names
its layers as that reference does, so a weight file's tensors find their
place by name (cnn/models/weights.py): `resnet50`, `mobilenet_v2` and
`efficientnet_b0` are `keras.applications`' ResNet50, MobileNetV2 and
EfficientNetB0 (layer names, paddings, epsilons, parameter counts);
`resnet18` is torchvision's ResNet-18. Each is called as
`Name(num_classes=N, **overrides)` and returns logits, so cnn trains it as
it trains your own module (cnn/models/module.py).

Adding an architecture is one module here plus one entry in `BACKBONES`
naming it and, per weight source, the function that turns the module's
layer names into the file's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.errors import ShapeError


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


def _conv(x, filters: int, kernel: int, stride: int = 1, padding="VALID", use_bias: bool = True, name=None,
          groups: int = 1):
    return nn.Conv(filters, (kernel, kernel), (stride, stride), padding=padding, use_bias=use_bias,
                   feature_group_count=groups, name=name)(x)


def _bn(x, train: bool, name: str, epsilon: float = 1e-3, momentum: float = 0.99):
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, name=name)(x)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Keras' _make_divisible for MobileNetV2 widths: the nearest multiple of `divisor`, at most 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ResNet50(nn.Module):
    """keras.applications.ResNet50 (He et al. 2016, v1 with biases in every convolution): 25,636,712 weights."""

    num_classes: int = 1000
    PRESET: ClassVar[str] = "resnet50"
    MIN_SIZE: ClassVar[int] = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        bn = lambda x, name: _bn(x, train, name, epsilon=1.001e-5)
        x = _conv(_pad(x, ((3, 3), (3, 3))), 64, 7, 2, name="conv1_conv")
        x = nn.relu(bn(x, "conv1_bn"))
        x = nn.max_pool(_pad(x, ((1, 1), (1, 1))), (3, 3), (2, 2))
        for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            for block in range(blocks):
                name = f"conv{stage + 2}_block{block + 1}"
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = x
                if block == 0:
                    shortcut = bn(_conv(x, 4 * filters, 1, stride, name=f"{name}_0_conv"), f"{name}_0_bn")
                y = nn.relu(bn(_conv(x, filters, 1, stride, name=f"{name}_1_conv"), f"{name}_1_bn"))
                y = nn.relu(bn(_conv(y, filters, 3, padding="SAME", name=f"{name}_2_conv"), f"{name}_2_bn"))
                y = bn(_conv(y, 4 * filters, 1, name=f"{name}_3_conv"), f"{name}_3_bn")
                x = nn.relu(shortcut + y)
        return nn.Dense(self.num_classes, name="predictions")(x.mean(axis=(1, 2)))


class MobileNetV2(nn.Module):
    """keras.applications.MobileNetV2 (Sandler et al. 2018) with width multiplier `alpha`: 3,538,984 weights at
    alpha=1."""

    num_classes: int = 1000
    alpha: float = 1.0
    PRESET: ClassVar[str] = "mobilenet_v2"
    MIN_SIZE: ClassVar[int] = 32
    # (filters, stride, expansion) of blocks 0..16
    BLOCKS: ClassVar[tuple] = ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6), (64, 2, 6),
                               (64, 1, 6), (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6), (160, 2, 6),
                               (160, 1, 6), (160, 1, 6), (320, 1, 6))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        bn = lambda x, name: _bn(x, train, name, epsilon=1e-3, momentum=0.999)
        relu6 = lambda x: jnp.clip(x, 0.0, 6.0)
        x = _conv(x, _make_divisible(32 * self.alpha), 3, 2, padding="SAME", use_bias=False, name="Conv1")
        x = relu6(bn(x, "bn_Conv1"))
        for block, (filters, stride, expansion) in enumerate(self.BLOCKS):
            inputs, channels = x, x.shape[-1]
            out = _make_divisible(int(filters * self.alpha))
            prefix = f"block_{block}_" if block else "expanded_conv_"
            if block:
                x = relu6(bn(_conv(x, expansion * channels, 1, use_bias=False, name=f"{prefix}expand"),
                             f"{prefix}expand_BN"))
            if stride == 2:
                x = _pad(x, _correct_pad(x, 3))
            x = _conv(x, x.shape[-1], 3, stride, padding="SAME" if stride == 1 else "VALID", use_bias=False,
                      groups=x.shape[-1], name=f"{prefix}depthwise")
            x = relu6(bn(x, f"{prefix}depthwise_BN"))
            x = bn(_conv(x, out, 1, use_bias=False, name=f"{prefix}project"), f"{prefix}project_BN")
            if channels == out and stride == 1:
                x = inputs + x
        last = _make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
        x = relu6(bn(_conv(x, last, 1, use_bias=False, name="Conv_1"), "Conv_1_bn"))
        return nn.Dense(self.num_classes, name="predictions")(x.mean(axis=(1, 2)))


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
    Keras' ImageNet weight file.
    """

    num_classes: int = 1000
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    imagenet_rescaling: bool = False
    PRESET: ClassVar[str] = "efficientnet_b0"
    MIN_SIZE: ClassVar[int] = 32
    # (kernel, repeats, filters in, filters out, expansion, stride) per stage; every block has SE ratio 0.25
    STAGES: ClassVar[tuple] = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
                               (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
    STDDEV: ClassVar[tuple] = (0.229, 0.224, 0.225)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _check_size(x, self)
        x = Normalization(name="normalization")(x / 255.0)
        if self.imagenet_rescaling:
            x = x / jnp.sqrt(jnp.asarray(self.STDDEV))
        x = _conv(_pad(x, _correct_pad(x, 3)), 32, 3, 2, use_bias=False, name="stem_conv")
        x = nn.swish(_bn(x, train, "stem_bn"))
        total, b = sum(stage[1] for stage in self.STAGES), 0
        for i, (kernel, repeats, filters_in, filters_out, expansion, stride) in enumerate(self.STAGES):
            for j in range(repeats):
                x = self._block(x, train, self.drop_connect_rate * b / total, f"block{i + 1}{chr(j + 97)}_",
                                filters_in if j == 0 else filters_out, filters_out, kernel,
                                stride if j == 0 else 1, expansion)
                b += 1
        x = nn.swish(_bn(_conv(x, 1280, 1, use_bias=False, name="top_conv"), train, "top_bn"))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="top_dropout")(x.mean(axis=(1, 2)))
        return nn.Dense(self.num_classes, name="predictions")(x)

    def _block(self, inputs, train, drop_rate, name, filters_in, filters_out, kernel, stride, expansion):
        """Keras' efficientnet.block: expand, depthwise, squeeze-and-excite, project, dropped-path residual."""
        filters, x = filters_in * expansion, inputs
        if expansion != 1:
            x = nn.swish(_bn(_conv(x, filters, 1, use_bias=False, name=f"{name}expand_conv"), train,
                             f"{name}expand_bn"))
        if stride == 2:
            x = _pad(x, _correct_pad(x, kernel))
        x = _conv(x, filters, kernel, stride, padding="SAME" if stride == 1 else "VALID", use_bias=False,
                  groups=filters, name=f"{name}dwconv")
        x = nn.swish(_bn(x, train, f"{name}bn"))
        se = x.mean(axis=(1, 2), keepdims=True)
        se = nn.swish(_conv(se, max(1, int(filters_in * 0.25)), 1, name=f"{name}se_reduce"))
        x = x * nn.sigmoid(_conv(se, filters, 1, name=f"{name}se_expand"))
        x = _bn(_conv(x, filters_out, 1, use_bias=False, name=f"{name}project_conv"), train, f"{name}project_bn")
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
        bn = lambda x, name: _bn(x, train, name, epsilon=1e-5, momentum=0.9)
        y = nn.relu(bn(_conv(x, self.filters, 3, self.stride, ((1, 1), (1, 1)), False, "conv1"), "bn1"))
        y = bn(_conv(y, self.filters, 3, 1, ((1, 1), (1, 1)), False, "conv2"), "bn2")
        if self.stride != 1 or x.shape[-1] != self.filters:
            x = bn(_conv(x, self.filters, 1, self.stride, use_bias=False, name="downsample_0"), "downsample_1")
        return nn.relu(x + y)


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
        x = nn.relu(_bn(x, train, "bn1", epsilon=1e-5, momentum=0.9))
        x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for stage, filters in enumerate((64, 128, 256, 512)):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(filters, stride, name=f"layer{stage + 1}_{block}")(x, train)
        return nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))


def keras_names(name: str) -> str:
    """Keras applications' layer names are the modules' own."""
    return name


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A named architecture: its module class, and per weight source the layer name in such a file of each of the
    module's layers (a source absent here is one cnn cannot read for it yet)."""

    module: type[nn.Module]
    sources: dict[str, Callable[[str], str]]
    default_size: int = 224


BACKBONES: dict[str, Backbone] = {
    "resnet50": Backbone(ResNet50, {"keras": keras_names}),
    "mobilenet_v2": Backbone(MobileNetV2, {"keras": keras_names}),
    "efficientnet_b0": Backbone(EfficientNetB0, {"keras": keras_names}),
    "resnet18": Backbone(ResNet18, {}),
}

# (input shape, classes, parameter count, where it is published): the count is `summary()`'s total (Keras
# counts batch-norm moving statistics), or its trainable count where the source counts parameters only.
PUBLISHED: dict[str, tuple[tuple[int, ...], int, int, str, str]] = {
    "resnet50": ((224, 224, 3), 1000, 25_636_712, "Total", "keras.applications.ResNet50().summary()"),
    "mobilenet_v2": ((224, 224, 3), 1000, 3_538_984, "Total", "keras.applications.MobileNetV2().summary()"),
    "efficientnet_b0": ((224, 224, 3), 1000, 5_330_571, "Total", "keras.applications.EfficientNetB0().summary()"),
    "resnet18": ((224, 224, 3), 1000, 11_689_512, "Trainable", "torchvision.models.resnet18(): sum of parameters()"),
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
