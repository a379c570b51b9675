"""The oneDNN paths (cnn/kernels/onednn.py) against plain Flax: values, gradients, parameters, and real training."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn
from cnn import kernels, sharding
from cnn.kernels import onednn
from cnn.models.layers import BatchNorm, Pool
from conftest import REPO

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason=f"oneDNN extension unavailable: {onednn.why_unavailable()}")
# bf16 through oneDNN is tested wherever oneDNN has bf16 kernels for this CPU (it has none on an AVX2-only one).
needs_onednn_bf16 = pytest.mark.skipif(not onednn.has_bf16(), reason="oneDNN has no bf16 kernels on this CPU ("
                                       + ("extension unavailable" if not onednn.available() else "no AVX-512") + ")")

CASES = [
    ("Conv2D(32, 3, padding='same')", (3, 28, 28, 1)),
    ("Conv2D(16, 3, padding='same')", (2, 14, 14, 8)),
    ("Conv2D(6, 5)", (2, 13, 12, 3)),
    ("Conv2D(7, (3, 2), strides=(2, 3))", (3, 13, 11, 5)),  # VALID with rows the windows never reach
    ("Conv2D(5, 4, strides=2, padding='same')", (2, 13, 10, 4)),
    ("Conv2D(8, 3, use_bias=False)", (2, 9, 9, 3)),
    ("Conv1D(6, 5, strides=2, padding='same')", (3, 17, 4)),
    ("DepthwiseConv2D(3, padding='same')", (2, 9, 9, 8)),  # a group per channel (MobileNet's)
    ("DepthwiseConv2D(3, strides=2, depth_multiplier=2, use_bias=False)", (2, 11, 10, 4)),
    ("SeparableConv2D(8, 3, padding='same')", (2, 8, 8, 6)),
    ("Conv2D(6, 3, groups=3)", (2, 9, 9, 3)),
    ("Dense(10)", (5, 33)),
    ("Dense(7, use_bias=False)", (2, 5, 12)),
    ("AveragePooling2D(2)", (3, 28, 28, 8)),
    ("AveragePooling2D(2)", (2, 15, 13, 3)),  # 'valid' drops the last row and column
    ("AveragePooling2D(3, padding='same')", (2, 9, 6, 4)),
    # Explicit pads, as torchvision's and Keras' ResNet-50 give their convolutions (Flax modules: specs take
    # 'same' or 'valid' only).
    (nn.Conv(8, (7, 7), strides=2, padding=3), (2, 16, 15, 3)),
    (nn.Conv(6, (3, 2), strides=(2, 1), padding=((1, 2), (0, 3)), use_bias=False), (2, 9, 8, 4)),
    (nn.Conv(5, (1, 1), strides=2, padding=((0, 0), (0, 0))), (2, 9, 9, 4)),
    (nn.Conv(4, (3,), padding=((2, 1),)), (3, 10, 2)),
    # Overlapping max pools, through the extension's loops both ways (ResNet-50's and ResNet-18's).
    ("MaxPooling2D(3, strides=2)", (2, 15, 14, 8)),
    ("MaxPooling2D((3, 2), strides=(1, 3), padding='same')", (3, 8, 10, 5)),
    (Pool("max", (3, 3), (2, 2), ((1, 1), (1, 1))), (2, 12, 11, 70)),
]


def _max_pool(spec) -> bool:
    return isinstance(spec, Pool) and spec.kind == "max" or "MaxPool" in str(spec)


def _programs(spec, shape):
    model = spec if isinstance(spec, nn.Module) else cnn.build_model([spec])
    fast, plain = kernels.ModelApply(model, kernels.ONEDNN), kernels.apply_fn(model, "xla")
    x = jax.random.normal(jax.random.key(0), shape)
    return fast, plain, x


def _value_and_grads(apply, variables, x, dtype):
    """The output and the gradients of a scalar of it for parameters and input, computed in `dtype` as a step does."""
    def loss(v, x):
        cast = jax.tree.map(lambda a: a.astype(dtype), v)
        y = apply(cast, x.astype(dtype)).astype(jnp.float32)
        return (y * jnp.cos(y)).sum(), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
    return y, grads


@needs_onednn
@pytest.mark.parametrize("spec, shape", CASES)
def test_float32_equals_flax(spec, shape):
    fast, plain, x = _programs(spec, shape)
    variables = fast.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, variables, plain.init(jax.random.key(1), x))
    # The layer really went to oneDNN (or the extension's own loops).
    assert re.search("cnn_(onednn|loops)_", jax.jit(fast).lower(variables, x).as_text())
    ours, theirs = (_value_and_grads(f, variables, x, jnp.float32) for f in (fast, plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ours, theirs)


@needs_onednn
@pytest.mark.parametrize("spec, shape", [("Conv1D(4, 3, dilation_rate=2)", (2, 12, 2)), ("Conv3D(4, 3)", (2, 5, 5, 5, 2))])
def test_convolutions_onednn_cannot_compute_stay_on_xla(spec, shape):
    """Dilated and 3-D convolutions are not oneDNN's here: under 'onednn' they run as plain Flax."""
    fast, plain, x = _programs(spec, shape)
    variables = jax.jit(plain.init)(jax.random.key(1), x)
    assert "cnn_onednn" not in jax.jit(fast).lower(variables, x).as_text()
    ours, theirs = (_value_and_grads(f, variables, x, jnp.float32) for f in (fast, plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, theirs)


def _relative_errors(a, b):
    return jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.abs(u - v).max() / (jnp.abs(v).max() + 1e-6)), a, b))


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec, shape", [case for case in CASES if _max_pool(case[0])])
def test_max_pools_equal_xla_bitwise_ties_included(spec, shape, dtype):
    """A max pool's output and input gradient are XLA's exactly, in both dtypes: a window's gradient goes to the
    first of its tied maxima (the inputs are quarters, so windows tie often), as XLA's select-and-scatter sends it.
    (bf16 rounding moves a window's maximum, so the pools have no place in the test against float32 below.)"""
    fast, plain, _ = _programs(spec, shape)
    x = jnp.round(jax.random.normal(jax.random.key(2), shape) * 4) / 4
    variables = plain.init(jax.random.key(1), x)
    ours, theirs = (_value_and_grads(f, variables, x, jnp.dtype(dtype)) for f in (fast, plain))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@needs_onednn_bf16
