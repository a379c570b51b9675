"""The layers a config can name, written the way a Keras user writes them.

    "Conv2D(32, 3, activation='relu', padding='valid')"

A spec is read by `cnn.spec.parse_call` (literals and arithmetic on numbers,
never run) and built by the registry below into a `Layer`: a Flax module
(nn.Conv or its subclass Conv below, nn.ConvTranspose, nn.Dense, ...) or a stateless
function, plus its activation and a check of the input shape it needs. Names,
arguments and defaults follow Keras (channels last, Keras' weight layouts), so
a Keras model translates line by line; tests/test_keras_parity.py holds each
layer to Keras' outputs with the same weights. How the modules are computed on a given
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
from cnn.errors import ConfigError, ShapeError, int_at_least, int_tuple, is_int



@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), as nn.relu computes it, but bfloat16 compared as 16-bit integers.

    XLA:CPU takes a lone bf16 maximum through float32 conversions it does not
    vectorise, 3-4x slower than the integer maximum: a bf16's sign is its top
    bit and positive bf16s order like their bit patterns, so the values are
    equal (a NaN with the sign bit set becomes 0). It paid where the input
    comes from a oneDNN layer, ~10% of the MNIST recipe's bf16 step. Its
    gradient needs only the output, so after a residual block's add XLA no
    longer keeps the sum for the backward pass (ResNet-20's elementwise work:
    21 -> 18 ms a bf16 step, summed over threads).
    """
    if x.dtype != jnp.bfloat16:
        return nn.relu(x)
    as_int = jax.lax.bitcast_convert_type(x, jnp.int16)
    return jax.lax.bitcast_convert_type(jnp.maximum(as_int, jnp.int16(0)), jnp.bfloat16)


relu_fn = relu  # the name BatchNorm.__call__ uses, where `relu` is its keyword


@relu.defjvp
def _relu_jvp(primals, tangents):
    """The gradient passes where the output is positive (nn.relu's, 0 at 0), as a select, as jax.nn.relu's: a
    product with the mask converted to bf16 took 1.1 of the Flax CNN's ~12 ms bf16 step for its 28x28x32 relu
    alone, the select ~0.7 (both as the step runs them, 2 cores; ~1.1x the step)."""
    (x,), (dx,) = primals, tangents
    y = relu(x)
    return y, jnp.where(y > 0, dx, jnp.zeros_like(dx))


@jax.custom_jvp
def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), as nn.relu6 computes it (gradient 0 at both ends), bfloat16 compared as 16-bit integers
    as `relu` does (a NaN becomes 0 or 6): MobileNetV2's relu6 after each of its 35 batch norms took 85 ms of its bf16
    step forward and 113 ms backward through XLA:CPU's float32 conversions, summed over threads on 2 cores."""
    if x.dtype != jnp.bfloat16:
        return nn.relu6(x)
    as_int = jax.lax.bitcast_convert_type(x, jnp.int16)
    six = jax.lax.bitcast_convert_type(jnp.bfloat16(6), jnp.int16)
    return jax.lax.bitcast_convert_type(jnp.minimum(jnp.maximum(as_int, jnp.int16(0)), six), jnp.bfloat16)


@relu6.defjvp
def _relu6_jvp(primals, tangents):
    """The gradient passes where the output is strictly between 0 and 6 (nn.relu6's), as a select (see relu's)."""
    (x,), (dx,) = primals, tangents
    y = relu6(x)
    return y, jnp.where((y > 0) & (y < 6), dx, jnp.zeros_like(dx))


