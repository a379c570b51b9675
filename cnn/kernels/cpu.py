"""Fast paths for Flax layers where XLA:CPU's own code is slow, with the same parameters and results.

Each function takes the bound Flax module and its input, creates the
module's parameters exactly as Flax does (names, shapes, initialisers,
dtypes) and computes the same output another way. cnn/kernels chooses when
they apply; docs/kernels.md describes each path and docs/performance.md
links the figures behind them.
"""

from __future__ import annotations

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


# --- One-channel convolutions as patches times kernel --------------------------


def _ones(value) -> bool:
    """Whether a Flax dilation (None, an int or one per axis) leaves the convolution undilated."""
    return value is None or all(v == 1 for v in ((value,) if isinstance(value, int) else value))


def plain_conv(module: nn.Conv, groups: bool = False, padded: bool = False) -> bool:
    """An nn.Conv without dilation or masks, 'SAME' or 'VALID' (or, if `padded`, explicit pads of zero or more
    pixels, as torchvision's and Keras' ResNet-50 give), and without groups unless `groups`: what the fast paths
    compute.

    cnn's layers pass dilations as tuples, (1, 1) where there is none.
    """
    return ((module.feature_group_count == 1 or groups) and module.shared_weights and module.mask is None
            and (module.padding in ("SAME", "VALID") or padded and explicit_pads(module) is not None)
            and isinstance(module.kernel_size, (tuple, list))
            and _ones(module.input_dilation) and _ones(module.kernel_dilation))


def explicit_pads(module: nn.Conv) -> list[tuple[int, int]] | None:
    """The module's explicit (low, high) zero pads per spatial axis, all >= 0; None for a string padding
    ('SAME', 'CIRCULAR', ...) or a negative pad."""
    if isinstance(module.padding, str) or not isinstance(module.kernel_size, (tuple, list)):
        return None
    try:
        pads = nn.linear.canonicalize_padding(module.padding, len(module.kernel_size))
    except (TypeError, ValueError):
        return None
    pads = [(int(lo), int(hi)) for lo, hi in pads]
    return pads if all(lo >= 0 and hi >= 0 for lo, hi in pads) else None


def patches_conv_applies(module: nn.Conv, x: jax.Array) -> bool:
    """A plain convolution of a one-channel input, such as a grey image's or a series' first layer (any rank)."""
    return x.shape[-1] == 1 and x.ndim == len(module.kernel_size) + 2 and plain_conv(module)


def patches_conv(module: nn.Conv, x: jax.Array) -> jax.Array:
    """nn.Conv on a one-channel input as one matrix product: XLA:CPU contracts over only the taps otherwise."""
    rank = len(module.kernel_size)
    strides = (module.strides,) * rank if isinstance(module.strides, int) else tuple(module.strides or (1,) * rank)
    kernel = module.param("kernel", module.kernel_init, (*module.kernel_size, 1, module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    if bias is None:
        bias = jnp.zeros((module.features,), kernel.dtype)  # adding zeros compiles away
    pads = lax.padtype_to_pads(x.shape[1:-1], module.kernel_size, strides, module.padding)
    return _patches_conv(x, kernel.reshape(-1, module.features), bias, tuple(module.kernel_size), strides,
                         tuple(map(tuple, pads)), module.precision)


def _taps(x: jax.Array, window, strides, pads) -> list[jax.Array]:
    """Per window offset, the pixels of a one-channel input that offset sees at each output position."""
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], window, strides)]
    return [x[(slice(None), *(slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offset, out, strides)))]
            for offset in itertools.product(*map(range, window))]


def _patch_matrix(x: jax.Array, window, strides, pads) -> jax.Array:
    """A one-channel input's patches, (N, *out, taps)."""
    return jnp.concatenate(_taps(x, window, strides, pads), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _patches_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, window, strides, pads, precision) -> jax.Array:
    return jnp.dot(_patch_matrix(x, window, strides, pads), kernel, precision=precision) + bias


def _patches_conv_fwd(x, kernel, bias, window, strides, pads, precision):
    return _patches_conv(x, kernel, bias, window, strides, pads, precision), (x, kernel)


def _patches_conv_bwd(window, strides, pads, precision, residuals, g):
    """Kernel and bias gradients from one product: (taps + a row of ones, positions) @ (positions, features).

    Autodiff would transpose the output gradient (the layer's largest array)
    and sum it for the bias in a reduction XLA:CPU runs as a serial loop per
    channel; stacking the taps tap-major with a row of ones reads it once.
    """
    x, kernel = residuals
    taps = [t.reshape(-1) for t in _taps(x, window, strides, pads)]
    taps = jnp.stack([*taps, jnp.ones_like(taps[0])])
    d_kernel_and_bias = jnp.dot(taps, g.reshape(-1, g.shape[-1]), precision=precision)
    _, patches_vjp = jax.vjp(lambda x: _patch_matrix(x, window, strides, pads), x)
    d_x, = patches_vjp(jnp.dot(g, kernel.T, precision=precision))
    return d_x, d_kernel_and_bias[:-1], d_kernel_and_bias[-1]


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


# --- Dense layers with the input gradient from a transposed kernel -------------


def dense_applies(module: nn.Dense, x: jax.Array) -> bool:
    return module.dot_general is None and module.dot_general_cls is None