@pytest.mark.parametrize("spec, shape", [case for case in CASES if not _max_pool(case[0])])
def test_bfloat16_within_bfloat16_rounding(spec, shape):
    """bf16 through oneDNN is as close to the float32 result as XLA's own bf16 path is, to bf16's precision."""
    fast, plain, x = _programs(spec, shape)
    variables = plain.init(jax.random.key(1), x)
    exact = _value_and_grads(plain, variables, x, jnp.float32)
    ours = _relative_errors(_value_and_grads(fast, variables, x, jnp.bfloat16), exact)
    theirs = _relative_errors(_value_and_grads(plain, variables, x, jnp.bfloat16), exact)
    assert max(ours) < 3e-2, ours
    assert all(o <= 2 * t + 1e-2 for o, t in zip(ours, theirs)), (ours, theirs)


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(8, 6, 5, 16), (33, 16), (2, 3, 4, 3, 32), (6, 5, 8), (9, 7), (5, 4, 64), (7, 3, 24)])
@pytest.mark.parametrize("path", ["onednn_batch_norm", "batch_norm_loops"])
def test_batch_norm_in_training_equals_flax(dtype, shape, path):
    """Training-mode batch norm (any rank, channels last) through oneDNN or the extension's own loops: the output,
    the input's and parameters' gradients and the new running statistics equal Flax's, float32 to 1e-5 of each
    array's largest value, bf16 within bf16 rounding. oneDNN takes only channel counts it has JIT kernels for (not 7;
    not 8 in bf16) and bf16 only with bf16 instructions; the loops take every count, also where oneDNN has no bf16
    kernels (their own code, compiled for AVX-512, AVX2 and the baseline)."""
    import flax.linen as nn

    norm = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
    x = 3 * jax.random.normal(jax.random.key(0), shape) + 1
    variables = norm.init(jax.random.key(1), x)
    variables = {**variables, "params": {"scale": jax.random.normal(jax.random.key(2), shape[-1:]),
                                         "bias": jnp.arange(shape[-1], dtype=jnp.float32)}}
    weights = jax.random.normal(jax.random.key(3), shape)

    def run(paths):
        apply = kernels.ModelApply(norm, paths)

        def loss(v, x):
            cast = {**v, "params": jax.tree.map(lambda a: a.astype(dtype), v["params"])}
            y, updates = apply(cast, x.astype(dtype), mutable=["batch_stats"])
            assert y.dtype == jnp.dtype(dtype)
            return (y.astype(jnp.float32) * weights).sum(), (y.astype(jnp.float32), updates)

        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        if path == "onednn_batch_norm":
            taken = bool(paths) and onednn.norm_jit(shape[-1], dtype) and (dtype == "float32" or onednn.has_bf16())
            assert ("cnn_onednn_norm_forward" in program.lower(variables, x).as_text()) == taken
        else:
            assert ("cnn_loops_norm_forward" in program.lower(variables, x).as_text()) == bool(paths)
        return program(variables, x)

    if path == "onednn_batch_norm" and dtype == "bfloat16" and not onednn.has_bf16():
        pytest.skip("oneDNN has no bf16 kernels on this CPU")
    ours, theirs = run((path,)), run(())
    errors = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), ours, theirs)
    assert max(jax.tree.leaves(errors)) <= (1e-5 if dtype == "float32" else 1e-2), errors


