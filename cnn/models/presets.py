"""Named architectures that expand to layer specs, so `Sequential` stays the one model.

A config names one in `model.preset`, alone or with keyword overrides written
as a call and parsed like a layer spec (never run):

    config.model.preset = "resnet20"
    config.model.preset = "vgg(widths=(32, 64, 128), depths=(2, 2, 2))"

The ImageNet architectures (`resnet50`, `mobilenet_v2`, `efficientnet_b0`,
`resnet18`) are Flax modules instead (cnn/models/backbones.py): the same
name and overrides build the module, which can also load a weight file
(cnn/models/weights.py).

Each preset's default reproduces the parameter count of its paper or reference
implementation (tests/test_presets.py checks them); `PUBLISHED` holds those
figures and where they come from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn

from cnn import spec as spec_lib
from cnn.errors import ConfigError, int_tuple
import cnn.models.backbones as backbones
from cnn.models.backbones import BACKBONES


def flax_cnn(num_classes: int, widths: Sequence[int] = (32, 64), dense: int = 256) -> list[str]:
    """The CNN of Flax's MNIST example: (conv 3x3 + relu, average pool 2) per width, dense, output."""
    convs = [spec for w in int_tuple(widths, "widths")
             for spec in (f"Conv2D({w}, 3, activation='relu', padding='same')", "AveragePooling2D(2)")]
    return [*convs, "Flatten()", f"Dense({dense}, activation='relu')", f"Dense({num_classes})"]


def keras_seed(num_classes: int, widths: Sequence[int] = (32,), dense: int = 128) -> list[str]:
    """The Keras seed model: (Conv2D 3x3 relu, MaxPooling2D 2x2) per width, Dense(128, relu), softmax."""
    convs = [spec for w in int_tuple(widths, "widths")
             for spec in (f"Conv2D({w}, (3, 3), activation='relu', padding='valid')", "MaxPooling2D((2, 2))")]
    return [*convs, "Flatten()", f"Dense({dense}, activation='relu')", f"Dense({num_classes}, activation='softmax')"]


def keras_seed_binary(num_classes: int = 2, widths: Sequence[int] = (32,), dense: int = 128) -> list[str]:
    """The Keras seed model with one sigmoid unit, for two-class sets and binary cross-entropy."""
    if num_classes != 2:
        raise ConfigError(f"keras_seed_binary has one sigmoid output, for two classes, not {num_classes}; "
                          "use 'keras_seed' for more")
    return [*keras_seed(2, widths, dense)[:-1], "Dense(1, activation='sigmoid')"]


def lenet5(num_classes: int, padding: str = "same") -> list[str]:
    """LeNet-5 (LeCun et al. 1998) as it is usually rebuilt today.

    C1 6@5x5, S2 average pool, C3 16@5x5, S4 average pool, C5 120@5x5, F6 84,
    tanh throughout. The paper's C1 sees 32x32 inputs; padding='same' gives a
    28x28 digit the same 28x28 C1 maps. Differences from the paper: C3 sees
    all six S2 maps (not the paper's connection table), pooling has no
    trainable coefficient, and the output is Dense + softmax, not RBF units.
    """
    return [f"Conv2D(6, 5, activation='tanh', padding={padding!r})", "AveragePooling2D(2)",
            "Conv2D(16, 5, activation='tanh')", "AveragePooling2D(2)", "Conv2D(120, 5, activation='tanh')",
            "Flatten()", "Dense(84, activation='tanh')", f"Dense({num_classes})"]


def vgg(num_classes: int, widths: Sequence[int] = (64, 128, 256, 512, 512), depths: Sequence[int] = (2, 2, 3, 3, 3),
        batch_norm: bool = True, dense: Sequence[int] = ()) -> list[str]:
    """A VGG-style net (Simonyan & Zisserman 2015): stages of 3x3 convs, each stage ending in a 2x2 max pool.

    The default is VGG-16 for 32x32 inputs as CIFAR code writes it (conv + BN +
    relu, one linear layer on the 1x1x512 output); `dense` adds hidden layers.
    """
    widths, depths = int_tuple(widths, "widths"), int_tuple(depths, "depths")
    if len(widths) != len(depths):
        raise ConfigError(f"widths={widths!r} and depths={depths!r} must have one entry per stage each")
    out = []
    for width, depth in zip(widths, depths):
        for _ in range(depth):
            if batch_norm:
                out += [f"Conv2D({width}, 3, padding='same')", "BatchNormalization(momentum=0.9, epsilon=1e-05)",
                        "Activation('relu')"]
            else:
                out.append(f"Conv2D({width}, 3, activation='relu', padding='same')")
        out.append("MaxPooling2D(2)")
    out.append("Flatten()")
    out += [f"Dense({units}, activation='relu')" for units in (int_tuple(dense, "dense") if dense else ())]
    return [*out, f"Dense({num_classes})"]


def resnet20(num_classes: int, widths: Sequence[int] = (16, 32, 64), depths: Sequence[int] = (3, 3, 3),
             shortcut: str = "pad") -> list[str]:
    """ResNet-20 for 32x32 inputs (He et al. 2016, section 4.2): 6n+2 layers with n = 3.

    A 3x3 conv stem, three stages of `depths` residual blocks whose first block
    (after the first stage) halves the size, global average pooling and a
    linear output. depths=(5, 5, 5) gives ResNet-32, (9, 9, 9) ResNet-56.
    """
    widths, depths = int_tuple(widths, "widths"), int_tuple(depths, "depths")
    if len(widths) != len(depths):
        raise ConfigError(f"widths={widths!r} and depths={depths!r} must have one entry per stage each")
    out = [f"Conv2D({widths[0]}, 3, padding='same', use_bias=False)",
           "BatchNormalization(momentum=0.9, epsilon=1e-05)", "Activation('relu')"]
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for block in range(depth):
            strides = 2 if stage > 0 and block == 0 else 1
            out.append(f"ResidualBlock({width}, strides={strides}, shortcut={shortcut!r})")
    return [*out, "GlobalAveragePooling2D()", f"Dense({num_classes})"]