relu6_fn = relu6  # BatchNorm.__call__'s, as relu_fn


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm (same parameters, statistics and names) that can also add a residual to its output and apply
    relu, `relu(batch_norm(x) + residual)` with `residual=..., relu=True`, or apply relu6 (`relu6=True`, MobileNetV2's):
    one call, which cnn/kernels can compute in the normalisation's own pass (cnn's batch-norm loops, oneDNN's fused
    batch norm and relu) instead of more passes over the activations."""

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None,
                 relu: bool = False, relu6: bool = False, residual: jax.Array | None = None) -> jax.Array:
        if relu and relu6:
            raise ValueError("BatchNorm takes relu=True or relu6=True, not both")
        y = super().__call__(x, use_running_average=use_running_average, mask=mask)
        if residual is not None:
            y = y + residual
        if relu6:
            return relu6_fn(y)
        return relu_fn(y) if relu else y


class Conv(nn.Conv):
    """nn.Conv (same parameters and names) that can also apply relu to its output, `relu=True`: one call, which
    cnn/kernels can compute in the convolution's own pass (a oneDNN post-op) instead of one more pass over the
    output each way.

    `with_input=True` returns `(output, inputs)`, for a residual block whose
    shortcut is its input: the shortcut's gradient then reaches the input
    through this call, where cnn/kernels can add it to the convolution's
    input gradient in the convolution's own backward pass (elsewhere autodiff
    adds the two in one more pass).

    `avg_pool=window` (with `relu=True`) also average-pools the output over
    windows that tile it (strides the window, no padding): the pool's
    gradient and relu's then come from one pass over the output.
    """

    @nn.compact
    def __call__(self, inputs: jax.Array, *, relu: bool = False, with_input: bool = False,
                 avg_pool: tuple[int, ...] | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
        y = super().__call__(inputs)
        y = relu_fn(y) if relu else y
        if avg_pool is not None:  # a module of its own, so cnn/kernels' pool paths still take it
            y = Pool("avg", tuple(avg_pool), tuple(avg_pool), "VALID")(y)
        return (y, inputs) if with_input else y


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {  # Keras' activations with Keras' defaults
    "linear": lambda x: x,
    "relu": relu,
    "relu6": relu6,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "elu": nn.elu,
    "selu": nn.selu,
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.2),
    "silu": nn.silu,
    "swish": nn.silu,
    "softplus": nn.softplus,
    "softsign": nn.soft_sign,
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
    padding: str | tuple[tuple[int, int], ...]  # 'SAME', 'VALID' or (low, high) per spatial axis, as Flax takes it

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
        norm = functools.partial(BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = functools.partial(Conv, self.filters, (3, 3), padding="SAME", use_bias=False)
        strides = (self.strides, self.strides)
        # An identity shortcut comes out of the first convolution's call, so that its gradient meets the
        # convolution's input gradient there (cnn/kernels adds the two in the backward convolution's own call).
        identity = self.strides == 1 and x.shape[-1] == self.filters
        y, shortcut = conv()(x, with_input=True) if identity else (conv(strides=strides)(x), None)
        y = norm()(y, relu=True)
        y, last = conv()(y), norm()  # made before the shortcut's layers, so every layer keeps its name
        if shortcut is None and self.shortcut == "conv":
            shortcut = norm()(nn.Conv(self.filters, (1, 1), strides, use_bias=False)(x))
        elif shortcut is None:
            # lax.slice, not x[:, ::s, ::s]: with a symbolic batch size (export) indexing becomes a gather,
            # which TFLite's converter refuses; a strided slice it takes.
            shortcut = jax.lax.slice(x, (0,) * 4, x.shape, (1, self.strides, self.strides, 1))
            extra = self.filters - x.shape[-1]
            if extra < 0:
                raise ShapeError(f"ResidualBlock({self.filters}) narrows {x.shape[-1]} channels, which "
                                 "shortcut='pad' cannot do; use shortcut='conv'")
            shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return last(y, relu=True, residual=shortcut)  # relu(bn(y) + shortcut), in one pass where a kernel takes it


class DepthwiseConv(nn.Module):
    """Keras' DepthwiseConv (`filters` None) and SeparableConv: `depth_multiplier` filters per input channel,
    each seeing only its channel, then for SeparableConv a 1x1 convolution mixing them into `filters`.

    Both are nn.Conv (the depthwise one with a group per channel), made here
    because the group count is the input's channel count. Keras' kernels map
    onto Flax's by a reshape: depthwise (*k, channels, multiplier) is
    (*k, 1, channels * multiplier), pointwise is the same array.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str
    dilation: tuple[int, ...]
    depth_multiplier: int
    use_bias: bool
    filters: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, separable = x.shape[-1], self.filters is not None
        y = nn.Conv(channels * self.depth_multiplier, self.kernel_size, self.strides, self.padding,
                    kernel_dilation=self.dilation, feature_group_count=channels,
                    use_bias=self.use_bias and not separable, name="depthwise")(x)
        if not separable:
            return y
        return nn.Conv(self.filters, (1,) * len(self.kernel_size), use_bias=self.use_bias, name="pointwise")(y)