@needs_onednn
def test_auto_takes_onednn_float32_convolutions_and_bfloat16_layers_only_on_a_cpu_with_bf16():
    model = cnn.build_model(["Conv2D(4, 3)", "Flatten()", "Dense(3)"])
    apply = kernels.apply_fn(model, "auto", "cpu")
    x = jnp.ones((2, 8, 8, 3))
    variables = apply.init(jax.random.key(0), x)
    program = lambda dtype: str(jax.make_jaxpr(apply)(jax.tree.map(lambda a: a.astype(dtype), variables),
                                                       x.astype(dtype)))
    assert "cnn_onednn_conv_forward" in program(jnp.float32)  # float32: convolutions only
    assert "cnn_onednn_matmul" not in program(jnp.float32)
    assert ("cnn_onednn_conv_forward" in program(jnp.bfloat16)) == onednn.has_bf16()
    assert ("cnn_onednn_matmul" in program(jnp.bfloat16)) == onednn.has_bf16()
    normed = cnn.build_model(["Conv2D(16, 3)", "BatchNormalization()", "Flatten()", "Dense(3)"])  # JIT kernels
    normed_apply = kernels.apply_fn(normed, "auto", "cpu")
    normed_variables = normed_apply.init(jax.random.key(0), x)
    train = lambda dtype: str(jax.make_jaxpr(lambda v, x: normed_apply(v, x, train=True, mutable=["batch_stats"]))(
        jax.tree.map(lambda a: a.astype(dtype), normed_variables), x.astype(dtype)))
    assert "cnn_loops_norm_forward" in train(jnp.float32)  # float32: the extension's loops on any CPU
    assert ("cnn_loops_norm_forward" in train(jnp.bfloat16)) == onednn.has_bf16()
    assert "cnn_onednn_norm_forward" not in train(jnp.bfloat16)
    assert "cnn_onednn_matmul" in str(jax.make_jaxpr(kernels.apply_fn(model, "onednn", "cpu"))(variables, x))


@needs_onednn
def test_float32_auto_takes_relu_and_pool_into_onednn_and_leaves_one_channel_inputs_to_patches():
    """The Flax CNN in float32: its first convolution (one channel in) as XLA's patches product, its second with
    relu and the average pool in oneDNN's calls (in bf16 both go to oneDNN)."""
    model = cnn.build_model(["Conv2D(8, 3, padding='same', activation='relu')", "AveragePooling2D(2)",
                             "Conv2D(16, 3, padding='same', activation='relu')", "AveragePooling2D(2)",
                             "Flatten()", "Dense(3)"])
    apply = kernels.apply_fn(model, "auto", "cpu")
    x = jnp.ones((2, 12, 12, 1))
    variables = apply.init(jax.random.key(0), x)
    loss = lambda v, x: apply(v, x, train=True, mutable=["batch_stats"])[0].sum()
    text = jax.jit(jax.grad(loss)).lower(variables, x).as_text()
    assert text.count("cnn_onednn_conv_forward") == 1 and "relu = 1" in text
    assert "backward = 1" not in text  # no pool's backward call: its gradient rides with relu's
    assert "dot_general" in text  # the patches product


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
@pytest.mark.parametrize("specs", [
    ["Conv2D(16, 3, use_bias=False)", "BatchNormalization()", "Activation('relu')", "Flatten()", "Dense(3)"],
    ["Conv2D(16, 3, padding='same', use_bias=False)", "ResidualBlock(16)", "ResidualBlock(32, strides=2)",
     "GlobalAveragePooling2D()", "Dense(3)"],
])
@pytest.mark.parametrize("plain", ["onednn_batch_norm", "batch_norm_loops"])
def test_batch_norm_and_relu_fused_equal_them_apart(dtype, specs, plain):
    """A batch norm followed by relu (a spec pair, a residual block's first) runs as one call each way (oneDNN's
    fuse_norm_relu, or the loops' own), and through the loops so does a residual block's end (batch norm, the
    shortcut added, relu): outputs, gradients and running statistics are bitwise those of the same batch norm followed
    by XLA's add and cnn's relu. Sowing the layers' outputs (the summary, feature maps) keeps them apart."""
    model = cnn.build_model(specs)
    x = jax.random.normal(jax.random.key(0), (4, 9, 9, 3))
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    variables = cast(kernels.apply_fn(model, "xla").init(jax.random.key(1), x))
    weights = jax.random.normal(jax.random.key(2), (4, 3))

    def run(paths):
        apply = kernels.ModelApply(model, paths)

        def loss(v, x):
            y, updates = apply(v, x, train=True, mutable=["batch_stats"])
            return (y.astype(jnp.float32) * weights).sum(), (y.astype(jnp.float32), updates)

        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        return program.lower(variables, x.astype(dtype)).as_text(), program(variables, x.astype(dtype))

    fused_paths = {"onednn_batch_norm": ("onednn_batch_norm_relu",),
                   "batch_norm_loops": ("batch_norm_add_relu_loops", "batch_norm_relu_loops")}[plain]
    # oneDNN's fused call has a target of its own; the loops' tell it in an attribute
    fused_call = "cnn_onednn_norm_relu_forward" if plain == "onednn_batch_norm" else "relu = 1"
    (fused_text, fused), (plain_text, apart) = run((*fused_paths, plain)), run((plain,))
    assert fused_call in fused_text and fused_call not in plain_text
    # a residual block's end, relu(batch_norm(y) + shortcut), in the loops' one call each way
    assert ("add = 1" in fused_text) == (plain == "batch_norm_loops" and "ResidualBlock(16)" in specs)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(apart)))
    sown = jax.jit(lambda v, x: kernels.ModelApply(model, (*fused_paths, plain))(
        v, x, train=True, mutable=["batch_stats", "activations"])).lower(variables, x.astype(dtype)).as_text()
    assert (fused_call in sown) == ("ResidualBlock(16)" in specs)  # blocks sow nothing


