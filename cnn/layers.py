"""The layers a config can name, and the parser for layer specs.

A layer spec is a Python call written as a string, the way a Keras user
writes the layer:

    "Conv2D(32, 3, activation='relu', padding='valid')"

Arguments must be literals: the string is parsed with `ast`, never run.
Names, arguments and defaults follow Keras, so a Keras model translates line
by line. Every layer is a Linen module called as `layer(x, train)`, so a model
is a plain loop over them (see models.py).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn.config import ConfigError

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


class ShapeError(ConfigError):
    """A layer does not fit the shape of its input."""


def _activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
    return ACTIVATIONS[name or "linear"]


def _spatial(x: jax.Array, rank: int, layer: str) -> None:
    """Checks that `x` is (batch, *spatial[rank], channels)."""
    if x.ndim != rank + 2:
        want = {1: "(length, channels)", 2: "(height, width, channels)"}[rank]
        if x.ndim in (3, 4):
            hint = f"use the {x.ndim - 2}D version of the layer for this input"
        else:
            hint = "move it before Flatten() and the Dense layers"
        raise ShapeError(f"{layer} needs inputs shaped {want} but got {format_shape(x.shape)}; {hint}")


def format_shape(shape: tuple[int, ...]) -> str:
    """Writes a batched shape the way Keras does: (None, 28, 28, 1)."""
    return "(" + ", ".join(["None", *map(str, shape[1:])]) + ")"


def _window_out(size: int, window: int, stride: int, padding: str) -> int:
    return math.ceil(size / stride) if padding == "SAME" else (size - window) // stride + 1


def _check_windows(x: jax.Array, window: tuple[int, ...], strides: tuple[int, ...], padding: str, layer: str) -> None:
    spatial = x.shape[1:-1]
    for size, w, s in zip(spatial, window, strides):
        if _window_out(size, w, s, padding) < 1:
            raise ShapeError(f"{layer} has a window of {window} but its input is only {format_shape(x.shape)}; "
                             "use a smaller kernel or pool size, padding='same', or fewer pooling layers before it")


def _taps(x: jax.Array, window, strides, pads) -> list[jax.Array]:
    """The window's taps of a one-channel input: per window offset, the pixels it sees at each output position."""
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], window, strides)]
    return [x[(slice(None), *(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offset, out, strides)))]
            for offset in itertools.product(*map(range, window))]


def _patch_matrix(x: jax.Array, window, strides, pads) -> jax.Array:
    """A one-channel input's patches, (N, *out, taps)."""
    return jnp.concatenate(_taps(x, window, strides, pads), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _patches_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, window, strides, pads, precision) -> jax.Array:
    """A one-channel convolution plus bias: patches (N, *out, taps) times kernel (taps, features), plus bias."""
    return jnp.dot(_patch_matrix(x, window, strides, pads), kernel, precision=precision) + bias


def _patches_conv_fwd(x, kernel, bias, window, strides, pads, precision):
    return _patches_conv(x, kernel, bias, window, strides, pads, precision), (x, kernel)


def _patches_conv_bwd(window, strides, pads, precision, residuals, g):
    """Kernel and bias gradients from one product, (taps + a row of ones, positions) @ (positions, features).

    Left to autodiff, XLA:CPU transposes the output gradient (the layer's
    largest array) to contract it with the patches, and sums it for the bias
    in a separate reduction that runs as a serial loop per channel. Stacking
    the taps tap-major, plus a row of ones whose product is the bias
    gradient, reads the output gradient once, in a matrix product. Measured
    on the classic MNIST CNN's training step: 8% faster on one core, 5% on
    two (experiments/benchmark.py throughput).
    """
    x, kernel = residuals
    taps = [t.reshape(-1) for t in _taps(x, window, strides, pads)]
    taps = jnp.stack([*taps, jnp.ones_like(taps[0])])
    d_kernel_and_bias = jnp.dot(taps, g.reshape(-1, g.shape[-1]), precision=precision)
    _, patches_vjp = jax.vjp(lambda x: _patch_matrix(x, window, strides, pads), x)
    d_x, = patches_vjp(jnp.dot(g, kernel.T, precision=precision))
    return d_x, d_kernel_and_bias[:-1], d_kernel_and_bias[-1]


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