class PReLU(nn.Module):
    """Keras' PReLU: x where x >= 0, else alpha * x, with a learned alpha per input element (zeros at first),
    shared along the axes in `shared_axes` (1 is the first axis after the batch)."""

    shared_axes: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = tuple(1 if axis in self.shared_axes else n for axis, n in enumerate(x.shape[1:], start=1))
        alpha = self.param("alpha", nn.initializers.zeros, shape, jnp.float32)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


# --- What a layer needs of its input -------------------------------------------

Check = Callable[[tuple[int, ...]], None]
_SPATIAL = {1: "(length, channels)", 2: "(height, width, channels)", 3: "(depth, height, width, channels)"}


def _needs_rank(rank: int, layer: str, hint: str | None = None) -> Check:
    """A check that the input is (batch, *spatial[rank], channels)."""
    def check(shape: tuple[int, ...]) -> None:
        if len(shape) == rank + 2:
            return
        other = layer.replace(f"{rank}D", f"{len(shape) - 2}D")
        if hint:
            advice = hint
        elif len(shape) - 2 in _SPATIAL and other in LAYERS:
            advice = f"use the {len(shape) - 2}D version, {other}, for this input"
        elif len(shape) - 2 in _SPATIAL:
            advice = f"{layer} has no {len(shape) - 2}D version"
        else:
            advice = "move it before Flatten() and the Dense layers"
        raise ShapeError(f"{layer} needs inputs shaped {_SPATIAL[rank]} but got {format_shape(shape)}; {advice}")
    return check


def _needs_sizes(rank: int, layer: str, sizes: Callable[[tuple[int, ...]], list[int]], advice: str) -> Check:
    """A check of the rank, and that `sizes(spatial input sizes)`, the output's, are all at least 1."""
    needs_rank = _needs_rank(rank, layer)

    def check(shape: tuple[int, ...]) -> None:
        needs_rank(shape)
        if min(sizes(shape[1:-1])) < 1:
            raise ShapeError(f"{layer} would turn {format_shape(shape)} into an empty output; {advice}")
    return check


def _needs_windows(window: tuple[int, ...], strides: tuple[int, ...], padding: str, layer: str,
                   dilation: tuple[int, ...] | None = None) -> Check:
    """A check of the rank, and that every (dilated) window fits the input at least once."""
    span = [(w - 1) * d + 1 for w, d in zip(window, dilation or (1,) * len(window))]
    rank = _needs_rank(len(window), layer)

    def check(shape: tuple[int, ...]) -> None:
        rank(shape)
        for size, w, s in zip(shape[1:-1], span, strides):
            out = (size - w) // s + 1 if padding == "VALID" else math.ceil(size / s)
            if out < 1:
                spans = "" if span == list(window) else f" (spanning {tuple(span)} with its dilation)"
                raise ShapeError(f"{layer} has a window of {window}{spans} but its input is only "
                                 f"{format_shape(shape)}; use a smaller kernel or pool size, padding='same', or fewer "
                                 "pooling layers before it")
    return check


def _needs_channels_divisible(groups: int, layer: str) -> Check:
    """A check that the input's channels split into `groups` equal groups."""
    def check(shape: tuple[int, ...]) -> None:
        if shape[-1] % groups:
            raise ShapeError(f"{layer}(groups={groups}) needs input channels divisible by {groups} but got "
                             f"{format_shape(shape)}; change groups or the channels of the layer before it")
    return check