class _NormRelu6(nn.Module):
    """MobileNetV2's batch norm and relu6 as one call of cnn's BatchNorm."""

    @nn.compact
    def __call__(self, x):
        return BatchNorm(use_running_average=False, momentum=0.9)(x, relu6=True)


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
@pytest.mark.parametrize("shape", [(4, 9, 9, 16), (8, 5, 24), (6, 7)])
@pytest.mark.parametrize("near_six", [False, True])
def test_batch_norm_and_relu6_fused_equal_them_apart(dtype, shape, near_six):
    """BatchNorm(relu6=True) through the loops, the relu6 in their passes: output, gradients and running statistics
    bitwise those of the loops' batch norm followed by cnn's relu6 (outputs spread past 6 and below 0, so both ends
    of the clamp and of its gradient's mask are taken). The fused backward pass recomputes the mask from x; with
    `near_six` most outputs fall within a bf16 rounding step of 6, where the mask is the stored output's."""
    model, x = _NormRelu6(), (3 * jax.random.normal(jax.random.key(0), shape) + 1).astype(dtype)
    variables = jax.tree.map(lambda a: (4 * a).astype(dtype), model.init(jax.random.key(1), x))
    if near_six:  # outputs 5.96875 + x_hat / 32: bf16 rounds those from 6 - 1/64 (x_hat 0.5) on to 6
        params = {"scale": jnp.full_like(variables["params"]["BatchNorm_0"]["scale"], 1 / 32),
                  "bias": jnp.full_like(variables["params"]["BatchNorm_0"]["bias"], 6 - 1 / 32)}
        variables = {**variables, "params": {"BatchNorm_0": params}}
    weights = jax.random.normal(jax.random.key(2), shape)

    def run(paths):
        def loss(v, x):
            y, updates = kernels.ModelApply(model, paths)(v, x, mutable=["batch_stats"])
            return (y.astype(jnp.float32) * weights).sum(), (y.astype(jnp.float32), updates)

        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        return program.lower(variables, x).as_text(), program(variables, x)

    (fused_text, fused), (_, apart) = run(("batch_norm_relu6_loops", "batch_norm_loops")), run(("batch_norm_loops",))
    assert "relu = 6" in fused_text
    y = fused[0][1][0]
    if near_six:
        assert 0.1 < float((y == 6).mean()) < 0.5 and float(y.min()) > 5.8
    else:
        assert float(y.max()) == 6.0 and float(y.min()) == 0.0 and 0 < float((y == 6).mean()) < 0.5
    # outputs, running statistics and gradients (the loss itself is XLA's sum, whose order the programs may differ in)
    ours, theirs = (jax.tree.leaves((result[0][1], result[1])) for result in (fused, apart))
    assert all(bool((a == b).all()) for a, b in zip(ours, theirs))


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
@pytest.mark.parametrize("specs", [("Conv2D(8, 3, padding='same', activation='relu')",),
                                   ("Conv2D(6, 3, strides=2, activation='relu', use_bias=False)",),
                                   ("Conv1D(5, 3, padding='same', activation='relu')",),
                                   ("Conv2D(8, 3, padding='same', activation='relu')", "AveragePooling2D(2)"),
                                   ("Conv2D(4, 2, activation='relu')", "AveragePooling2D(3)")])
def test_convolution_and_relu_fused_equal_them_apart(dtype, specs):
    """A training Sequential's Conv(..., activation='relu') is one oneDNN call with relu as its post-op: output and
    gradients bitwise those of the convolution followed by cnn's relu (relu commutes with rounding to bf16). An
    average pool after it joins the call (its gradient and relu's one pass; 9x9 and 8x8 outputs, so the 2x2 and 3x3
    windows also drop a row and a column). Sowing the outputs (feature maps) and evaluation keep them apart, so they
    see the convolution's output."""
    model = cnn.build_model([*specs, "Flatten()", "Dense(3)"])
    shape = (4, 9, 9, 3) if "2D" in specs[0] else (4, 9, 3)
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    variables = jax.tree.map(lambda a: a.astype(dtype), kernels.apply_fn(model, "xla").init(jax.random.key(1), x))
    weights = jax.random.normal(jax.random.key(2), (4, 3))
    plain = ("onednn_conv", "onednn_dense", "onednn_avg_pool")
    fused_paths = ("onednn_conv_relu_pool", "onednn_conv_relu", *plain)

    def run(paths, train=True, sow=()):
        apply = kernels.ModelApply(model, paths)
        loss = lambda v, x: (apply(v, x, train=train, mutable=["batch_stats", *sow])[0].astype(jnp.float32)
                             * weights).sum()
        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return program.lower(variables, x).as_text(), program(variables, x)

    (fused_text, fused), (plain_text, apart) = run(fused_paths), run(plain)
    assert "relu = 1" in fused_text and "relu = 1" not in plain_text
    # the pool's backward call is gone where the convolution took the pool
    assert fused_text.count("backward = 1") == plain_text.count("backward = 1") - (len(specs) == 2)
    if specs[-1] == "AveragePooling2D(3)":  # its gradient divides by 9, where oneDNN's rounds differently
        assert max(_relative_errors(fused, apart)) < 1e-6
    else:
        assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(apart)))
    assert "relu = 1" not in run(fused_paths, sow=["activations"])[0]
    assert "relu = 1" not in run(fused_paths, train=False)[0]


