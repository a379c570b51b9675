"""The layers a config can name, written the way a Keras user writes them.

    "Conv2D(32, 3, activation='relu', padding='valid')"

A spec is read by `cnn.spec.parse_call` (literals only, never run) and built
by the registry below into a `Layer`: a plain Flax module (nn.Conv, nn.Dense,
nn.BatchNorm, ...) or a stateless function, plus its activation and a check
of the input shape it needs. Names, arguments and defaults follow Keras, so a
Keras model translates line by line. How the modules are computed on a given
machine is cnn/kernels' business, not this file's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn import spec as spec_lib
from cnn.errors import ConfigError, ShapeError, int_at_least, int_tuple

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda x: x,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,
}
# Activations that turn logits into probabilities. On a model's last layer
# they are left to the loss (which is stabler on logits) and to prediction.
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")


def format_shape(shape: tuple[int, ...]) -> str:
    """Writes a batched shape the way Keras does: (None, 28, 28, 1)."""
    return "(" + ", ".join(["None", *map(str, shape[1:])]) + ")"


def parameter_count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


# --- Modules without a Flax counterpart ---------------------------------------


class Pool(nn.Module):
    """Max or average pooling over `window` (Flax's pools; average pools leave padding out, as Keras does)."""

    kind: str  # 'max' or 'avg'
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str

    def __call__(self, x: jax.Array) -> jax.Array:
        # By keyword: jax2onnx (cnn/inference/export.py) swaps in versions of these that take no other way.
        window = dict(window_shape=self.window, strides=self.strides, padding=self.padding)
        if self.kind == "max":
            return nn.max_pool(x, **window)
        return nn.avg_pool(x, **window, count_include_pad=False)


class Embedding(nn.Embed):
    """Token ids (batch, length) to vectors (batch, length, features), so Conv1D can read text.

    Ids arrive as float32 where a model is initialised from zeros, so they
    are cast to int32 here; ids up to 2**24 survive the round trip.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.int32))


class ResidualBlock(nn.Module):
    """He et al. (2016)'s basic block: conv-BN-relu-conv-BN plus a shortcut, then relu.

    The shortcut is the identity, or, where the block halves the size or
    widens the channels, either the paper's parameter-free option A (take
    every `strides`-th pixel and zero-pad the new channels; its CIFAR nets use
    this) or option B (a 1x1 convolution and BN). Batch norm uses PyTorch's
    defaults (momentum 0.9, epsilon 1e-5), as the reference implementations do.
    """

    filters: int
    strides: int = 1
    shortcut: str = "pad"  # 'pad' (option A) or 'conv' (option B)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, self.filters, (3, 3), padding="SAME", use_bias=False)
        strides = (self.strides, self.strides)
        y = nn.relu(norm()(conv(strides=strides)(x)))
        y = norm()(conv()(y))
        if self.strides == 1 and x.shape[-1] == self.filters:
            shortcut = x
        elif self.shortcut == "conv":
            shortcut = norm()(nn.Conv(self.filters, (1, 1), strides, use_bias=False)(x))
        else:
            # lax.slice, not x[:, ::s, ::s]: with a symbolic batch size (export) indexing becomes a gather,
            # which TFLite's converter refuses; a strided slice it takes.
            shortcut = jax.lax.slice(x, (0,) * 4, x.shape, (1, self.strides, self.strides, 1))
            extra = self.filters - x.shape[-1]
            if extra < 0:
                raise ShapeError(f"ResidualBlock({self.filters}) narrows {x.shape[-1]} channels, which "
                                 "shortcut='pad' cannot do; use shortcut='conv'")
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


# --- What a layer needs of its input -------------------------------------------


def _needs_rank(rank: int, layer: str, hint: str | None = None) -> Callable[[tuple[int, ...]], None]:
    """A check that the input is (batch, *spatial[rank], channels)."""
    def check(shape: tuple[int, ...]) -> None:
        if len(shape) == rank + 2:
            return
        want = {1: "(length, channels)", 2: "(height, width, channels)"}[rank]
        advice = hint or (f"use the {len(shape) - 2}D version of the layer for this input" if len(shape) in (3, 4)
                          else "move it before Flatten() and the Dense layers")
        raise ShapeError(f"{layer} needs inputs shaped {want} but got {format_shape(shape)}; {advice}")
    return check


def _needs_windows(window: tuple[int, ...], strides: tuple[int, ...], padding: str, layer: str
                   ) -> Callable[[tuple[int, ...]], None]:
    """A check of the rank, and that every window fits the input at least once."""
    rank = _needs_rank(len(window), layer)

    def check(shape: tuple[int, ...]) -> None:
        rank(shape)
        for size, w, s in zip(shape[1:-1], window, strides):
            out = math.ceil(size / s) if padding == "SAME" else (size - w) // s + 1
            if out < 1:
                raise ShapeError(f"{layer} has a window of {window} but its input is only {format_shape(shape)}; "
                                 "use a smaller kernel or pool size, padding='same', or fewer pooling layers before it")
    return check


def _needs_ids(shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise ShapeError(f"Embedding needs token ids shaped (None, length) but got {format_shape(shape)}; "
                         "put it first, on a text dataset")


# --- The registry: Keras-named constructors with Keras-style arguments. -----


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parsed spec: a Flax `module` (or a stateless `fn`), then `activation`.

    `train_arg` names the keyword through which the module learns whether it
    is training ('deterministic' and 'use_running_average' take the
    opposite); `check` raises a ShapeError if an input shape does not fit.
    """

    spec: str
    kind: str
    module: nn.Module | None = None
    fn: Callable[[jax.Array], jax.Array] | None = None
    activation: str | None = None
    train_arg: str | None = None
    check: Callable[[tuple[int, ...]], None] | None = None

    @property
    def name(self) -> str:
        """A Keras-like snake_case name, e.g. 'max_pooling2d'."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])", "_", self.kind).lower()

    def __call__(self, module: nn.Module | None, x: jax.Array, train: bool) -> jax.Array:
        """Applies the layer to `x`; `module` is `self.module` bound into the model (None for `fn` layers)."""
        if self.check:
            self.check(x.shape)
        if module is None:
            y = self.fn(x)
        elif self.train_arg is None:
            y = module(x)
        else:
            y = module(x, **{self.train_arg: train if self.train_arg == "train" else not train})
        return ACTIVATIONS[self.activation or "linear"](y)


def _padding(value: str) -> str:
    if not isinstance(value, str) or value.upper() not in ("SAME", "VALID"):
        raise ConfigError(f"padding={value!r} is not valid: expected 'valid' or 'same'")
    return value.upper()


def _activation_name(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
        raise ConfigError(f"activation={value!r} is unknown; known: {', '.join(ACTIVATIONS)}")
    return value


def _fraction(value, field: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"{field}={value!r} is not valid: expected a number in [0, 1)")
    return float(value)


def _conv(rank: int):
    def make(filters: int, kernel_size, strides=1, padding: str = "valid", activation: str | None = None,
             use_bias: bool = True) -> dict:
        window, step = int_tuple(kernel_size, "kernel_size", rank), int_tuple(strides, "strides", rank)
        pad = _padding(padding)
        return dict(module=nn.Conv(int_at_least(filters, "filters"), window, step, pad, use_bias=bool(use_bias)),
                    activation=_activation_name(activation), check=_needs_windows(window, step, pad, f"Conv{rank}D"))
    return make


def _pool(kind: str, rank: int):
    def make(pool_size=2, strides=None, padding: str = "valid") -> dict:
        window = int_tuple(pool_size, "pool_size", rank)
        step = window if strides is None else int_tuple(strides, "strides", rank)
        pad = _padding(padding)
        name = f"{'Max' if kind == 'max' else 'Average'}Pooling{rank}D"
        return dict(module=Pool(kind=kind, window=window, strides=step, padding=pad),
                    check=_needs_windows(window, step, pad, name))
    return make


def _global_pool(kind: str, rank: int):
    def make() -> dict:
        reduce = jnp.max if kind == "max" else jnp.mean
        name = f"Global{'Max' if kind == 'max' else 'Average'}Pooling{rank}D"
        return dict(fn=lambda x: reduce(x, axis=tuple(range(1, x.ndim - 1))), check=_needs_rank(rank, name))
    return make


def _dense(units: int, activation: str | None = None, use_bias: bool = True) -> dict:
    return dict(module=nn.Dense(int_at_least(units, "units"), use_bias=bool(use_bias)),
                activation=_activation_name(activation))


def _dropout(rate: float) -> dict:
    return dict(module=nn.Dropout(rate=_fraction(rate, "rate")), train_arg="deterministic")


def _batch_norm(momentum: float = 0.99, epsilon: float = 1e-3) -> dict:
    if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon <= 0:
        raise ConfigError(f"epsilon={epsilon!r} is not valid: expected a positive number")
    return dict(module=nn.BatchNorm(momentum=_fraction(momentum, "momentum"), epsilon=float(epsilon)),
                train_arg="use_running_average")


def _activation_layer(activation: str) -> dict:
    return dict(fn=lambda x: x, activation=_activation_name(activation))


def _flatten() -> dict:
    return dict(fn=lambda x: x.reshape(x.shape[0], -1))


def _embedding(input_dim: int, output_dim: int) -> dict:
    return dict(module=Embedding(num_embeddings=int_at_least(input_dim, "input_dim"),
                                 features=int_at_least(output_dim, "output_dim")), check=_needs_ids)


def _residual_block(filters: int, strides: int = 1, shortcut: str = "pad") -> dict:
    if shortcut not in ("pad", "conv"):
        raise ConfigError(f"shortcut={shortcut!r} is not valid: expected 'pad' (parameter-free, option A) or "
                          "'conv' (1x1, option B)")
    block = ResidualBlock(filters=int_at_least(filters, "filters"), strides=int_at_least(strides, "strides"),
                          shortcut=shortcut)
    return dict(module=block, train_arg="train",
                check=_needs_rank(2, "ResidualBlock", "it exists in 2D only, for images before Flatten()"))


LAYERS: dict[str, Callable[..., dict]] = {
    "Conv1D": _conv(1),
    "Conv2D": _conv(2),
    "MaxPooling1D": _pool("max", 1),
    "MaxPooling2D": _pool("max", 2),
    "AveragePooling1D": _pool("avg", 1),
    "AveragePooling2D": _pool("avg", 2),
    "GlobalAveragePooling1D": _global_pool("avg", 1),
    "GlobalAveragePooling2D": _global_pool("avg", 2),
    "GlobalMaxPooling1D": _global_pool("max", 1),
    "GlobalMaxPooling2D": _global_pool("max", 2),
    "Flatten": _flatten,
    "Dense": _dense,
    "Dropout": _dropout,
    "BatchNormalization": _batch_norm,
    "Activation": _activation_layer,
    "Embedding": _embedding,
    "ResidualBlock": _residual_block,
}


def parse(spec: str, field: str = "layer") -> Layer:
    """Parses one spec string into a `Layer`, or raises ConfigError naming `field`."""
    kind, args, kwargs = spec_lib.parse_call(spec, field, "layer spec",
                                             "a call with literal arguments, such as \"Conv2D(32, 3, activation='relu')\"")
    make = spec_lib.lookup(kind, LAYERS, field, spec, "layer")
    spec_lib.bind(make, args, kwargs, field, spec, kind, spec_lib.signature(kind, make))
    try:
        return Layer(spec=spec, kind=kind, **make(*args, **kwargs))
    except ConfigError as e:
        raise ConfigError(f"{field}={spec!r}: {e}") from None


def split_output_activation(layers: list[Layer]) -> tuple[list[Layer], str | None]:
    """Takes a final softmax or sigmoid off the stack, so the model yields logits; returns the layers and its name."""
    if not layers or layers[-1].activation not in OUTPUT_ACTIVATIONS:
        return layers, None
    return [*layers[:-1], dataclasses.replace(layers[-1], activation=None)], layers[-1].activation