class Conv(nn.Conv):
    """nn.Conv plus a fused activation, with the window checked against the input.

    On a CPU, one-channel inputs (a grayscale image's first layer) take
    `_patches_conv`, with the same parameters as nn.Conv: XLA's convolution
    runs at a few GFLOP/s there, since it contracts over only the window's
    taps, while gathering the taps into patches and multiplying them by the
    kernel as one matrix doubles the layer's forward speed.
    """

    activation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rank = len(self.kernel_size)
        name = f"Conv{rank}D"
        _spatial(x, rank, name)
        _check_windows(x, self.kernel_size, self.strides, self.padding, name)
        plain = (self.feature_group_count == 1 and self.shared_weights and self.mask is None
                 and isinstance(self.padding, str) and isinstance(self.strides, tuple)
                 and all(d in (None, 1) for d in (self.input_dilation, self.kernel_dilation)))
        if jax.default_backend() == "cpu" and x.shape[-1] == 1 and plain:
            y = self._patches(x)
        else:
            y = super().__call__(x)
        return _activation(self.activation)(y)

    def _patches(self, x: jax.Array) -> jax.Array:
        """nn.Conv's computation and parameters (same names, shapes and initial values) via `_patches_conv`."""
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if bias is None:
            bias = jnp.zeros((self.features,), kernel.dtype)  # adding zeros compiles away
        pads = lax.padtype_to_pads(x.shape[1:-1], self.kernel_size, self.strides, self.padding)
        return _patches_conv(x, kernel.reshape(-1, self.features), bias, tuple(self.kernel_size),
                             tuple(self.strides), tuple(map(tuple, pads)), self.precision)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
    """`lax.dot_general`, except that a Dense layer's inputs times kernel on a CPU take `_matmul`."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (jax.default_backend() == "cpu" and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
            and tuple(rhs_contract) == (0,) and batch == ((), ()) and preferred_element_type is None):
        return _matmul(lhs, rhs, precision)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    return jnp.dot(x, kernel, precision=precision)


def _matmul_fwd(x, kernel, precision):
    return _matmul(x, kernel, precision), (x, kernel)


def _matmul_bwd(precision, residuals, g):
    """The input's gradient as g times an explicitly transposed kernel.

    Autodiff contracts g with the kernel's second axis in place, which
    XLA:CPU runs 1.1-2x slower than a product with a row-major operand;
    transposing the kernel first costs a small fraction of the product (the
    barrier keeps XLA from folding the transpose back in). The classic MNIST
    CNN's training step gets about 4% faster, on one core and on two.
    """
    x, kernel = residuals
    d_x = jnp.dot(g, lax.optimization_barrier(kernel.T), precision=precision)
    rows = lambda a: a.reshape(-1, a.shape[-1])
    return d_x, jnp.dot(rows(x).T, rows(g), precision=precision)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Dense(nn.Dense):
    activation: str | None = None
    dot_general: Callable[..., jax.Array] = dot_general

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _activation(self.activation)(super().__call__(x))


class Pool(nn.Module):
    kind: str  # 'max' or 'avg'
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        name = f"{'Max' if self.kind == 'max' else 'Average'}Pooling{len(self.window)}D"
        _spatial(x, len(self.window), name)
        _check_windows(x, self.window, self.strides, self.padding, name)
        if self.window == self.strides and (self.padding == "VALID" or all(
                size % w == 0 for size, w in zip(x.shape[1:-1], self.window))):
            return self._tiled(x)
        pool = nn.max_pool if self.kind == "max" else functools.partial(nn.avg_pool, count_include_pad=False)
        return pool(x, self.window, self.strides, self.padding)

    def _tiled(self, x: jax.Array) -> jax.Array:
        """Windows that tile the input (window == stride, the usual 2x2 pool) as a reshape and a reduction.

        Same result as reduce_window, but its backward pass is a broadcast
        instead of XLA's generic window scatter, which is slow on CPUs.
        """
        spatial = [size // w for size, w in zip(x.shape[1:-1], self.window)]
        x = x[(slice(None), *(slice(0, n * w) for n, w in zip(spatial, self.window)))]  # 'valid' drops the rest
        shape = [x.shape[0]]
        for n, w in zip(spatial, self.window):
            shape += [n, w]
        x = x.reshape(*shape, x.shape[-1])
        axes = tuple(range(2, 2 * len(spatial) + 1, 2))
        return x.max(axis=axes) if self.kind == "max" else x.mean(axis=axes)


class GlobalPool(nn.Module):
    kind: str  # 'max' or 'avg'
    rank: int

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _spatial(x, self.rank, f"Global{'Max' if self.kind == 'max' else 'Average'}Pooling{self.rank}D")
        axes = tuple(range(1, x.ndim - 1))
        return x.max(axis=axes) if self.kind == "max" else x.mean(axis=axes)


class Flatten(nn.Module):
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x.reshape(x.shape[0], -1)


class Activation(nn.Module):
    activation: str

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _activation(self.activation)(x)


class Dropout(nn.Dropout):
    """Active only while training; needs a 'dropout' rng then."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return super().__call__(x, deterministic=not train)