@needs_onednn
@needs_onednn_bf16
def test_a_bf16_dense_layer_fed_float32_trains_through_onednn():
    """Flax's average pool with SAME padding over an odd size hands a bf16 model float32 activations; the dense
    layer after it then has a bf16 kernel and float32 inputs, whose kernel gradient oneDNN cannot write in bf16 (it
    failed to build the matmul): it comes in float32 and is cast."""
    model = cnn.build_model(["Conv2D(4, 3, activation='relu')", "AveragePooling2D(2, padding='same')", "Flatten()",
                             "Dense(2)"])
    x = jax.random.normal(jax.random.key(0), (3, 9, 9, 2)).astype(jnp.bfloat16)
    variables = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                             kernels.apply_fn(model, "xla").init(jax.random.key(1), x))

    def grads(kernel_choice):
        apply = kernels.apply_fn(model, kernel_choice)
        loss = lambda v: apply(v, x, train=True).astype(jnp.float32).sum()
        program = jax.jit(jax.grad(loss))
        return program.lower(variables).as_text(), program(variables)

    (text, ours), (_, theirs) = grads("onednn"), grads("xla")
    assert "cnn_onednn_matmul" in text
    assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, theirs)
    assert max(_relative_errors(jax.tree.map(lambda a: a.astype(jnp.float32), ours),
                                jax.tree.map(lambda a: a.astype(jnp.float32), theirs))) < 2e-2


class _Tied(nn.Module):
    """A convolution whose input is also a shortcut, as a residual block's first one."""

    kernel: tuple[int, int]
    padding: str | tuple
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        return cnn.models.layers.Conv(5, self.kernel, self.strides, self.padding)(x, with_input=True)


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
@pytest.mark.parametrize("kernel, padding, strides, tied", [((3, 3), "SAME", 1, True), ((3, 3), "VALID", 1, True),
                                                            ((1, 1), "SAME", 1, True),
                                                            ((3, 3), ((2, 0), (0, 1)), 1, True),
                                                            ((3, 3), "SAME", 2, False)])
def test_convolution_with_its_input_adds_the_shortcut_gradient_in_its_backward_call(dtype, kernel, padding, strides,
                                                                                    tied):
    """Conv(...)(x, with_input=True) is (conv(x), x): with stride 1 the input gradient is one oneDNN call, the
    transposed convolution with the shortcut's gradient added as a post-op, and values, gradients included, are
    XLA's to float rounding; a strided one keeps autodiff's add."""
    model = _Tied(kernel, padding, strides)
    x = jax.random.normal(jax.random.key(0), (3, 8, 7, 4)).astype(dtype)
    variables = jax.tree.map(lambda a: a.astype(dtype), kernels.apply_fn(model, "xla").init(jax.random.key(1), x))

    def run(kernel_choice):
        apply = kernels.apply_fn(model, kernel_choice)

        def loss(v, x):
            y, shortcut = apply(v, x)
            weights = (jnp.cos(jnp.arange(y.size)).reshape(y.shape), jnp.sin(jnp.arange(x.size)).reshape(x.shape))
            return (y.astype(jnp.float32) * weights[0]).sum() + (shortcut.astype(jnp.float32) * weights[1]).sum()

        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return program.lower(variables, x).as_text(), program(variables, x)

    (text, ours), (_, theirs) = run("onednn"), run("xla")
    assert ("cnn_onednn_conv_forward_add" in text) == tied and "cnn_onednn_conv_forward" in text
    ours, theirs = jax.tree.map(lambda a: a.astype(jnp.float32), (ours, theirs))
    assert max(_relative_errors(ours, theirs)) < (1e-5 if dtype == "float32" else 2e-2)


@needs_onednn
def test_batch_norm_goes_to_onednn_only_where_it_has_jit_kernels():
    """oneDNN's generic batch-norm loops (bf16 with 8 channels, say) ran 20x slower than XLA's: 'onednn' leaves
    such layers to cnn's sums path, asked of oneDNN; 16 channels have JIT kernels wherever oneDNN has bf16 ones.
    'auto' sends every bf16 batch norm to the extension's own loops where oneDNN takes bf16 layers."""
    import flax.linen as nn

    if onednn.has_bf16():
        assert onednn.norm_jit(16, jnp.bfloat16)
    assert onednn.norm_jit(16, jnp.float32) and not onednn.norm_jit(3, jnp.float32)
    for channels in (8, 16, 24):
        x = jnp.ones((4, 5, 5, channels), jnp.bfloat16)
        norm = nn.BatchNorm(use_running_average=False)
        variables = norm.init(jax.random.key(0), x)
        variables = {**variables, "params": jax.tree.map(lambda a: a.astype(x.dtype), variables["params"])}
        for name in ("auto", "onednn"):
            apply = kernels.apply_fn(norm, name, "cpu")
            text = str(jax.make_jaxpr(lambda v, x: apply(v, x, mutable=["batch_stats"]))(variables, x))
            expected = onednn.norm_jit(channels, jnp.bfloat16) and name == "onednn"
            assert ("cnn_onednn_norm_forward" in text) == expected, (name, channels)
            assert ("cnn_loops_norm_forward" in text) == (name == "auto" and onednn.has_bf16()), (name, channels)