def dense(module: nn.Dense, x: jax.Array) -> jax.Array:
    """nn.Dense, with a backward pass that multiplies by an explicitly transposed kernel."""
    kernel = module.param("kernel", module.kernel_init, (x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = _matmul(x, kernel, module.precision)
    return y if bias is None else y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    return jnp.dot(x, kernel, precision=precision)


def _matmul_fwd(x, kernel, precision):
    return _matmul(x, kernel, precision), (x, kernel)


def _matmul_bwd(precision, residuals, g):
    """The input's gradient as g times kernel.T made row-major first.

    Autodiff contracts g with the kernel's minor axis in place, which
    XLA:CPU runs slower than a product with a row-major operand; the barrier
    keeps XLA from folding the transpose back in.
    """
    x, kernel = residuals
    d_x = jnp.dot(g, lax.optimization_barrier(kernel.T), precision=precision)
    rows = lambda a: a.reshape(-1, a.shape[-1])
    return d_x, jnp.dot(rows(x).T, rows(g), precision=precision)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# --- Pools whose windows tile the input --------------------------------------


def tiled_pool_applies(module, x: jax.Array) -> bool:
    """Windows equal to the strides that cover the input exactly ('same'), or drop a remainder ('valid')."""
    return module.window == module.strides and isinstance(module.padding, str) and (module.padding == "VALID" or all(
        size % w == 0 for size, w in zip(x.shape[1:-1], module.window)))


def tiled_pool(module, x: jax.Array) -> jax.Array:
    """The pool as a reshape and a reduction: its backward pass is a broadcast, not XLA's slow window scatter."""
    spatial = [size // w for size, w in zip(x.shape[1:-1], module.window)]
    x = x[(slice(None), *(slice(0, n * w) for n, w in zip(spatial, module.window)))]  # 'valid' drops the rest
    shape = [x.shape[0]]
    for n, w in zip(spatial, module.window):
        shape += [n, w]
    x = x.reshape(*shape, x.shape[-1])
    axes = tuple(range(2, 2 * len(spatial) + 1, 2))
    return x.max(axis=axes) if module.kind == "max" else x.mean(axis=axes)


# --- Batch norm's sums as matrix products ----------------------------------------


def batch_norm_applies(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                       mask: jax.Array | None = None) -> bool:
    """Training-mode batch norm over the last axis, as cnn's layers build it; evaluation stays Flax's own."""
    running = nn.module.merge_param("use_running_average", module.use_running_average, use_running_average)
    return (not running and mask is None and x.ndim >= 2 and module.axis in (-1, x.ndim - 1)
            and module.axis_name is None and module.use_bias and module.use_scale and module.use_fast_variance
            and module.force_float32_reductions)


def batch_norm(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """nn.BatchNorm in training, its per-channel sums forward and backward taken as products with a row of ones.

    XLA:CPU rewrites a long reduction into a tree of windowed reductions that
    run slowly; in configs/mnist.py's step they took a quarter of the time.
    Statistics and running averages are Flax's (E[x^2] - E[x]^2, in float32).
    """
    def normalise(x, scale, bias):
        dtype = module.dtype or jnp.result_type(x, scale, bias)
        return _batch_norm(x, scale, bias, module.epsilon, jnp.dtype(dtype))

    return batch_norm_with(module, x, normalise)


def batch_norm_with(module: nn.BatchNorm, x: jax.Array, normalise) -> jax.Array:
    """Training-mode nn.BatchNorm computed by `normalise(x, scale, bias) -> (y, batch mean, batch variance)`, with
    its parameters, statistics and running-average updates exactly as Flax makes them."""
    features = (x.shape[-1],)
    ra_mean = module.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = module.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = module.param("scale", module.scale_init, features, module.param_dtype)
    bias = module.param("bias", module.bias_init, features, module.param_dtype)
    y, mean, var = normalise(x, scale, bias)
    if not module.is_initializing():
        ra_mean.value = module.momentum * ra_mean.value + (1 - module.momentum) * lax.stop_gradient(mean)
        ra_var.value = module.momentum * ra_var.value + (1 - module.momentum) * lax.stop_gradient(var)
    return y


def _channel_sums(a: jax.Array) -> jax.Array:
    """Sums over every axis but the last, in float32: a row of ones times the rows of `a`."""
    rows = a.reshape(-1, a.shape[-1])
    return jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm(x, scale, bias, epsilon, dtype):
    return _batch_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
    x32 = x.astype(jnp.float32)
    count = x32.size // x32.shape[-1]
    mean = _channel_sums(x32) / count
    var = jnp.maximum(_channel_sums(x32 * x32) / count - mean * mean, 0.0)
    rstd = lax.rsqrt(var + epsilon)
    y = ((x32 - mean) * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)).astype(dtype)
    return (y, mean, var), (x, mean, rstd, scale, bias)


def _batch_norm_bwd(epsilon, dtype, residuals, cotangents):
    """The usual batch-norm gradient; the statistics' cotangents are ignored, as they only feed the running
    averages, which `batch_norm` takes through stop_gradient."""
    x, mean, rstd, scale, bias = residuals
    g = cotangents[0].astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    count = x32.size // x32.shape[-1]
    sum_g = _channel_sums(g)
    sum_g_xhat = rstd * (_channel_sums(g * x32) - mean * sum_g)
    d_x = (rstd * scale.astype(jnp.float32)) * (g - sum_g / count - (x32 - mean) * (rstd * sum_g_xhat / count))
    return d_x.astype(x.dtype), sum_g_xhat.astype(scale.dtype), sum_g.astype(bias.dtype)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