class BatchNorm(nn.BatchNorm):
    """Batch statistics while training, running averages otherwise."""

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return super().__call__(x, use_running_average=not train)


class Embedding(nn.Embed):
    """Token ids (batch, length) to vectors (batch, length, features), so Conv1D can read text.

    Ids arrive as float32 where the trainer builds the model from zeros, so
    they are cast to int32 here; ids up to 2**24 survive the round trip.
    """

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 2:
            raise ShapeError(f"Embedding needs token ids shaped (None, length) but got {format_shape(x.shape)}; "
                             "put it first, on a text dataset")
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
        if x.ndim != 4:
            raise ShapeError(f"ResidualBlock needs inputs shaped (height, width, channels) but got "
                             f"{format_shape(x.shape)}; it exists in 2D only, for images before Flatten()")
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(nn.Conv, self.filters, (3, 3), padding="SAME", use_bias=False)
        y = nn.relu(norm()(conv(strides=self.strides)(x)))
        y = norm()(conv()(y))
        if self.strides == 1 and x.shape[-1] == self.filters:
            shortcut = x
        elif self.shortcut == "conv":
            shortcut = norm()(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x))
        else:
            shortcut = x[:, ::self.strides, ::self.strides, :]
            extra = self.filters - x.shape[-1]
            if extra < 0:
                raise ShapeError(f"ResidualBlock({self.filters}) narrows {x.shape[-1]} channels, which "
                                 "shortcut='pad' cannot do; use shortcut='conv'")
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + shortcut)


# --- The registry: Keras-named constructors with Keras-style arguments. -----


def _tuple(value, rank: int, field: str) -> tuple[int, ...]:
    values = (value,) * rank if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(values, (tuple, list)) or len(values) != rank
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
        raise ConfigError(f"{field}={value!r} must be a positive integer or a tuple of {rank} positive integers")
    return tuple(values)


def _padding(value: str) -> str:
    if not isinstance(value, str) or value.upper() not in ("SAME", "VALID"):
        raise ConfigError(f"padding={value!r} must be 'valid' or 'same'")
    return value.upper()