AUTO_CODE = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, cnn
from cnn import kernels
def check(specs, shape, tolerance):
    model = cnn.build_model(specs)
    fast, plain = kernels.apply_fn(model, "onednn", "cpu"), kernels.apply_fn(model, "xla", "cpu")
    x = jax.random.normal(jax.random.key(0), shape)
    variables = plain.init(jax.random.key(1), x)
    def loss(apply, v, x):
        y, _ = apply(v, x, train=True, mutable=["batch_stats"])
        return (y * jnp.cos(y)).sum(), y
    assert "cnn_onednn_conv" in jax.jit(lambda v, x: loss(fast, v, x)).lower(variables, x).as_text()
    ours, theirs = (jax.jit(jax.value_and_grad(lambda v, x: loss(a, v, x), argnums=(0, 1), has_aux=True))(
        variables, x) for a in (fast, plain))
    errors = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max()), ours, theirs)
    assert max(jax.tree.leaves(errors)) <= tolerance, errors  # each array's error against its largest entry
for spec, shape in [("Conv2D(16, 3, padding='same', use_bias=False)", (4, 16, 16, 16)),
                    ("Conv2D(32, 3, strides=2, padding='same')", (4, 16, 16, 16)), ("Conv2D(64, 3)", (2, 9, 9, 32))]:
    check([spec], shape, 1e-5)
# ResNet-20's pieces: batch norm divides by each channel's spread, so rounding differences grow a little.
check(["Conv2D(16, 3, padding='same', use_bias=False)", "BatchNormalization()", "Activation('relu')",
       "ResidualBlock(16)", "ResidualBlock(32, strides=2)", "GlobalAveragePooling2D()", "Dense(10)"],
      (8, 16, 16, 3), 1e-4)
print("equal")
"""


@needs_onednn
@pytest.mark.parametrize("isa", ["", "AVX2"])
def test_onednn_float32_convolutions_equal_xla(isa):
    """train.kernels='onednn' puts float32 convolutions in oneDNN: values and every gradient equal XLA's, to 1e-5 for a layer and
    1e-4 through ResNet blocks with batch norm, with oneDNN's kernels for this CPU and held to AVX2 (an AVX2-only
    CPU's kernels)."""
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})}
    out = subprocess.run([sys.executable, "-c", AUTO_CODE], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "equal", out.stderr[-3000:]


WINOGRAD_CODE = AUTO_CODE.split("for spec, shape")[0].replace(
    "model = cnn.build_model(specs)", "model = specs if isinstance(specs, nn.Module) else cnn.build_model(specs)") + """
class Padded(nn.Module):  # explicit pads, uneven: two rows above, none below
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(16, (3, 3), padding=((2, 0), (1, 2)))(x)
for spec, shape in [(["Conv2D(16, 3, padding='same')"], (3, 9, 7, 16)),  # odd sizes: blocks cut at the edges
                    (["Conv2D(32, 3, activation='relu')"], (2, 10, 11, 16)), (Padded(), (2, 7, 6, 32))]:
    check(spec, shape, 1e-5)
# ResNet-20's blocks: forward with a residual's add, and the input gradient with the shortcut's
check(["Conv2D(16, 3, padding='same', use_bias=False)", "BatchNormalization()", "Activation('relu')",
       "ResidualBlock(16)", "ResidualBlock(32, strides=2)", "ResidualBlock(32)", "GlobalAveragePooling2D()",
       "Dense(10)"], (8, 16, 16, 16), 1e-4)
print("equal")
"""


@needs_onednn
@pytest.mark.skipif(not {"avx2", "fma"} <= onednn.cpu_flags(), reason="cnn's Winograd kernels need AVX2 and FMA")
@pytest.mark.parametrize("setting", ["1", "", "0"])
def test_winograd_convolutions_equal_xla_and_compete_with_onednn(setting, tmp_path):
    """cnn's Winograd F(2x2, 3x3) kernels (cnn/kernels/winograd.h) take float32 3x3 stride-1 convolutions with
    channels in sixteens: with CNN_WINOGRAD=1 every one of them, and the values and every gradient equal XLA's as
    oneDNN's do (odd sizes, explicit pads, relu, ResNet blocks' residual adds and shortcut gradients). Unset, they
    are timed against oneDNN's implementations; CNN_WINOGRAD=0 leaves them out."""
    env = {**os.environ, "CNN_WINOGRAD": setting, "CNN_ONEDNN_LOG": "1",
           "CNN_ONEDNN_CHOICES": str(tmp_path / "choices.tsv")}
    out = subprocess.run([sys.executable, "-c", WINOGRAD_CODE], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "equal", out.stderr[-3000:]
    taken = re.findall(r"cnn oneDNN: (\w+) .* cnn:winograd_2x2_3x3:avx2 \(CNN_WINOGRAD=1\)", out.stderr)
    timed = re.findall(r"cnn oneDNN: cnn:winograd_2x2_3x3:avx2 [\d.]+ ms", out.stderr)
    if setting == "1":
        assert sorted(set(taken)) == ["bwd_data", "bwd_weights", "fwd"] and not timed, out.stderr[-3000:]
    else:
        assert not taken and bool(timed) == (setting == ""), out.stderr[-3000:]


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bf16)])
def test_digits_train_through_onednn(config_path, tmp_path, capsys, dtype):
    """A real run on the digits with every conv and dense layer in oneDNN reaches XLA's accuracy band; its start-up
    line says so, and bf16 steps take the whole batch in one call (float32 ones stay in parts of 64)."""
    config = cnn.load_config(config_path("digits"))
    config.train.kernels, config.train.compute_dtype, config.train.batch_size = "onednn", dtype, 128
    config.train.num_epochs = 20  # 97% on this split at 20 epochs in both dtypes
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["test_accuracy"] >= 0.95
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(run.state.params))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("digits:"))
    assert line.endswith("through oneDNN")
    assert ("parts of 64" in line) == (dtype == "float32") and "batch norm" not in line


