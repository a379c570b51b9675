"""Hardware fast paths for the model's layers, chosen in this one place by `train.kernels`.

Model definitions stay plain Flax (cnn/models). `apply_fn(model, kernels,
platform)` returns the function training and prediction call instead of
`model.apply`: it runs the model under a Flax method interceptor that sends
each `nn.Conv`, `nn.Dense`, pooling and training-mode `nn.BatchNorm` call to
a fast path where one applies on this platform, wherever the layer sits (inside a ResidualBlock too), and
to Flax otherwise. Parameters are created exactly as Flax creates them, so
checkpoints and results do not depend on the choice, up to float rounding.

`train.kernels`: 'auto' (the paths that pay on the platform), 'onednn'
(every convolution, dense layer and tiling average pool oneDNN can take, in
float32 and bf16; an error when cnn/kernels/onednn.py's extension is not
built) or 'xla' (none). On a CPU where the extension loaded, 'auto' sends
float32 convolutions to oneDNN (1.6-1.8x ResNet-20's float32 step, AVX2
kernels included; with a relu and tiling average pool after one in its call;
a one-channel input's stays on cpu.py's patches path) and float32 batch norms
(relu, relu6 or a residual add fused) through the extension's own loops,
and, when oneDNN has bf16 kernels for the processor (it
does with AVX512-BF16 or AMX, and not on an AVX2-only one:
`onednn.has_bf16` asks oneDNN), bf16 convolutions (relu as a post-op where
the model asks cnn's Conv for relu=True), dense layers and tiling average
pools, and bf16 batch norms through the extension's own loops (with the relu
after them fused in, where the model asks cnn's BatchNorm for relu=True); in
both dtypes a stride-1 convolution whose input is also its block's shortcut
(cnn's Conv with with_input=True) adds the shortcut's gradient in its own
backward call;
overlapping max pools, in either dtype, go to the extension's
own loops; other float32 layers take the XLA paths in cpu.py. oneDNN's choice among its implementations is recorded per machine
(`onednn.choices_file`), so a resumed run computes bitwise as the
uninterrupted one. This module is the
only one that looks at the backend and the processor to decide how a layer
computes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.config import KERNELS
from cnn.errors import ConfigError, require
from cnn.kernels import cpu, onednn
from cnn.models.layers import BatchNorm, Conv, Pool

_BF16, _F32 = (jnp.dtype(jnp.bfloat16),), (jnp.dtype(jnp.float32),)

_NORMS = (nn.BatchNorm, BatchNorm)  # Flax's, and cnn's own, which takes relu=True and a residual
_CONVS = (nn.Conv, Conv)  # Flax's, and cnn's own, which takes relu=True and with_input=True
# The keywords of cnn's BatchNorm and Conv beyond Flax's, and the sets of them a path takes: none, relu=True,
# relu=True with residual=... (a residual block's end), relu6=True, with_input=True (a convolution whose input is
# also its block's shortcut), or relu=True with avg_pool=window (a convolution, its relu and an average pool).
_EXTRAS = ("relu", "relu6", "residual", "with_input", "avg_pool")
_VALUES = ("residual", "avg_pool")  # the extras that carry a value to the path
_PLAIN, _RELU, _RELU6 = frozenset(), frozenset({"relu"}), frozenset({"relu6"})
_ADD_RELU, _WITH_INPUT = frozenset({"relu", "residual"}), frozenset({"with_input"})
_RELU_POOL = frozenset({"relu", "avg_pool"})


def _f32_unless_patches(applies: Callable[..., bool]) -> Callable[..., bool]:
    """oneDNN's `applies` for float32 convolutions, less the one-channel ones `patches_conv` takes: XLA's patches
    beat oneDNN there (the Flax CNN's float32 step ran 0.94x with its first layer in oneDNN, held to AVX2)."""
    def f32_applies(module: nn.Conv, x: jax.Array, **kwargs) -> bool:
        return not cpu.patches_conv_applies(module, x) and applies(module, x, dtypes=_F32, **kwargs)

    return f32_applies


# Fast path name -> (the Flax module types whose calls it replaces, the calls it takes (by _EXTRAS given),
# applies(module, x), compute(module, x)).
PATHS: dict[str, tuple[tuple[type, ...], frozenset[str], Callable[..., bool], Callable[..., jax.Array]]] = {
    "patches_conv": (_CONVS, _PLAIN, cpu.patches_conv_applies, cpu.patches_conv),
    "dense_transposed": ((nn.Dense,), _PLAIN, cpu.dense_applies, cpu.dense),
    "tiled_pool": ((Pool,), _PLAIN, cpu.tiled_pool_applies, cpu.tiled_pool),
    "batch_norm_sums": (_NORMS, _PLAIN, cpu.batch_norm_applies, cpu.batch_norm),
    "onednn_conv": (_CONVS, _PLAIN, onednn.conv_applies, onednn.conv),
    # Conv(relu=True): relu as a oneDNN post-op, in the convolution's own pass (elsewhere: the convolution, then relu).
    "onednn_conv_relu": ((Conv,), _RELU, onednn.conv_applies, functools.partial(onednn.conv, relu=True)),
    "onednn_conv_relu_bf16": ((Conv,), _RELU, functools.partial(onednn.conv_applies, dtypes=_BF16),
                              functools.partial(onednn.conv, relu=True)),
    # Conv(relu=True, avg_pool=window): the pool's gradient and relu's in one XLA pass over the output.
    "onednn_conv_relu_pool": ((Conv,), _RELU_POOL, onednn.conv_pool_applies, functools.partial(onednn.conv, relu=True)),
    "onednn_conv_relu_pool_bf16": ((Conv,), _RELU_POOL, functools.partial(onednn.conv_pool_applies, dtypes=_BF16),
                                   functools.partial(onednn.conv, relu=True)),
    "onednn_conv_relu_pool_f32": ((Conv,), _RELU_POOL, _f32_unless_patches(onednn.conv_pool_applies),
                                  functools.partial(onednn.conv, relu=True)),
    # Conv(with_input=True): the shortcut's gradient added in the convolution's backward call (a oneDNN post-op).
    "onednn_conv_with_input": ((Conv,), _WITH_INPUT, onednn.conv_applies,
                               functools.partial(onednn.conv, with_input=True)),
    "onednn_conv_with_input_bf16": ((Conv,), _WITH_INPUT, functools.partial(onednn.conv_applies, dtypes=_BF16),
                                    functools.partial(onednn.conv, with_input=True)),
    "onednn_conv_with_input_f32": ((Conv,), _WITH_INPUT, _f32_unless_patches(onednn.conv_applies),
                                   functools.partial(onednn.conv, with_input=True)),
    "onednn_dense": ((nn.Dense,), _PLAIN, onednn.dense_applies, onednn.dense),
    "onednn_conv_bf16": (_CONVS, _PLAIN, functools.partial(onednn.conv_applies, dtypes=_BF16), onednn.conv),
    "onednn_conv_f32": (_CONVS, _PLAIN, _f32_unless_patches(onednn.conv_applies), onednn.conv),
    "onednn_dense_bf16": ((nn.Dense,), _PLAIN, functools.partial(onednn.dense_applies, dtypes=_BF16),
                          onednn.dense),
    "onednn_avg_pool": ((Pool,), _PLAIN, onednn.avg_pool_applies, onednn.avg_pool),
    "onednn_avg_pool_bf16": ((Pool,), _PLAIN, functools.partial(onednn.avg_pool_applies, dtypes=_BF16),
                             onednn.avg_pool),
    # Overlapping max pools (ResNet-50's 3x3, stride 2): the backward pass in the extension's loops.
    "max_pool_loops": ((Pool,), _PLAIN, onednn.max_pool_applies, onednn.max_pool),
    "onednn_batch_norm": (_NORMS, _PLAIN, onednn.batch_norm_applies, onednn.batch_norm),
    # BatchNorm(relu=True) in one oneDNN pass each way (elsewhere: the batch norm's own path, then relu).
    "onednn_batch_norm_relu": ((BatchNorm,), _RELU, onednn.batch_norm_relu_applies, onednn.batch_norm_relu),
    # The extension's own loops: two passes each way, relu fused where the model asks for it.
    "batch_norm_loops": (_NORMS, _PLAIN, onednn.batch_norm_loops_applies, onednn.batch_norm_loops),
    "batch_norm_relu_loops": ((BatchNorm,), _RELU, onednn.batch_norm_loops_applies, onednn.batch_norm_relu_loops),
    "batch_norm_loops_bf16": (_NORMS, _PLAIN, functools.partial(onednn.batch_norm_loops_applies, dtypes=_BF16),
                              onednn.batch_norm_loops),
    "batch_norm_relu_loops_bf16": ((BatchNorm,), _RELU,
                                   functools.partial(onednn.batch_norm_loops_applies, dtypes=_BF16),
                                   onednn.batch_norm_relu_loops),
    "batch_norm_relu6_loops": ((BatchNorm,), _RELU6, onednn.batch_norm_loops_applies, onednn.batch_norm_relu6_loops),
    "batch_norm_relu6_loops_bf16": ((BatchNorm,), _RELU6,
                                    functools.partial(onednn.batch_norm_loops_applies, dtypes=_BF16),
                                    onednn.batch_norm_relu6_loops),
    "batch_norm_add_relu_loops": ((BatchNorm,), _ADD_RELU, onednn.batch_norm_add_relu_applies,
                                  onednn.batch_norm_add_relu_loops),
    "batch_norm_add_relu_loops_bf16": ((BatchNorm,), _ADD_RELU,
                                       functools.partial(onednn.batch_norm_add_relu_applies, dtypes=_BF16),
                                       onednn.batch_norm_add_relu_loops),
    "batch_norm_loops_f32": (_NORMS, _PLAIN, functools.partial(onednn.batch_norm_loops_applies, dtypes=_F32),
                             onednn.batch_norm_loops),
    "batch_norm_relu_loops_f32": ((BatchNorm,), _RELU, functools.partial(onednn.batch_norm_loops_applies, dtypes=_F32),
                                  onednn.batch_norm_relu_loops),
    "batch_norm_relu6_loops_f32": ((BatchNorm,), _RELU6,
                                   functools.partial(onednn.batch_norm_loops_applies, dtypes=_F32),
                                   onednn.batch_norm_relu6_loops),
    "batch_norm_add_relu_loops_f32": ((BatchNorm,), _ADD_RELU,
                                      functools.partial(onednn.batch_norm_add_relu_applies, dtypes=_F32),
                                      onednn.batch_norm_add_relu_loops),
}
# What 'auto' takes on each platform: the CPU paths measured faster there (docs/kernels.md); tiled pools
# everywhere, as their backward pass avoids a generic window scatter on every backend.
AUTO = {"cpu": ("patches_conv", "dense_transposed", "tiled_pool", "batch_norm_sums")}
AUTO_ELSEWHERE = ("tiled_pool",)
# Taken first by 'auto' on a CPU with bf16 instructions, when oneDNN's extension loaded: bf16 layers, as XLA:CPU's
# bf16 products are the slow ones, and bf16 batch norm through the extension's own loops (1.09x ResNet-20's step and
# 1.16x configs/mnist.py's against oneDNN's batch norm, and 1.3-3x XLA's on 16-128 channels; docs/kernels.md).
AUTO_ONEDNN_BF16 = ("onednn_conv_relu_pool_bf16", "onednn_conv_relu_bf16", "onednn_conv_with_input_bf16",
                    "onednn_conv_bf16", "onednn_dense_bf16", "onednn_avg_pool_bf16", "batch_norm_add_relu_loops_bf16",
                    "batch_norm_relu_loops_bf16", "batch_norm_relu6_loops_bf16", "batch_norm_loops_bf16")
# Taken before AUTO's CPU paths on any CPU where the extension loaded (after the bf16 ones): float32 convolutions
# (ResNet-20's float32 step 1.6-1.8x, docs/kernels.md), a relu and tiling average pool after one in its own call (the
# Flax CNN's step 1.09x, held to AVX2), with oneDNN's choice of implementation recorded per machine
# (onednn.choices_file), one-channel inputs left to patches_conv; overlapping max pools, in either dtype, through the
# extension's loops (ResNet-50's: 5.7x XLA's in float32, 14x in bf16, forward and backward); and float32 batch norm
# through the extension's loops, relu, relu6 or a residual block's add and relu in the same passes (ResNet-20's
# float32 step 1.17x, held to AVX2, and 1.28x with AVX-512, MobileNetV2's 1.32x, ResNet-50's 1.13x, against
# batch_norm_sums).
AUTO_ONEDNN_F32 = ("onednn_conv_relu_pool_f32", "onednn_conv_with_input_f32", "onednn_conv_f32", "max_pool_loops",
                   "batch_norm_add_relu_loops_f32", "batch_norm_relu_loops_f32", "batch_norm_relu6_loops_f32",
                   "batch_norm_loops_f32")
# 'onednn' takes every layer oneDNN can, in every dtype.
ONEDNN = ("onednn_conv_relu_pool", "onednn_conv_relu", "onednn_conv_with_input", "onednn_conv", "onednn_dense",
          "onednn_avg_pool", "onednn_batch_norm_relu", "onednn_batch_norm", "tiled_pool", "max_pool_loops",
          "batch_norm_sums")


def resolve(kernels: str = "auto", platform: str | None = None) -> tuple[str, ...]:
    """The fast paths `kernels` stands for on `platform` ('cpu', 'gpu', 'tpu'; None: JAX's default backend)."""
    require(kernels in KERNELS, "train.kernels", kernels, f"one of {', '.join(KERNELS)}")
    if kernels == "xla":
        return ()
    platform = platform or jax.default_backend()
    if kernels == "onednn":
        if platform != "cpu" or not onednn.available():
            reason = onednn.why_unavailable() or f"this run's devices are {platform}, not cpu"
            raise ConfigError(f"train.kernels='onednn': {reason}; use 'auto' or 'xla'")
        return ONEDNN
    if platform == "cpu" and onednn.available():
        return (AUTO_ONEDNN_BF16 if onednn.has_bf16() else ()) + AUTO_ONEDNN_F32 + AUTO["cpu"]
    return AUTO.get(platform, AUTO_ELSEWHERE)


def check(kernels: str, compute_dtype: str, platform: str | None = None) -> None:
    """Refuses what this machine cannot compute: bf16 layers forced through oneDNN on a CPU where oneDNN has no
    bf16 kernels (an AVX2-only one), before a step would fail deep inside XLA."""
    if resolve(kernels, platform) == ONEDNN and compute_dtype == "bfloat16" and not onednn.has_bf16():
        raise ConfigError(f"train.kernels='onednn' with train.compute_dtype='bfloat16' needs bf16 instructions, but "
                          f"this CPU cannot: {onednn.missing_bf16()}; use compute_dtype='float32' (with 'onednn' or "
                          "'auto'), or kernels='xla', whose bf16 is emulated and slow")


def _computes(path: str, compute_dtype: str) -> bool:
    """Whether fast path `path` takes layers of this compute dtype (a _bf16 or _f32 path takes that dtype only)."""
    only = {"_bf16": "bfloat16", "_f32": "float32"}
    return all(compute_dtype == dtype for suffix, dtype in only.items() if path.endswith(suffix))


def onednn_in_force(kernels: str, compute_dtype: str, platform: str | None = None) -> bool:
    """Whether `kernels` sends this run's convolutions (and, in bf16, dense layers) to oneDNN, given the compute
    dtype."""
    paths = resolve(kernels, platform)
    return onednn.available() and any(name.startswith("onednn") and _computes(name, compute_dtype) for name in paths)


def compute_dtype(requested: str, kernels: str, platform: str | None = None) -> str:
    """`train.compute_dtype` made concrete: 'auto' is bfloat16 where bf16 pays, on a CPU whose bf16 layers go to
    oneDNN (XLA:CPU's own bf16 products are slower than float32, docs/kernels.md), and float32 elsewhere
    (GPUs untested here)."""
    if requested != "auto":
        return requested
    return "bfloat16" if onednn_in_force(kernels, "bfloat16", platform) else "float32"


def cpu_devices(kernels: str, dtype: str) -> int:
    """`train.num_devices=0` on a CPU: 1 where the extension computes this run's convolutions, else 0 (runtime's
    default, one host device per two cores).

    XLA's SPMD partitioner cannot split the extension's calls over devices:
    it gathers the batch and runs each call whole on every device, so two
    devices did twice the work (ResNet-20 on 2 cores: 470 against 930
    images/s); oneDNN already spreads each call over every core. Call it
    before JAX's backend starts (it loads the extension, not the backend).
    """
    return 1 if onednn_in_force(kernels, compute_dtype(dtype, kernels, "cpu"), "cpu") else 0


def whole_batch(kernels: str, compute_dtype: str, platform: str | None = None) -> bool:
    """Whether a CPU step runs fastest on the whole batch in one call: with oneDNN's bf16 kernels (parts of 64
    were slower per image), not with XLA's or oneDNN's float32 ones (docs/devices.md)."""
    return compute_dtype == "bfloat16" and onednn_in_force(kernels, compute_dtype, platform)


@dataclasses.dataclass(frozen=True)
class _Interceptor:
    paths: tuple[str, ...]

    def __call__(self, next_fun, args, kwargs, context):
        if context.method_name == "__call__" and len(args) == 1:  # keywords: batch norm's use_running_average
            given = frozenset(k for k in _EXTRAS if kwargs.get(k) is not None and kwargs.get(k) is not False)
            rest = {k: v for k, v in kwargs.items() if k not in _EXTRAS or k in _VALUES and k in given}
            for name in self.paths:
                kinds, takes, applies, compute = PATHS[name]
                if type(context.module) in kinds and given == takes and applies(context.module, args[0], **rest):
                    return compute(context.module, args[0], **rest)
        return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`model.apply` with the fast paths `paths` in force; equal for equal models, so jit caches it."""

    model: nn.Module
    paths: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs) -> Any:
        if not self.paths:
            return self.model.apply(*args, **kwargs)
        with nn.intercept_methods(_Interceptor(self.paths)):
            return self.model.apply(*args, **kwargs)

    def init(self, *args, **kwargs) -> Any:
        with nn.intercept_methods(_Interceptor(self.paths)):
            return self.model.init(*args, **kwargs)


def apply_fn(model: nn.Module, kernels: str = "auto", platform: str | None = None) -> ModelApply:
    """The function to call instead of `model.apply` (and `.init(...)` instead of `model.init`)."""
    return ModelApply(model, resolve(kernels, platform))