def _activation_name(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
        raise ConfigError(f"activation={value!r} is unknown; known: {', '.join(ACTIVATIONS)}")
    return value


def _positive(value, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field}={value!r} must be a positive integer")
    return value


def _conv(rank: int):
    def make(filters: int, kernel_size, strides=1, padding: str = "valid", activation: str | None = None,
             use_bias: bool = True) -> nn.Module:
        return Conv(features=_positive(filters, "filters"), kernel_size=_tuple(kernel_size, rank, "kernel_size"),
                    strides=_tuple(strides, rank, "strides"), padding=_padding(padding),
                    activation=_activation_name(activation), use_bias=bool(use_bias))
    return make


def _pool(kind: str, rank: int):
    def make(pool_size=2, strides=None, padding: str = "valid") -> nn.Module:
        window = _tuple(pool_size, rank, "pool_size")
        return Pool(kind=kind, window=window, strides=window if strides is None else _tuple(strides, rank, "strides"),
                    padding=_padding(padding))
    return make


def _global_pool(kind: str, rank: int):
    def make() -> nn.Module:
        return GlobalPool(kind=kind, rank=rank)
    return make


def _dense(units: int, activation: str | None = None, use_bias: bool = True) -> nn.Module:
    return Dense(features=_positive(units, "units"), activation=_activation_name(activation), use_bias=bool(use_bias))


def _dropout(rate: float) -> nn.Module:
    if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ConfigError(f"rate={rate!r} must be a number in [0, 1)")
    return Dropout(rate=float(rate))


def _batch_norm(momentum: float = 0.99, epsilon: float = 1e-3) -> nn.Module:
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ConfigError(f"momentum={momentum!r} must be a number in [0, 1)")
    if not isinstance(epsilon, (int, float)) or epsilon <= 0:
        raise ConfigError(f"epsilon={epsilon!r} must be a positive number")
    return BatchNorm(momentum=float(momentum), epsilon=float(epsilon))


def _activation_layer(activation: str) -> nn.Module:
    return Activation(activation=_activation_name(activation))


def _flatten() -> nn.Module:
    return Flatten()


def _embedding(input_dim: int, output_dim: int) -> nn.Module:
    return Embedding(num_embeddings=_positive(input_dim, "input_dim"), features=_positive(output_dim, "output_dim"))


def _residual_block(filters: int, strides: int = 1, shortcut: str = "pad") -> nn.Module:
    if shortcut not in ("pad", "conv"):
        raise ConfigError(f"shortcut={shortcut!r} must be 'pad' (parameter-free, option A) or 'conv' (1x1, option B)")
    return ResidualBlock(filters=_positive(filters, "filters"), strides=_positive(strides, "strides"),
                         shortcut=shortcut)


LAYERS: dict[str, Callable[..., nn.Module]] = {
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


def signature(kind: str) -> str:
    """The call a spec of this layer type takes, e.g. 'Dense(units, activation=None, use_bias=True)'."""
    params = inspect.signature(LAYERS[kind]).parameters.values()
    return kind + "(" + ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params) + ")"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parsed spec: its text, its type name and the module it builds."""

    spec: str
    kind: str
    module: nn.Module

    @property
    def activation(self) -> str | None:
        return getattr(self.module, "activation", None)

    @property
    def name(self) -> str:
        """A Keras-like snake_case name, e.g. 'max_pooling2d'."""
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])", "_", self.kind).lower()


def parse(spec: str, field: str = "layer") -> Layer:
    """Parses one spec string into a `Layer`, or raises ConfigError naming `field`."""
    if not isinstance(spec, str):
        raise ConfigError(f"{field}={spec!r} must be a string such as \"Dense(10)\"")
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise SyntaxError
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError):
        raise ConfigError(f"{field}={spec!r} is not a layer spec: write a call with literal arguments, "
                          "such as \"Conv2D(32, 3, activation='relu')\"") from None
    kind = call.func.id
    if kind not in LAYERS:
        close = difflib.get_close_matches(kind, LAYERS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"{field}={spec!r}: unknown layer {kind!r}; {hint}known layers: {', '.join(LAYERS)}")
    make = LAYERS[kind]
    try:
        inspect.signature(make).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{field}={spec!r}: {e}; {kind} takes {signature(kind)}") from None
    try:
        module = make(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{field}={spec!r}: {e}") from None
    return Layer(spec=spec, kind=kind, module=module)


def split_output_activation(layers: list[Layer]) -> tuple[list[Layer], str | None]:
    """Takes a final softmax or sigmoid off the stack, so the model yields logits.

    Returns the layers with that activation removed and its name (or None).
    A final `Activation('softmax')` layer is dropped; a final
    `Dense(10, activation='softmax')` keeps its Dense and loses the activation.
    """
    if not layers or layers[-1].activation not in OUTPUT_ACTIVATIONS:
        return layers, None
    last = layers[-1]
    name = last.activation
    if isinstance(last.module, Activation):
        return layers[:-1], name
    stripped = dataclasses.replace(last, module=last.module.clone(activation=None))
    return [*layers[:-1], stripped], name


def parameter_count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