def test_auto_compute_dtype_is_bfloat16_only_where_onednn_takes_bf16(config_path, tmp_path, capsys):
    """train.compute_dtype='auto' resolves once, by the kernels rule; the run computes in it and records it."""
    bf16_pays = onednn.has_bf16()
    assert kernels.compute_dtype("auto", "auto", "cpu") == ("bfloat16" if bf16_pays else "float32")
    assert kernels.compute_dtype("auto", "xla", "cpu") == "float32"
    assert kernels.compute_dtype("auto", "auto", "gpu") == "float32"
    assert kernels.compute_dtype("float32", "auto", "cpu") == "float32"
    config = cnn.load_config(config_path("digits"))
    config.train.compute_dtype, config.train.num_epochs = "auto", 1
    run = cnn.train_and_evaluate(config, str(tmp_path))
    expected = "bfloat16" if bf16_pays else "float32"
    assert run.recipe.compute_dtype == expected and config.train.compute_dtype == "auto"  # the caller's is kept
    assert cnn.load_run(str(tmp_path)).recipe.compute_dtype == expected  # config.json holds the resolved dtype
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("digits:"))
    assert ("bfloat16 compute through oneDNN" in line) == bf16_pays


def test_micro_batches_follow_the_kernels():
    """The one rule (sharding.micro_batch_size): whole batches where oneDNN's bf16 kernels run, else parts of 64."""
    mesh = sharding.make_mesh(1)
    whole = kernels.whole_batch("auto", "bfloat16", "cpu")
    assert whole == onednn.has_bf16()
    assert sharding.micro_batch_size(128, mesh, whole) == (128 if whole else 64)
    assert not kernels.whole_batch("auto", "float32", "cpu") and not kernels.whole_batch("xla", "bfloat16", "cpu")
    assert sharding.micro_batch_size(128, mesh) == 64


def test_without_the_extension_auto_falls_back_and_onednn_is_a_config_error():
    """CNN_ONEDNN=0 stands for a missing build: 'auto' keeps XLA's paths, 'onednn' names the cause in one line."""
    code = ("from cnn import kernels, ConfigError\n"
            "assert kernels.resolve('auto', 'cpu') == kernels.AUTO['cpu']\n"
            "try:\n    kernels.resolve('onednn', 'cpu')\nexcept ConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CNN_ONEDNN": "0"}, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "train.kernels='onednn': CNN_ONEDNN=0 in the environment; use 'auto' or 'xla'"


@needs_onednn
def test_bf16_support_is_asked_of_onednn_and_follows_the_instruction_sets():
    """oneDNN's own answer agrees with the CPU's flags: bf16 instructions mean bf16 kernels; AVX2 alone means none."""
    flags = onednn.cpu_flags()
    if flags & {"avx512_bf16", "amx_bf16"} and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        assert onednn.has_bf16()
    if "avx512f" not in flags:
        assert not onednn.has_bf16()
    code = "from cnn.kernels import onednn; print(onednn.has_bf16())"
    capped = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                            check=True, capture_output=True, text=True).stdout
    assert capped.strip() == "False"  # oneDNN limited to AVX2, as on an AVX2-only CPU


@needs_onednn
def test_onednn_bf16_without_bf16_kernels_is_one_line_and_auto_computes_in_float32(tmp_path):
    """On a CPU where oneDNN has no bf16 kernels (an AVX2-only one; ONEDNN_MAX_CPU_ISA=AVX2 makes any CPU look
    so to oneDNN), forcing bf16 through oneDNN is refused in one line, and 'auto' trains in float32 (its
    convolutions through oneDNN)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    base = [sys.executable, "-m", "cnn.main", "--config=configs/digits.py", "--config.train.pictures=False"]
    proc = subprocess.run([*base, f"--workdir={tmp_path / 'forced'}", "--config.train.kernels=onednn",
                           "--config.train.compute_dtype=bfloat16"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert "train.kernels='onednn' with train.compute_dtype='bfloat16'" in line and "compute_dtype='float32'" in line
    assert not (tmp_path / "forced").exists()
    proc = subprocess.run([*base, f"--workdir={tmp_path / 'auto'}", "--config.train.compute_dtype=auto",
                           "--config.train.num_epochs=1"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("digits:"))
    assert "bfloat16" not in line and "through oneDNN" in line


IDLE_CODE = """
import os, time, jax, jax.numpy as jnp, cnn
from cnn import kernels
model = cnn.build_model(["Conv2D(32, 3, padding='same')", "Flatten()", "Dense(3)"])
apply = kernels.apply_fn(model, "onednn", "cpu")
x = jax.random.normal(jax.random.key(0), (64, 32, 32, 16))
variables = apply.init(jax.random.key(1), x)
step = jax.jit(jax.grad(lambda v, x: (apply(v, x) ** 2).sum()))
for _ in range(3):
    jax.block_until_ready(step(variables, x))
