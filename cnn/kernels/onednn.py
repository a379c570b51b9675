"""nn.Conv and nn.Dense through oneDNN on CPUs, called from XLA through its FFI (cnn/kernels/onednn_ffi.cc); batch
norm through oneDNN or through the same extension's own loops.

XLA:CPU's bf16 products run at a fraction of what AVX512-BF16 and AMX give
through oneDNN. The C++ library is an optional extension built by
`pip install` (setup.py); when it or oneDNN's runtime is missing,
`available()` is False, `why_unavailable()` says why, and cnn/kernels keeps
to the XLA paths. Each function takes the bound Flax module and its input and
creates the parameters exactly as Flax does; the kernel is cast to the
compute dtype inside the custom VJP, so its gradient comes out of oneDNN's
float32 sums in the kernel's own dtype.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cnn.kernels.cpu as cpu  # a sibling module (the shared convolution test), not the package

DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Busy-wait checks an idle OpenMP thread makes before it sleeps, on a CPU with BF16_FLAGS: libgomp estimates 100,000
# a millisecond, so about 0.1 ms, long enough to span the gaps inside and between oneDNN's calls (_preload_onednn).
OPENMP_SPINS = 10_000
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo's names for the bf16 instructions oneDNN uses
# ONEDNN_MAX_CPU_ISA's values (oneDNN's names) that leave oneDNN no bf16 kernels, on any CPU.
ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
_TARGETS = {"ConvForward": "cnn_onednn_conv_forward", "ConvBackwardData": "cnn_onednn_conv_backward_data",
            "ConvBackwardWeights": "cnn_onednn_conv_backward_weights", "Matmul": "cnn_onednn_matmul",
            "MatmulBias": "cnn_onednn_matmul_bias", "AvgPool": "cnn_onednn_avg_pool",
            "NormForward": "cnn_onednn_norm_forward", "NormBackward": "cnn_onednn_norm_backward",
            "NormReluForward": "cnn_onednn_norm_relu_forward", "NormReluBackward": "cnn_onednn_norm_relu_backward",
            "ConvForwardAdd": "cnn_onednn_conv_forward_add", "LoopsNormForward": "cnn_loops_norm_forward",
            "LoopsNormBackward": "cnn_loops_norm_backward",
            "LoopsMaxPoolForward": "cnn_loops_max_pool_forward", "LoopsMaxPoolBackward": "cnn_loops_max_pool_backward"}


def _extension_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_onednn_ffi" + suffix)
        if os.path.exists(path):
            return path
    return None


def _preload_onednn() -> None:
    """Loads libdnnl.so.3 from the environment's lib/ (where the onednn-cpu-gomp wheel puts it) for the extension.

    An editable install leaves the extension in the source tree, so no rpath
    relative to it can reach the venv; loading the library globally first
    satisfies the extension's dependency wherever it lives.

    How its OpenMP threads wait (OMP_WAIT_POLICY and GOMP_SPINCOUNT, set here
    unless the environment sets either; libgomp reads them when this loads
    it). Sleeping at once costs a wake-up at every parallel region, and a bf16
    ResNet-20 step makes about 60 oneDNN calls: on a Zen 4, a spin of about
    0.1 ms ran it 1.06-1.15x and the bf16 Flax CNN 1.06x faster, but the
    float32 Flax CNN, whose steps interleave XLA's own multi-threaded loops,
    0.94x. So the threads spin where the CPU has bf16 instructions (there
    cnn's recipes compute in bf16, compute_dtype='auto') and sleep at once
    elsewhere (docs/performance.md). The spin is bounded: libgomp's default
    3 ms took the cores XLA's threads needed, and on a 2-core machine shared
    with other work the first step took 9-22 s against about 1 s. When
    libgomp's threads outnumber the cores, it cuts the spin to 1,000 itself.
    A CPU whose oneDNN is held below its bf16 kernels (ONEDNN_MAX_CPU_ISA,
    as experiments/benchmark.py --hold_isa sets it) waits as one without them.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        held = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()
        if cpu_flags() & BF16_FLAGS and held not in ISAS_WITHOUT_BF16:
            os.environ.update(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT=str(OPENMP_SPINS))
        else:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = os.path.join(prefix, "lib", "libdnnl.so.3")
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
    ctypes.CDLL("libdnnl.so.3", mode=ctypes.RTLD_GLOBAL)  # the system's, if any; OSError names it otherwise


@functools.cache
def _load() -> str:
    """Registers the FFI targets; returns '' when they are ready, else the reason they are not."""
    if os.environ.get("CNN_ONEDNN", "1") == "0":
        return "CNN_ONEDNN=0 in the environment"
    path = _extension_path()
    if path is None:
        return "the extension cnn/kernels/_onednn_ffi was not built (see docs/kernels.md)"
    try:
        _preload_onednn()
        lib = ctypes.CDLL(path)
    except OSError as e:
        return f"loading {os.path.basename(path)} failed: {e}"
    for symbol, target in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.cnn_onednn_record_choices(choices_file().encode())
    return ""


def choices_file() -> str:
    """The file recording which of oneDNN's implementations each convolution shape uses on this machine ('': none).

    Where several implementations take a shape, the extension times them at
    the shape's first call and keeps the fastest; they round differently, so
    a resumed run must use the one its first part used. Every process on the
    machine reads and extends this record, which also spares a rerun the
    timing. One file per CPU, thread count, instruction-set cap and build:
    $CNN_ONEDNN_CHOICES if set (empty: keep no record), else under
    ~/.cache/cnn/onednn/. An unwritable home keeps no record.
    """
    if "CNN_ONEDNN_CHOICES" in os.environ:
        return os.environ["CNN_ONEDNN_CHOICES"]
    identity = "|".join([_cpuinfo("model name"), " ".join(sorted(cpu_flags())), str(os.cpu_count()),
                         *(os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS")),
                         str(os.path.getmtime(_extension_path()))])
    folder = os.path.join(os.path.expanduser("~"), ".cache", "cnn", "onednn")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return ""
    return os.path.join(folder, hashlib.sha256(identity.encode()).hexdigest()[:16] + ".tsv")


def available() -> bool:
    """Whether the oneDNN FFI targets are registered and usable."""
    return not _load()


@functools.cache
def has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels of its own on this CPU for every layer it takes, asked of oneDNN itself
    (it creates the primitives; cnn_onednn_bf16_supported in onednn_ffi.cc). An AVX2-only CPU has none."""
    if not available():
        return False
    probe = getattr(ctypes.CDLL(_extension_path()), "cnn_onednn_bf16_supported", None)
    if probe is None:  # an extension built before the probe: rebuild with pip install -e .
        return False
    return bool(probe())


def _cpuinfo(field: str) -> str:
    """The first processor's `field` in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The processor's instruction-set flags, from /proc/cpuinfo (empty where there is none)."""
    return set(_cpuinfo("flags").split())


def missing_bf16() -> str:
    """Which instruction sets this CPU lacks for oneDNN's bf16 kernels, in words, for an error message."""
    flags = cpu_flags()
    if not flags & {"avx512f", "avx512_core"}:
        return "it has no AVX-512 (AVX2 only), and no AVX512-BF16 or AMX-BF16"
    return ("oneDNN found no bf16 kernels for it (no AVX512-BF16 or AMX-BF16 in its flags)" if not flags & BF16_FLAGS
            else "oneDNN found no bf16 kernels for it")


def why_unavailable() -> str:
    return _load()


def _compute_dtype(module: nn.Module, x: jax.Array, *params: jax.Array | None,
                   names: tuple[str, ...] = ("kernel", "bias")) -> jnp.dtype:
    """The dtype Flax's promote_dtype gives the layer's input and parameters (as passed in, or as stored under
    `names`)."""
    if module.dtype is not None:
        return jnp.dtype(module.dtype)
    if not params:  # before the layer runs: its stored parameters, which a step may have cast to bf16
        params = tuple(module.get_variable("params", name) for name in names)
    dtypes = [p.dtype for p in params if p is not None] or [module.param_dtype]
    return jnp.dtype(jnp.result_type(x.dtype, *dtypes))


# --- Convolutions ---------------------------------------------------------------


def conv_applies(module: nn.Conv, x: jax.Array, dtypes=DTYPES) -> bool:
    """A batched 1-D or 2-D convolution, grouped (depthwise) or not, without dilation or masks, SAME, VALID or
    explicit non-negative pads, in a dtype of `dtypes`."""
    return (available() and cpu.plain_conv(module, groups=True, padded=True) and len(module.kernel_size) in (1, 2)
            and x.ndim == len(module.kernel_size) + 2 and _compute_dtype(module, x) in dtypes)


def _geometry(module: nn.Conv, spatial: tuple[int, ...]):
    """(strides, pads, output size) of the convolution as a 2-D one (a 1-D one over (1, width))."""
    rank, size = len(module.kernel_size), tuple(module.kernel_size)
    strides = (module.strides,) * rank if isinstance(module.strides, int) else tuple(module.strides or (1,) * rank)
    if rank == 1:
        spatial, size, strides = (1, *spatial), (1, *size), (1, *strides)
    explicit = cpu.explicit_pads(module)
    if explicit is None:
        pads = lax.padtype_to_pads(spatial, size, strides, module.padding)
    else:
        pads = [(0, 0)] * (2 - rank) + explicit
    out = tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(spatial, size, strides, pads))
    return strides, pads, out


def conv_pool_applies(module: nn.Conv, x: jax.Array, avg_pool: tuple[int, ...] = (), dtypes=DTYPES) -> bool:
    """`conv_applies`, for a 2-D convolution followed by a 2-D average pool (windows that tile its output, rows and
    columns past the last whole window dropped, as VALID drops them)."""
    return conv_applies(module, x, dtypes) and len(module.kernel_size) == 2 and len(avg_pool) == 2


def conv(module: nn.Conv, x: jax.Array, relu: bool = False, with_input: bool = False,
         avg_pool: tuple[int, ...] | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """nn.Conv's output with oneDNN computing the convolution, its bias and both gradients; with `relu`, cnn's
    Conv(...)(x, relu=True): relu applied in the convolution's own pass (a oneDNN post-op), which saves XLA a pass
    over the output each way (the Flax CNN's 28x28x32 relu took ~1 of its ~12 ms bf16 step).

    With `with_input`, cnn's Conv(...)(x, with_input=True): (output, x), x a
    residual block's shortcut. Where the convolution has stride 1 and one
    group, its backward pass computes the input gradient as the forward
    convolution of the output gradient with the flipped kernel, with the
    shortcut's gradient added in the same oneDNN call (a binary post-op);
    autodiff's separate add was one more pass over three activations.

    With `avg_pool` (and `relu`), cnn's Conv(...)(x, relu=True,
    avg_pool=window): the output average-pooled by oneDNN, and in the
    backward pass the pool's gradient (a broadcast) and relu's (a select)
    one fused XLA pass (`conv_pool_applies`).
    """
    strides, pads, out = _geometry(module, x.shape[1:-1])
    kernel = module.param("kernel", module.kernel_init,
                          (*module.kernel_size, x.shape[-1] // module.feature_group_count, module.features),
                          module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    dtype = _compute_dtype(module, x, kernel, bias)
    bias = jnp.zeros((module.features,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    inputs, x = x, x.astype(dtype)
    rank = len(module.kernel_size)
    if rank == 1:  # as a 2-D convolution over (1, width)
        x, kernel = x[:, None], kernel[None]
    # Rows a strided VALID window never reaches: cut them off, as oneDNN takes no negative padding.
    ends = [(o - 1) * s + k - lo for o, k, s, (lo, _) in zip(out, kernel.shape[:2], strides, pads)]
    pads_lo = (pads[0][0], pads[1][0])
    if avg_pool is not None:
        return _conv_relu_pool(x[:, :ends[0], :ends[1]], kernel, bias, strides, pads_lo, out, tuple(avg_pool))
    if (with_input and strides == (1, 1) and module.feature_group_count == 1 and rank == 2
            and inputs.dtype == x.dtype and all(lo < k and hi < k for (lo, hi), k in zip(pads, kernel.shape[:2]))):
        return _conv_tied(x, kernel, bias, pads_lo, out)
    y = _conv(x[:, :ends[0], :ends[1]], kernel, bias, strides, pads_lo, out, relu)
    y = y[:, 0] if rank == 1 else y
    return (y, inputs) if with_input else y


def _conv_attrs(strides, pads_lo) -> dict:
    return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pads_lo[0]), pl=np.int64(pads_lo[1]))


def _conv_forward(x, w, bias, strides, pads_lo, out, relu):
    y = jax.ShapeDtypeStruct((x.shape[0], *out, w.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(_TARGETS["ConvForward"], y)(x, w, bias, **_conv_attrs(strides, pads_lo),
                                                          relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv(x, kernel, bias, strides, pads_lo, out, relu):
    return _conv_forward(x, kernel.astype(x.dtype), bias, strides, pads_lo, out, relu)


def _conv_fwd(x, kernel, bias, strides, pads_lo, out, relu):
    w = kernel.astype(x.dtype)
    y = _conv_forward(x, w, bias, strides, pads_lo, out, relu)
    return y, (x, w, kernel, y if relu else None)


def _conv_bwd(strides, pads_lo, out, relu, residuals, g):
    x, w, kernel, y = residuals
    g = g.astype(x.dtype)
    if relu:  # relu's gradient, from its output, as cnn's relu takes it
        g = jnp.where(y > 0, g, jnp.zeros_like(g))
    return _conv_grads(x, w, kernel, g, strides, pads_lo)


def _conv_grads(x, w, kernel, g, strides, pads_lo):
    """The input, kernel and bias gradients from the output's, g."""
    d_x = jax.ffi.ffi_call(_TARGETS["ConvBackwardData"], jax.ShapeDtypeStruct(x.shape, x.dtype))(
        g, w, **_conv_attrs(strides, pads_lo))
    return (d_x, *_weight_grads(x, w, kernel, g, strides, pads_lo))


def _weight_grads(x, w, kernel, g, strides, pads_lo):
    """The kernel (in the parameter's dtype) and bias gradients from the output's, g."""
    d_w, d_bias = jax.ffi.ffi_call(
        _TARGETS["ConvBackwardWeights"],
        (jax.ShapeDtypeStruct(w.shape, jnp.float32), jax.ShapeDtypeStruct(w.shape[-1:], jnp.float32)))(
        x, g, **_conv_attrs(strides, pads_lo))
    return d_w.astype(kernel.dtype), d_bias


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv_relu_pool(x, kernel, bias, strides, pads_lo, out, window):
    """avg_pool(relu(conv(x))) over windows that tile the output."""
    return _conv_relu_pool_fwd(x, kernel, bias, strides, pads_lo, out, window)[0]


def _conv_relu_pool_fwd(x, kernel, bias, strides, pads_lo, out, window):
    w = kernel.astype(x.dtype)
    y = _conv_forward(x, w, bias, strides, pads_lo, out, True)
    n, h, w_, c = y.shape
    pooled = (n, h // window[0], w_ // window[1], c)
    return _pool_call(y[:, :pooled[1] * window[0], :pooled[2] * window[1]], pooled, False), (x, w, kernel, y)


def _conv_relu_pool_bwd(strides, pads_lo, out, window, residuals, g):
    """The pool's gradient, g / window size broadcast over each window, through relu's select: XLA fuses the two
    into one pass over the output (oneDNN's pool gradient then XLA's select were two, 2x as long in bf16)."""
    x, w, kernel, y = residuals
    (n, h, w_, c), (wh, ww) = g.shape, window
    # g / window size in float32 (as oneDNN's pool gradient), broadcast over each window, the select, then the
    # rounding: XLA fuses all of it into the one pass over the output
    g = g.astype(jnp.float32) / (wh * ww)
    pooled = y[:, :h * wh, :w_ * ww].reshape(n, h, wh, w_, ww, c)
    g = jnp.where(pooled > 0, g[:, :, None, :, None, :], 0.0).astype(x.dtype).reshape(n, h * wh, w_ * ww, c)
    g = jnp.pad(g, ((0, 0), (0, y.shape[1] - h * wh), (0, y.shape[2] - w_ * ww), (0, 0)))  # rows no window took
    return _conv_grads(x, w, kernel, g, strides, pads_lo)


_conv_relu_pool.defvjp(_conv_relu_pool_fwd, _conv_relu_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_tied(x, kernel, bias, pads_lo, out):
    """(conv(x), x), stride 1: the second output's gradient joins x's in the backward convolution's own call."""
    return _conv_tied_fwd(x, kernel, bias, pads_lo, out)[0]


def _conv_tied_fwd(x, kernel, bias, pads_lo, out):
    w = kernel.astype(x.dtype)
    return (_conv_forward(x, w, bias, (1, 1), pads_lo, out, False), x), (x, w, kernel)


def _conv_tied_bwd(pads_lo, out, residuals, cotangents):
    x, w, kernel = residuals
    g, g_x = (c.astype(x.dtype) for c in cotangents)
    # dx = the stride-1 convolution's transpose: g convolved with the kernel flipped and its channels swapped, padded
    # by what the forward padding left of each window; g_x added as oneDNN writes it
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pads_t = tuple(k - 1 - lo for k, lo in zip(w.shape[:2], pads_lo))
    d_x = jax.ffi.ffi_call(_TARGETS["ConvForwardAdd"], jax.ShapeDtypeStruct(x.shape, x.dtype))(
        g, flipped, jnp.zeros(x.shape[-1:], jnp.float32), g_x, **_conv_attrs((1, 1), pads_t), relu=np.int64(0))
    return (d_x, *_weight_grads(x, w, kernel, g, (1, 1), pads_lo))


_conv_tied.defvjp(_conv_tied_fwd, _conv_tied_bwd)


# --- Dense layers -----------------------------------------------------------------


def dense_applies(module: nn.Dense, x: jax.Array, dtypes=DTYPES) -> bool:
    return (available() and module.dot_general is None and module.dot_general_cls is None and x.ndim >= 2
            and _compute_dtype(module, x) in dtypes)


def dense(module: nn.Dense, x: jax.Array) -> jax.Array:
    """nn.Dense's output with oneDNN computing the product (bias fused) and both gradients' products."""
    kernel = module.param("kernel", module.kernel_init, (x.shape[-1], module.features), module.param_dtype)
    bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype) if module.use_bias else None
    dtype = _compute_dtype(module, x, kernel, bias)
    rows = x.reshape(-1, x.shape[-1]).astype(dtype)
    y = _dense(rows, kernel) if bias is None else _dense_bias(rows, kernel, bias.astype(jnp.float32))
    return y.reshape(*x.shape[:-1], module.features)


def _matmul(a, b, out_dtype, trans_a=False, trans_b=False, bias=None):
    rows = a.shape[1] if trans_a else a.shape[0]
    cols = b.shape[0] if trans_b else b.shape[1]
    name, args = ("MatmulBias", (a, b, bias)) if bias is not None else ("Matmul", (a, b))
    return jax.ffi.ffi_call(_TARGETS[name], jax.ShapeDtypeStruct((rows, cols), out_dtype))(
        *args, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


def _dense_grads(x, w, kernel, g):
    """The input, kernel and bias gradients; oneDNN writes the kernel's in the kernel's own dtype (f32 sums), except
    from float32 inputs, which it cannot round into a bf16 kernel's gradient (Flax's average pool with SAME padding
    hands a bf16 model float32): then in float32, cast after."""
    g = g.astype(x.dtype)
    d_x = _matmul(g, w, x.dtype, trans_b=True)
    d_w = _matmul(x, g, kernel.dtype if x.dtype == jnp.bfloat16 else jnp.float32, trans_a=True)
    return d_x, d_w.astype(kernel.dtype), g.astype(jnp.float32).sum(0)


@jax.custom_vjp
def _dense(x, kernel):
    return _matmul(x, kernel.astype(x.dtype), x.dtype)


def _dense_fwd(x, kernel):
    w = kernel.astype(x.dtype)
    return _matmul(x, w, x.dtype), (x, w, kernel)


def _dense_bwd(residuals, g):
    return _dense_grads(*residuals, g)[:2]


_dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def _dense_bias(x, kernel, bias):
    return _matmul(x, kernel.astype(x.dtype), x.dtype, bias=bias)


def _dense_bias_fwd(x, kernel, bias):
    w = kernel.astype(x.dtype)
    return _matmul(x, w, x.dtype, bias=bias), (x, w, kernel)


def _dense_bias_bwd(residuals, g):
    return _dense_grads(*residuals, g)


_dense_bias.defvjp(_dense_bias_fwd, _dense_bias_bwd)


# --- Average pools whose windows tile the input ----------------------------------


def avg_pool_applies(module, x: jax.Array, dtypes=DTYPES) -> bool:
    """A 2-D average pool with windows equal to its strides that cover the input ('same') or drop a remainder."""
    return (available() and module.kind == "avg" and x.ndim == 4 and tuple(module.window) == tuple(module.strides)
            and isinstance(module.padding, str) and (module.padding == "VALID" or all(n % w == 0 for n, w in zip(x.shape[1:3], module.window)))
            and x.dtype in dtypes)


def avg_pool(module, x: jax.Array) -> jax.Array:
    """The pool through oneDNN; its backward pass too (XLA:CPU's reduction and broadcast were the slow parts)."""
    (wh, ww) = module.window
    return _avg_pool(x[:, :x.shape[1] // wh * wh, :x.shape[2] // ww * ww], (wh, ww))


def _pool_call(g, out_shape, backward):
    return jax.ffi.ffi_call(_TARGETS["AvgPool"], jax.ShapeDtypeStruct(out_shape, g.dtype))(
        g, backward=np.int64(backward))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool(x, window):
    return _pool_call(x, (x.shape[0], x.shape[1] // window[0], x.shape[2] // window[1], x.shape[3]), False)


def _avg_pool_fwd(x, window):
    return _avg_pool(x, window), None


def _avg_pool_bwd(window, _, g):
    n, h, w, c = g.shape
    return (_pool_call(g, (n, h * window[0], w * window[1], c), True),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def max_pool_applies(module, x: jax.Array) -> bool:
    """A 2-D max pool whose windows overlap or skip pixels (ResNet-50's 3x3, stride 2); windows that tile the input
    take cpu.tiled_pool."""
    return (available() and module.kind == "max" and x.ndim == 4 and len(module.window) == 2
            and tuple(module.window) != tuple(module.strides) and x.dtype in DTYPES
            and (isinstance(module.padding, str) or all(lo >= 0 and hi >= 0 for lo, hi in module.padding)))


def max_pool(module, x: jax.Array) -> jax.Array:
    """Flax's max pool through the extension's loops, both ways: XLA:CPU's (in bf16 a slow reduce-window forward;
    backward, a reduce-window over value and index pairs, then a scatter) took 14% of ResNet-50's bf16 step."""
    pads = (lax.padtype_to_pads(x.shape[1:3], module.window, module.strides, module.padding)
            if isinstance(module.padding, str) else module.padding)
    window = (*module.window, *module.strides, pads[0][0], pads[1][0])
    out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(x.shape[1:3], module.window, module.strides, pads)]
    return _max_pool(x, window, tuple(out))


def _max_pool_attrs(window) -> dict:
    return {name: np.int64(v) for name, v in zip(("wh", "ww", "sh", "sw", "pt", "pl"), window)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, out):
    shape = jax.ShapeDtypeStruct((x.shape[0], *out, x.shape[3]), x.dtype)
    return jax.ffi.ffi_call(_TARGETS["LoopsMaxPoolForward"], shape)(x, **_max_pool_attrs(window))


def _max_pool_fwd(x, window, out):
    y = _max_pool(x, window, out)
    return y, (x, y)


def _max_pool_bwd(window, out, residuals, g):
    """Each window's gradient to the first input equal to its maximum (row-major), as XLA's select-and-scatter."""
    x, y = residuals
    return (jax.ffi.ffi_call(_TARGETS["LoopsMaxPoolBackward"], jax.ShapeDtypeStruct(x.shape, x.dtype))(
        x, y, g.astype(x.dtype), **_max_pool_attrs(window)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- Batch norm in training ---------------------------------------------------------


def batch_norm_applies(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                       mask: jax.Array | None = None, dtypes=DTYPES) -> bool:
    """Training-mode batch norm as cpu.batch_norm takes it, whose output keeps the input's dtype (f32 or bf16):
    oneDNN normalises into a buffer of the input's type. Only where oneDNN has JIT kernels for the channel count
    (bf16: multiples of 16): elsewhere its generic loops ran 20x slower than XLA's batch norm."""
    return (available() and cpu.batch_norm_applies(module, x, use_running_average, mask) and x.dtype in dtypes
            and _compute_dtype(module, x, names=("scale", "bias")) == x.dtype and norm_jit(x.shape[-1], x.dtype))


@functools.cache
def norm_jit(channels: int, dtype) -> bool:
    """Whether oneDNN's batch norm of `channels` channels in `dtype` runs JIT kernels in both passes, asked of oneDNN
    (cnn_onednn_norm_jit in onednn_ffi.cc)."""
    if not available():
        return False
    probe = getattr(ctypes.CDLL(_extension_path()), "cnn_onednn_norm_jit", None)
    return bool(probe and probe(ctypes.c_int64(channels), int(jnp.dtype(dtype) == jnp.bfloat16)))


def batch_norm(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """nn.BatchNorm in training with oneDNN computing the statistics, the normalisation and the gradients, each in
    one pass over the activations on every core (XLA:CPU's loops for them ran on one; docs/kernels.md).

    The statistics are oneDNN's, in float32: the mean, and the variance as the mean of squared deviations (Flax
    takes E[x^2] - E[x]^2), so results agree with Flax's to float rounding. The running averages are Flax's.
    """
    epsilon = float(module.epsilon)
    return cpu.batch_norm_with(module, x, lambda x, scale, bias: _norm(x, scale, bias, epsilon, False, False))


def batch_norm_relu_applies(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                            mask: jax.Array | None = None, dtypes=DTYPES) -> bool:
    """`batch_norm_applies`, where oneDNN also has JIT kernels for the fused relu."""
    return batch_norm_applies(module, x, use_running_average, mask, dtypes=dtypes) and _relu_workspace(x) > 0


def batch_norm_relu(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                    mask: jax.Array | None = None) -> jax.Array:
    """relu(batch_norm(module, x)) in one oneDNN pass each way (fuse_norm_relu): the separate relu and its gradient
    were two more passes over the activations."""
    epsilon = float(module.epsilon)
    return cpu.batch_norm_with(module, x, lambda x, scale, bias: _norm(x, scale, bias, epsilon, True, False))


def batch_norm_loops_applies(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                             mask: jax.Array | None = None, dtypes=DTYPES) -> bool:
    """Training-mode batch norm as cpu.batch_norm takes it, in a dtype of `dtypes`, on any channel count."""
    return (available() and cpu.batch_norm_applies(module, x, use_running_average, mask) and x.dtype in dtypes
            and _compute_dtype(module, x, names=("scale", "bias")) == x.dtype)


def batch_norm_loops(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                     mask: jax.Array | None = None, relu: int = 0) -> jax.Array:
    """nn.BatchNorm in training (then relu, with `relu` 1 or True; relu6 with 6) through the extension's own
    loops: two passes over the activations each way, on every core, where oneDNN's make three forward and ran at
    half their speed on ResNet-20's 16-64 channels (docs/kernels.md). Statistics as Flax takes them (E[x^2] - E[x]^2, summed in
    float32 blocks joined in float64); running averages Flax's."""
    epsilon = float(module.epsilon)
    return cpu.batch_norm_with(module, x, lambda x, scale, bias: _norm(x, scale, bias, epsilon, relu, True))


def batch_norm_relu_loops(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                          mask: jax.Array | None = None) -> jax.Array:
    """relu(batch_norm(module, x)) in the same two passes each way as `batch_norm_loops`."""
    return batch_norm_loops(module, x, use_running_average, mask, relu=True)


def batch_norm_relu6_loops(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                           mask: jax.Array | None = None) -> jax.Array:
    """relu6(batch_norm(module, x)) in the same two passes each way (MobileNetV2's 35 batch norms)."""
    return batch_norm_loops(module, x, use_running_average, mask, relu=6)


def _relu_workspace(x: jax.Array) -> int:
    """The bytes oneDNN keeps for the fused relu's backward pass (0: no JIT kernels for it)."""
    rows = int(np.prod(x.shape[:-1]))
    return _relu_workspace_bytes(rows, x.shape[-1], jnp.dtype(x.dtype) == jnp.bfloat16)


@functools.cache
def _relu_workspace_bytes(rows: int, channels: int, bf16: bool) -> int:
    if not available():
        return 0
    probe = getattr(ctypes.CDLL(_extension_path()), "cnn_onednn_norm_relu_workspace", None)
    if probe is None:
        return 0
    probe.restype = ctypes.c_int64
    return int(probe(ctypes.c_int64(rows), ctypes.c_int64(channels), int(bf16)))


def _norm_forward(x, scale, bias, epsilon, relu, loops):
    stats = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    outputs = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if loops:  # x stands in for the residual the loops then do not read
        return jax.ffi.ffi_call(_TARGETS["LoopsNormForward"], outputs)(
            x, scale, bias, x, epsilon=np.float32(epsilon), relu=np.int64(relu), add=np.int64(0))
    if relu:
        outputs += (jax.ShapeDtypeStruct((_relu_workspace(x),), jnp.uint8),)
    return jax.ffi.ffi_call(_TARGETS["NormReluForward" if relu else "NormForward"], outputs)(
        x, scale, bias, epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, epsilon, relu, loops):
    return _norm_forward(x, scale, bias, epsilon, relu, loops)[:3]


def _norm_fwd(x, scale, bias, epsilon, relu, loops):
    y, mean, var, *workspace = _norm_forward(x, scale, bias, epsilon, relu, loops)
    return (y, mean, var), (x, mean, var, scale, bias, workspace)


def _norm_bwd(epsilon, relu, loops, residuals, cotangents):
    """The input, scale and shift gradients; the statistics' cotangents are ignored, as they only feed the
    running averages, which `batch_norm` takes through stop_gradient. After a fused relu oneDNN zeroes the
    gradients of the outputs it zeroed, from the forward pass's workspace; the loops recompute which from x."""
    x, mean, var, scale, bias, workspace = residuals
    channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    data = jax.ShapeDtypeStruct(x.shape, x.dtype)
    scale32, g = scale.astype(jnp.float32), cotangents[0].astype(x.dtype)
    if loops:  # no residual gradient: an empty one; x stands in for the output they do not read
        d_x, _, d_scale, d_bias = jax.ffi.ffi_call(
            _TARGETS["LoopsNormBackward"], (data, jax.ShapeDtypeStruct((0,), x.dtype), channels, channels))(
            x, mean, var, scale32, bias.astype(jnp.float32), g, x, epsilon=np.float32(epsilon), relu=np.int64(relu),
            add=np.int64(0))
    else:
        d_x, d_scale, d_bias = jax.ffi.ffi_call(_TARGETS["NormReluBackward" if relu else "NormBackward"],
                                                (data, channels, channels))(
            x, mean, var, scale32, g, *workspace, epsilon=np.float32(epsilon))
    return d_x, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_norm.defvjp(_norm_fwd, _norm_bwd)


def batch_norm_add_relu_applies(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                                mask: jax.Array | None = None, residual: jax.Array | None = None,
                                dtypes=DTYPES) -> bool:
    """`batch_norm_loops_applies`, with a residual of the input's shape and dtype."""
    return (residual is not None and residual.shape == x.shape and residual.dtype == x.dtype
            and batch_norm_loops_applies(module, x, use_running_average, mask, dtypes=dtypes))


def batch_norm_add_relu_loops(module: nn.BatchNorm, x: jax.Array, use_running_average: bool | None = None,
                              mask: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
    """relu(batch_norm(module, x) + residual), a residual block's end, in the loops' two passes each way: the add,
    the relu and the relu's gradient were three more passes in XLA (oneDNN has no CPU kernel for them fused)."""
    epsilon = float(module.epsilon)
    return cpu.batch_norm_with(module, x, lambda x, scale, bias: _norm_add_relu(x, scale, bias, residual, epsilon))


def _norm_add_relu_forward(x, scale, bias, residual, epsilon):
    stats = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    return jax.ffi.ffi_call(_TARGETS["LoopsNormForward"], (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats))(
        x, scale.astype(jnp.float32), bias.astype(jnp.float32), residual, epsilon=np.float32(epsilon),
        relu=np.int64(1), add=np.int64(1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _norm_add_relu(x, scale, bias, residual, epsilon):
    return _norm_add_relu_forward(x, scale, bias, residual, epsilon)


def _norm_add_relu_fwd(x, scale, bias, residual, epsilon):
    y, mean, var = _norm_add_relu_forward(x, scale, bias, residual, epsilon)
    return (y, mean, var), (x, mean, var, scale, bias, y)


def _norm_add_relu_bwd(epsilon, residuals, cotangents):
    """As `_norm_bwd`; the residual's gradient is the relu's, the output's where the output is positive."""
    x, mean, var, scale, bias, y = residuals
    channels = jax.ShapeDtypeStruct(x.shape[-1:], jnp.float32)
    data = jax.ShapeDtypeStruct(x.shape, x.dtype)
    d_x, d_residual, d_scale, d_bias = jax.ffi.ffi_call(_TARGETS["LoopsNormBackward"], (data, data, channels, channels))(
        x, mean, var, scale.astype(jnp.float32), bias.astype(jnp.float32), cotangents[0].astype(x.dtype), y,
        epsilon=np.float32(epsilon), relu=np.int64(1), add=np.int64(1))
    return d_x, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype), d_residual


_norm_add_relu.defvjp(_norm_add_relu_fwd, _norm_add_relu_bwd)