def fcn(num_classes: int, filters: Sequence[int] = (128, 256, 128), kernel_sizes: Sequence[int] = (8, 5, 3)
        ) -> list[str]:
    """The fully convolutional network for time series of Wang, Yan & Oates (2017).

    One block per filter count: Conv1D (padding 'same') + batch norm + relu;
    then global average pooling over time and a linear output, so it takes
    series of any length and channel count.
    """
    filters, kernel_sizes = int_tuple(filters, "filters"), int_tuple(kernel_sizes, "kernel_sizes")
    if len(filters) != len(kernel_sizes):
        raise ConfigError(f"filters={filters!r} and kernel_sizes={kernel_sizes!r} must have one entry per block each")
    out = []
    for width, size in zip(filters, kernel_sizes):
        out += [f"Conv1D({width}, {size}, padding='same')", "BatchNormalization(momentum=0.9)", "Activation('relu')"]
    return [*out, "GlobalAveragePooling1D()", f"Dense({num_classes})"]


PRESETS: dict[str, Callable[..., list[str]]] = {
    "flax_cnn": flax_cnn,
    "keras_seed": keras_seed,
    "keras_seed_binary": keras_seed_binary,
    "lenet5": lenet5,
    "vgg": vgg,
    "resnet20": resnet20,
    "fcn": fcn,
}

# (input shape, classes, parameter count, where the count is published): each
# default preset, built for that input, has exactly this many parameters
# (trainable ones: batch-norm running averages are not parameters in papers).
PUBLISHED: dict[str, tuple[tuple[int, ...], int, int, str]] = {
    "flax_cnn": ((28, 28, 1), 10, 824_458, "Flax examples/mnist CNN"),
    "keras_seed": ((64, 64, 3), 10, 3_938_570, "Keras model.summary() of the seed model"),
    "keras_seed_binary": ((64, 64, 3), 2, 3_937_409, "Keras model.summary() of the binary seed model"),
    "lenet5": ((28, 28, 1), 10, 61_706, "LeNet-5 with full C3 and a dense output, as rebuilt in Keras/PyTorch "
                                        "tutorials; the paper's own net has 60,000 before its 840-weight RBF output"),
    "vgg": ((32, 32, 3), 10, 14_728_266, "VGG-16 for CIFAR-10 in kuangliu/pytorch-cifar (conv+BN, one linear)"),
    "resnet20": ((32, 32, 3), 10, 269_722, "He et al. 2016 table 6: 0.27M; akamaster/pytorch_resnet_cifar10: "
                                           "269,722"),
}


def parse(preset: str, field: str = "model.preset") -> tuple[str, dict]:
    """Splits 'vgg(widths=(32, 64))' into ('vgg', {'widths': (32, 64)}); a bare name has no overrides."""
    example = "a name, or a call with literal keyword arguments such as \"vgg(widths=(32, 64), depths=(2, 2))\""
    name, args, kwargs = spec_lib.parse_call(preset, field, "preset", example, bare_name=True)
    spec_lib.lookup(name, {**PRESETS, **BACKBONES}, field, preset, "preset")
    if args:
        raise ConfigError(f"{field}={preset!r}: give overrides by keyword; {name} takes {signature(name)}")
    if name in BACKBONES:
        unknown = sorted(set(kwargs) - {f.name for f in backbones.fields(name)})
        if unknown:
            raise ConfigError(f"{field}={preset!r}: {name} has no override {unknown[0]!r}; it takes {signature(name)}")
        return name, {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    spec_lib.bind(PRESETS[name], [1], kwargs, field, preset, name, signature(name))
    return name, kwargs


def signature(name: str) -> str:
    """The overrides a preset takes, e.g. 'resnet20(widths=(16, 32, 64), depths=(3, 3, 3), shortcut='pad')'."""
    if name in BACKBONES:
        return backbones.signature(name)
    return spec_lib.signature(name, PRESETS[name], skip=1)


def is_module(preset: str, field: str = "model.preset") -> bool:
    """Whether `preset` names a backbone module rather than a Sequential's specs."""
    return parse(preset, field)[0] in BACKBONES


def module(preset: str, num_classes: int | None, field: str = "model.preset") -> nn.Module:
    """The backbone module `preset` names, with `num_classes` outputs and its overrides."""
    name, kwargs = parse(preset, field)
    if num_classes is None:
        raise ConfigError(f"{field}={preset!r} needs the number of classes for its output layer; set "
                          "model.num_classes to the dataset's class count")
    return BACKBONES[name].module(num_classes=num_classes, **kwargs)


def expand(preset: str, num_classes: int | None, field: str = "model.preset") -> tuple[str, ...]:
    """The layer specs of `preset` with an output layer for `num_classes` classes."""
    name, kwargs = parse(preset, field)
    if name in BACKBONES:
        raise ConfigError(f"{field}={preset!r} is a Flax module (cnn/models/backbones.py), not layer specs; build "
                          "it with cnn.models.build_model")
    if num_classes is None:
        raise ConfigError(f"{field}={preset!r} needs the number of classes for its output layer; set "
                          "model.num_classes to the dataset's class count")
    try:
        return tuple(PRESETS[name](num_classes, **kwargs))
    except ConfigError as e:
        raise ConfigError(f"{field}={preset!r}: {e}") from None