def _needs_axes(axes: tuple[int, ...], layer: str, field: str) -> Check:
    """A check that every axis in `axes` (Keras numbering: 0 the batch, -1 the last) is one of the input's others."""
    def check(shape: tuple[int, ...]) -> None:
        if any(not -len(shape) < a < len(shape) or a == 0 for a in axes):
            raise ShapeError(f"{layer}({field}={axes if len(axes) > 1 else axes[0]}) does not fit inputs shaped "
                             f"{format_shape(shape)}: axes run from 1 to {len(shape) - 1} (or -1 down to "
                             f"{1 - len(shape)}), and 0 is the batch")
    return check


def _all(*checks: Check) -> Check:
    def check(shape: tuple[int, ...]) -> None:
        for c in checks:
            c(shape)
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
        """Keras' snake_case name for the layer, e.g. 'max_pooling2d', 'conv2d_transpose', 'p_re_lu'."""
        return re.sub("([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z]+)", r"\1_\2", self.kind)).lower()

    @property
    def fuses_relu(self) -> bool:
        """Whether the module can apply the layer's relu in its own call (cnn's Conv, relu=True)."""
        return self.activation == "relu" and isinstance(self.module, Conv)

    @property
    def tiling_avg_pool(self) -> tuple[int, ...] | None:
        """The window of an average pool whose windows tile its input (strides the window, VALID, no activation),
        which a convolution before it can take in its own call (cnn's Conv, avg_pool=window); else None."""
        m = self.module
        ok = (isinstance(m, Pool) and m.kind == "avg" and not self.activation and m.padding == "VALID"
              and tuple(m.window) == tuple(m.strides))
        return tuple(m.window) if ok else None

    def __call__(self, module: nn.Module | None, x: jax.Array, train: bool, fused: bool = False,
                 avg_pool: tuple[int, ...] | None = None) -> jax.Array:
        """Applies the layer to `x`; `module` is `self.module` bound into the model (None for `fn` layers).
        `fused` (where `fuses_relu`): the module applies the relu itself, in one call cnn/kernels can fuse, and
        with `avg_pool` the next layer's average pool too."""
        if self.check:
            self.check(x.shape)
        if module is None:
            y = self.fn(x)
        elif fused:
            return module(x, relu=True, avg_pool=avg_pool)
        elif self.train_arg is None:
            y = module(x)
        else:
            y = module(x, **{self.train_arg: train if self.train_arg == "train" else not train})
        return ACTIVATIONS[self.activation or "linear"](y)


def _padding(value: str, causal: bool = False) -> str:
    allowed = ("VALID", "SAME", "CAUSAL") if causal else ("VALID", "SAME")
    if not isinstance(value, str) or value.upper() not in allowed:
        names = [repr(a.lower()) for a in allowed]
        raise ConfigError(f"padding={value!r} is not valid: expected {', '.join(names[:-1])} or {names[-1]}")
    return value.upper()


def _activation_name(value: str | None) -> str | None:
    if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
        raise ConfigError(f"activation={value!r} is unknown; known: {', '.join(ACTIVATIONS)}")
    return value