busy = time.process_time()
time.sleep(0.5)
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), time.process_time() - busy)
"""


@needs_onednn
@pytest.mark.parametrize("preset", [{}, {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "0"}])
def test_idle_onednn_threads_sleep_and_the_environments_wait_settings_are_kept(preset):
    """libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT when the extension loads it: by default a bounded spin on a
    CPU with bf16 instructions, passive elsewhere, so an idle process takes next to no CPU in half a second's sleep
    after oneDNN's calls; a user's own values kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
    out = subprocess.run([sys.executable, "-c", IDLE_CODE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    policy, spins, idle_cpu = out.stdout.split()
    if preset:
        assert (policy, spins) == (preset.get("OMP_WAIT_POLICY", "None"), preset.get("GOMP_SPINCOUNT", "None"))
    else:
        held = env.get("ONEDNN_MAX_CPU_ISA", env.get("DNNL_MAX_CPU_ISA", "")).upper()  # as --hold_isa sets it
        spin = onednn.cpu_flags() & onednn.BF16_FLAGS and held not in onednn.ISAS_WITHOUT_BF16
        assert (policy, spins) == (("ACTIVE", str(onednn.OPENMP_SPINS)) if spin else ("PASSIVE", "None"))
    assert float(idle_cpu) < 0.1, f"{idle_cpu} s of CPU while the process slept"


SPIN = f"ACTIVE {onednn.OPENMP_SPINS}"


@needs_onednn
@pytest.mark.parametrize("flags, held, expected", [({"avx2"}, "", "PASSIVE None"), ({"avx2", "avx512_bf16"}, "", SPIN),
                                                   ({"avx2", "avx512_bf16"}, "AVX2", "PASSIVE None"),
                                                   ({"avx2", "amx_bf16"}, "avx512_core_amx", SPIN)])
def test_onednn_threads_wait_as_the_cpus_bf16_instructions_say(flags, held, expected):
    """The wait policy follows the CPU's flags as /proc/cpuinfo gives them, so an AVX2-only CPU (float32 steps, which
    spinning slowed) keeps passive waits on any machine this runs on; so does a CPU whose oneDNN is held to AVX2."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env.update({"ONEDNN_MAX_CPU_ISA": held} if held else {})
    code = (f"import os; from cnn.kernels import onednn; onednn.cpu_flags = lambda: {flags!r}; "
            "assert onednn.available(); print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == expected, out.stderr


RECORD_CODE = """
import sys, jax, jax.numpy as jnp, numpy as np, cnn
from cnn import kernels
model = cnn.build_model(["Conv2D(8, 3, padding='same')", "Flatten()", "Dense(3)"])
apply = kernels.apply_fn(model, "onednn", "cpu")
x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
variables = apply.init(jax.random.key(1), x)
grads = jax.jit(jax.grad(lambda v, x: (apply(v, x) ** 2).sum(), argnums=(0, 1)))(variables, x)
np.save(sys.argv[1], np.concatenate([np.ravel(a) for a in jax.tree.leaves(grads)]))
"""


@needs_onednn
def test_onednn_choices_are_recorded_so_every_process_computes_alike(tmp_path):
    """The implementation timed fastest for a convolution shape is recorded (onednn.choices_file); a later process
    builds it without timing and computes bitwise alike, and a record naming an implementation this oneDNN lacks
    is timed again and superseded."""
    record = tmp_path / "choices.tsv"
    env = {**os.environ, "CNN_ONEDNN_CHOICES": str(record), "CNN_ONEDNN_LOG": "1"}

    def run(name):
        out = subprocess.run([sys.executable, "-c", RECORD_CODE, str(tmp_path / f"{name}.npy")], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return "cnn oneDNN:" in out.stderr, np.load(tmp_path / f"{name}.npy")

    timed, first = run("first")
    lines = record.read_text().splitlines()
    assert timed and sorted(line.split()[0] for line in lines) == ["bwd_data", "bwd_weights", "fwd"]
    timed, second = run("second")
    assert not timed and np.array_equal(first, second)
    record.write_text("".join(line.split("\t")[0] + "\tno:such\n" for line in lines))
    timed, _ = run("third")
    latest = {line.split("\t")[0]: line.split("\t")[1] for line in record.read_text().splitlines()}
    assert timed and len(latest) == 3 and "no:such" not in latest.values()


def test_one_cpu_device_by_default_where_onednn_computes_the_convolutions():
    """XLA cannot split the extension's calls over devices (it would run each whole on every device), so
    train.num_devices=0 means one device where they are in force, and runtime's default elsewhere."""
    assert kernels.cpu_devices("xla", "float32") == 0
    assert kernels.cpu_devices("auto", "float32") == kernels.cpu_devices("auto", "auto") == int(onednn.available())
    # bf16 layers go to oneDNN only where it has bf16 kernels (not on an AVX2-only CPU).
    assert kernels.cpu_devices("auto", "bfloat16") == int(onednn.available() and onednn.has_bf16())