def _real(value, field: str, low: float | None = None, positive: bool = False) -> float:
    """`value` as a float if it is a number (at least `low`, or above 0 with `positive`); else a ConfigError."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (low is None or value >= low) and (not positive or value > 0))
    if not ok:
        expected = "a positive number" if positive else "a number" if low is None else f"a number >= {low:g}"
        raise ConfigError(f"{field}={value!r} is not valid: expected {expected}")
    return float(value)


def _fraction(value, field: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ConfigError(f"{field}={value!r} is not valid: expected a number in [0, 1)")
    return float(value)


def _int_axes(value, field: str) -> tuple[int, ...]:
    """An axis or a tuple of axes, as Keras counts them (0 is the batch; checked against the input later)."""
    axes = (value,) if is_int(value) else value
    if not isinstance(axes, (tuple, list)) or not axes or not all(is_int(a) and a != 0 for a in axes):
        raise ConfigError(f"{field}={value!r} is not valid: expected a non-zero integer (an axis after the batch's, "
                          "-1 for the last) or a tuple of them")
    return tuple(int(a) for a in axes)


def _counts(value, field: str, rank: int) -> tuple[int, ...]:
    """An integer >= 0 repeated `rank` times, or a tuple of `rank` of them."""
    values = (value,) * rank if is_int(value) else value
    if not isinstance(values, (tuple, list)) or len(values) != rank or not all(is_int(v) and v >= 0 for v in values):
        raise ConfigError(f"{field}={value!r} is not valid: expected an integer >= 0 or a tuple of {rank} of them")
    return tuple(int(v) for v in values)


def _edges(value, field: str, rank: int) -> tuple[tuple[int, int], ...]:
    """Keras' padding and cropping amounts as (before, after) per spatial axis.

    An int is every side; in 1D a pair is (before, after); in 2D and 3D a
    tuple has one entry per axis, an int (both sides) or a (before, after) pair.
    """
    entries = (value,) if rank == 1 else (value,) * rank if is_int(value) else value
    pairs = [(e, e) if is_int(e) else e for e in entries] if isinstance(entries, (tuple, list)) else []
    pair = lambda p: isinstance(p, (tuple, list)) and len(p) == 2 and all(is_int(v) and v >= 0 for v in p)
    if len(pairs) != rank or not all(map(pair, pairs)):
        shapes = "an integer >= 0 or a pair (before, after)" if rank == 1 else \
            f"an integer >= 0, or a tuple of {rank} entries, each an integer or a pair (before, after)"
        raise ConfigError(f"{field}={value!r} is not valid: expected {shapes}")
    return tuple((int(a), int(b)) for a, b in pairs)


def _dilation(strides: tuple[int, ...], dilation_rate, rank: int) -> tuple[int, ...]:
    dilation = int_tuple(dilation_rate, "dilation_rate", rank)
    if max(strides) > 1 and max(dilation) > 1:  # as Keras refuses it
        raise ConfigError(f"strides={strides} and dilation_rate={dilation} cannot both be above 1; keep one at 1")
    return dilation


def _conv(rank: int):
    name = f"Conv{rank}D"

    def make(filters: int, kernel_size, strides=1, padding: str = "valid", *, dilation_rate=1, groups: int = 1,
             activation: str | None = None, use_bias: bool = True) -> dict:
        window, step = int_tuple(kernel_size, "kernel_size", rank), int_tuple(strides, "strides", rank)
        dilation, pad = _dilation(step, dilation_rate, rank), _padding(padding, causal=rank == 1)
        filters, groups = int_at_least(filters, "filters"), int_at_least(groups, "groups")
        if filters % groups:
            raise ConfigError(f"groups={groups} does not divide filters={filters}: every group needs the same number of filters")
        module = Conv(filters, window, step, pad, kernel_dilation=dilation, feature_group_count=groups,
                      use_bias=bool(use_bias))
        check = _all(_needs_windows(window, step, pad, name, dilation), _needs_channels_divisible(groups, name))
        return dict(module=module, activation=_activation_name(activation), check=check)
    return make


def _transpose_pads(window: int, stride: int, dilation: int, padding: str, extra: int | None) -> tuple[int, int]:
    """The (before, after) pads with which lax.conv_transpose gives Keras' output length, as Keras' own JAX backend
    computes them (keras/src/backend/common/backend_utils.py): for an input of n, (n - 1) * stride + max(span,
    stride) with 'valid' and n * stride with 'same'; with output_padding p, (n - 1) * stride + span + p with
    'valid' and (n - 1) * stride + span % 2 + p with 'same' (span: the dilated kernel's extent)."""
    span = (window - 1) * dilation + 1
    if padding == "VALID":
        return span - 1, span - 1 + (max(span, stride) - span if extra is None else extra)
    total = stride + span - 2 if extra is None else span + span % 2 - 2 + extra
    before = min(total // 2 + total % 2, span - 1)
    return before, total - before


def _conv_transpose(rank: int):
    name = f"Conv{rank}DTranspose"

    def make(filters: int, kernel_size, strides=1, padding: str = "valid", output_padding=None, *, dilation_rate=1,
             activation: str | None = None, use_bias: bool = True) -> dict:
        window, step = int_tuple(kernel_size, "kernel_size", rank), int_tuple(strides, "strides", rank)
        dilation, pad = _dilation(step, dilation_rate, rank), _padding(padding)
        extra = (None,) * rank if output_padding is None else _counts(output_padding, "output_padding", rank)
        if any(e is not None and e >= s for e, s in zip(extra, step)):
            raise ConfigError(f"output_padding={output_padding!r} is not valid: expected each entry below "
                              f"strides={step}")
        pads = tuple(map(_transpose_pads, window, step, dilation, (pad,) * rank, extra))
        # Keras' kernel is (*kernel_size, filters, channels): Flax's with transpose_kernel=True.
        module = nn.ConvTranspose(int_at_least(filters, "filters"), window, step, pads, kernel_dilation=dilation,
                                  use_bias=bool(use_bias), transpose_kernel=True)
        spans = [(w - 1) * d + 1 for w, d in zip(window, dilation)]
        sizes = lambda spatial: [(n - 1) * s + lo + hi - k + 2 for n, s, (lo, hi), k in zip(spatial, step, pads, spans)]
        return dict(module=module, activation=_activation_name(activation),
                    check=_needs_sizes(rank, name, sizes, "use a larger input, padding='valid' or a larger "
                                                          "output_padding"))
    return make


def _depthwise(rank: int, filters: int | None, kernel_size, strides, padding: str, depth_multiplier: int,
               dilation_rate, activation: str | None, use_bias: bool) -> dict:
    """DepthwiseConv (`filters` None) and SeparableConv, as one DepthwiseConv module."""
    name = f"{'Depthwise' if filters is None else 'Separable'}Conv{rank}D"
    window, step = int_tuple(kernel_size, "kernel_size", rank), int_tuple(strides, "strides", rank)
    dilation, pad = _dilation(step, dilation_rate, rank), _padding(padding)
    module = DepthwiseConv(window, step, pad, dilation, int_at_least(depth_multiplier, "depth_multiplier"),
                           bool(use_bias), filters)
    return dict(module=module, activation=_activation_name(activation),
                check=_needs_windows(window, step, pad, name, dilation))


def _depthwise_conv(rank: int):
    def make(kernel_size, strides=1, padding: str = "valid", depth_multiplier: int = 1, *, dilation_rate=1,
             activation: str | None = None, use_bias: bool = True) -> dict:
        return _depthwise(rank, None, kernel_size, strides, padding, depth_multiplier, dilation_rate, activation,
                          use_bias)
    return make


def _separable_conv(rank: int):
    def make(filters: int, kernel_size, strides=1, padding: str = "valid", *, dilation_rate=1,
             depth_multiplier: int = 1, activation: str | None = None, use_bias: bool = True) -> dict:
        return _depthwise(rank, int_at_least(filters, "filters"), kernel_size, strides, padding, depth_multiplier,
                          dilation_rate, activation, use_bias)
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


def _upsample(x: jax.Array, factors: tuple[int, ...], interpolation: str) -> jax.Array:
    if interpolation == "nearest":
        for axis, factor in enumerate(factors, start=1):
            x = jnp.repeat(x, factor, axis=axis)
        return x
    shape = (x.shape[0], *(n * f for n, f in zip(x.shape[1:-1], factors)), x.shape[-1])
    return jax.image.resize(x, shape, "bilinear")  # half-pixel centres, as tf.image.resize


def _up_sampling(rank: int):
    name = f"UpSampling{rank}D"

    def build(size, interpolation: str = "nearest") -> dict:
        if interpolation not in ("nearest", "bilinear"):
            raise ConfigError(f"interpolation={interpolation!r} is not valid: expected 'nearest' or 'bilinear'")
        factors = int_tuple(size, "size", rank)
        return dict(fn=functools.partial(_upsample, factors=factors, interpolation=interpolation),
                    check=_needs_rank(rank, name))

    if rank == 2:
        def make(size=(2, 2), *, interpolation: str = "nearest") -> dict:
            return build(size, interpolation)
    else:
        def make(size=2 if rank == 1 else (2,) * rank) -> dict:
            return build(size)
    return make


def _zero_padding(rank: int):
    def make(padding=1 if rank == 1 else (1, 1) if rank == 2 else ((1, 1),) * rank) -> dict:
        pads = _edges(padding, "padding", rank)
        return dict(fn=lambda x: jnp.pad(x, ((0, 0), *pads, (0, 0))), check=_needs_rank(rank, f"ZeroPadding{rank}D"))
    return make


def _cropping(rank: int):
    def make(cropping=(1, 1) if rank == 1 else ((0, 0),) * rank if rank == 2 else ((1, 1),) * rank) -> dict:
        edges = _edges(cropping, "cropping", rank)
        crop = lambda x: x[(slice(None), *(slice(a, n - b) for n, (a, b) in zip(x.shape[1:-1], edges)))]
        sizes = lambda spatial: [n - a - b for n, (a, b) in zip(spatial, edges)]
        return dict(fn=crop, check=_needs_sizes(rank, f"Cropping{rank}D", sizes, "crop less"))
    return make


def _dense(units: int, activation: str | None = None, use_bias: bool = True) -> dict:
    return dict(module=nn.Dense(int_at_least(units, "units"), use_bias=bool(use_bias)),
                activation=_activation_name(activation))


def _dropout(rate: float) -> dict:
    return dict(module=nn.Dropout(rate=_fraction(rate, "rate")), train_arg="deterministic")


def _spatial_dropout(rank: int):
    def make(rate: float) -> dict:
        """Drops whole channels: one draw per example and channel, shared along the spatial axes."""
        return dict(module=nn.Dropout(rate=_fraction(rate, "rate"), broadcast_dims=tuple(range(1, rank + 1))),
                    train_arg="deterministic", check=_needs_rank(rank, f"SpatialDropout{rank}D"))
    return make


def _batch_norm(momentum: float = 0.99, epsilon: float = 1e-3) -> dict:
    return dict(module=BatchNorm(momentum=_fraction(momentum, "momentum"),
                                 epsilon=_real(epsilon, "epsilon", positive=True)),
                train_arg="use_running_average")


def _layer_norm(axis=-1, epsilon: float = 1e-3, center: bool = True, scale: bool = True) -> dict:
    axes = _int_axes(axis, "axis")
    module = nn.LayerNorm(epsilon=_real(epsilon, "epsilon", positive=True), use_bias=bool(center),
                          use_scale=bool(scale), reduction_axes=axes, feature_axes=axes, use_fast_variance=False)
    return dict(module=module, check=_needs_axes(axes, "LayerNormalization", "axis"))


def _group_norm(groups: int = 32, *, epsilon: float = 1e-3, center: bool = True, scale: bool = True) -> dict:
    """Channels in `groups` equal groups, normalised per example and group over the group's channels and all
    positions; groups=-1 is one group per channel (instance normalisation)."""
    if groups != -1:
        groups = int_at_least(groups, "groups", expected="a positive integer, or -1 for a group per channel")
    module = nn.GroupNorm(num_groups=None if groups == -1 else groups, group_size=1 if groups == -1 else None,
                          epsilon=_real(epsilon, "epsilon", positive=True), use_bias=bool(center),
                          use_scale=bool(scale), use_fast_variance=False)
    return dict(module=module, check=_needs_channels_divisible(max(groups, 1), "GroupNormalization"))


def _rescaling(scale: float, offset: float = 0.0) -> dict:
    scale, offset = _real(scale, "scale"), _real(offset, "offset")
    return dict(fn=lambda x: x * scale + offset)


def _activation_layer(activation: str) -> dict:
    return dict(fn=lambda x: x, activation=_activation_name(activation))


def _relu(max_value: float | None = None, negative_slope: float = 0.0, threshold: float = 0.0) -> dict:
    """x from `threshold` up to `max_value`, `negative_slope` * (x - threshold) below it, as keras.activations.relu."""
    top = None if max_value is None else _real(max_value, "max_value", low=0)
    slope, cut = _real(negative_slope, "negative_slope", low=0), _real(threshold, "threshold", low=0)

    def relu(x: jax.Array) -> jax.Array:
        return jnp.where(x > cut, x if top is None else jnp.minimum(x, top), slope * (x - cut))
    return dict(fn=relu)


def _leaky_relu(negative_slope: float = 0.3) -> dict:
    return dict(fn=functools.partial(nn.leaky_relu, negative_slope=_real(negative_slope, "negative_slope", low=0)))


def _prelu(*, shared_axes=None) -> dict:
    axes = () if shared_axes is None else _int_axes(shared_axes, "shared_axes")
    if any(a < 0 for a in axes):
        raise ConfigError(f"shared_axes={shared_axes!r} is not valid: expected axes from 1 (the first after the "
                          "batch's)")

    def check(shape: tuple[int, ...]) -> None:
        if axes and max(axes) >= len(shape):
            raise ShapeError(f"PReLU(shared_axes={shared_axes!r}) does not fit inputs shaped {format_shape(shape)}, "
                             f"whose axes after the batch's run from 1 to {len(shape) - 1}")
    return dict(module=PReLU(shared_axes=axes), check=check)


def _elu(alpha: float = 1.0) -> dict:
    return dict(fn=functools.partial(nn.elu, alpha=_real(alpha, "alpha")))


def _softmax(axis: int = -1) -> dict:
    """Softmax over `axis`; over the last axis it is the activation 'softmax', so a final Softmax() leaves the
    loss its logits, as Dense(..., activation='softmax') does."""
    axes = _int_axes(axis, "axis")
    if axes == (-1,):
        return dict(fn=lambda x: x, activation="softmax")
    return dict(fn=functools.partial(nn.softmax, axis=axes), check=_needs_axes(axes, "Softmax", "axis"))


def _flatten() -> dict:
    return dict(fn=lambda x: x.reshape(x.shape[0], -1))


def _reshape(target_shape) -> dict:
    """(None, *target_shape), where one entry may be -1: whatever the input's size leaves for it."""
    shape = tuple(target_shape) if isinstance(target_shape, (tuple, list)) else ()
    if not shape or not all(is_int(n) and (n > 0 or n == -1) for n in shape) or shape.count(-1) > 1:
        raise ConfigError(f"target_shape={target_shape!r} is not valid: expected a tuple of positive integers, "
                          "one of which may be -1")
    known = math.prod(n for n in shape if n != -1)

    def check(input_shape: tuple[int, ...]) -> None:
        size = math.prod(input_shape[1:])
        if (size % known if -1 in shape else size != known):
            raise ShapeError(f"Reshape({shape}) cannot hold inputs shaped {format_shape(input_shape)}: "
                             f"{size} values per example, which {'do not divide by' if -1 in shape else 'is not'} "
                             f"{known}")
    return dict(fn=lambda x: x.reshape(x.shape[0], *shape), check=check)


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
    **{f"Conv{r}D": _conv(r) for r in (1, 2, 3)},
    **{f"Conv{r}DTranspose": _conv_transpose(r) for r in (1, 2, 3)},
    **{f"DepthwiseConv{r}D": _depthwise_conv(r) for r in (1, 2)},
    **{f"SeparableConv{r}D": _separable_conv(r) for r in (1, 2)},
    **{f"MaxPooling{r}D": _pool("max", r) for r in (1, 2, 3)},
    **{f"AveragePooling{r}D": _pool("avg", r) for r in (1, 2, 3)},
    **{f"GlobalAveragePooling{r}D": _global_pool("avg", r) for r in (1, 2, 3)},
    **{f"GlobalMaxPooling{r}D": _global_pool("max", r) for r in (1, 2, 3)},
    **{f"UpSampling{r}D": _up_sampling(r) for r in (1, 2, 3)},
    **{f"ZeroPadding{r}D": _zero_padding(r) for r in (1, 2, 3)},
    **{f"Cropping{r}D": _cropping(r) for r in (1, 2, 3)},
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Dense": _dense,
    "Dropout": _dropout,
    **{f"SpatialDropout{r}D": _spatial_dropout(r) for r in (1, 2, 3)},
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm,
    "Rescaling": _rescaling,
    "Activation": _activation_layer,
    "ReLU": _relu,
    "LeakyReLU": _leaky_relu,
    "PReLU": _prelu,
    "ELU": _elu,
    "Softmax": _softmax,
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
