"""Layers, the Sequential model and the summary, on real arrays."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn
from cnn import models
from cnn.models.layers import parameter_count

SEED = ("Conv2D(32, (3, 3), activation='relu', padding='valid')", "MaxPooling2D((2, 2))", "Flatten()",
        "Dense(128, activation='relu')")


def _init(specs, shape):
    model = cnn.build_model(list(specs))
    return model, model.init(jax.random.key(0), jnp.zeros((1, *shape)))


def _summary_rows(text):
    return [line for line in text.splitlines() if "(None" in line]


@pytest.mark.parametrize("head, total", [("Dense(10, activation='softmax')", 3_938_570),
                                         ("Dense(1, activation='sigmoid')", 3_937_409)])
def test_seed_models_match_keras(head, total):
    model, variables = _init((*SEED, head), (64, 64, 3))
    assert parameter_count(variables) == total
    text = cnn.summary(model, (64, 64, 3))
    rows = _summary_rows(text)
    shapes = [row.split("(None")[1].split(")")[0] for row in rows]
    assert shapes == [", 62, 62, 32", ", 31, 31, 32", ", 30752", ", 128", f", {10 if 'softmax' in head else 1}"]
    params = [int(row.split()[-1].replace(",", "")) for row in rows]
    assert params == [896, 0, 0, 3_936_384, 1290 if "softmax" in head else 129]
    assert f"Total params: {total:,}" in text and "Non-trainable params: 0" in text


def test_conv_padding_strides_and_1d():
    x = jnp.ones((2, 28, 28, 1))
    for spec, shape in [("Conv2D(4, 5)", (2, 24, 24, 4)), ("Conv2D(4, 5, padding='same')", (2, 28, 28, 4)),
                        ("Conv2D(4, 3, strides=2, padding='same')", (2, 14, 14, 4)),
                        ("Conv2D(4, (3, 5))", (2, 26, 24, 4))]:
        model, v = _init([spec], (28, 28, 1))
        assert model.apply(v, x).shape == shape, spec
    model, v = _init(["Conv1D(8, 5, activation='gelu')", "MaxPooling1D(2)", "AveragePooling1D(2, padding='same')",
                      "GlobalAveragePooling1D()", "Dense(3)"], (100, 4))
    assert model.apply(v, jnp.ones((5, 100, 4))).shape == (5, 3)
    assert v["params"]["conv1d"]["kernel"].shape == (5, 4, 8)


def test_pooling_values():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    for spec, expected in [("MaxPooling2D(2)", [[5, 7], [13, 15]]), ("AveragePooling2D(2)", [[2.5, 4.5], [10.5, 12.5]])]:
        model, v = _init([spec], (4, 4, 1))
        np.testing.assert_allclose(model.apply(v, x)[0, ..., 0], expected)
    model, v = _init(["GlobalMaxPooling2D()"], (4, 4, 1))
    assert float(model.apply(v, x)[0, 0]) == 15.0
    model, v = _init(["GlobalAveragePooling2D()"], (4, 4, 1))
    assert float(model.apply(v, x)[0, 0]) == 7.5


@pytest.mark.parametrize("name", ["relu", "gelu", "leaky_relu", "tanh", "sigmoid", "softmax"])
def test_activations(name):
    """With Keras' defaults: exact gelu (not the tanh approximation), leaky_relu's slope 0.2."""
    x = jnp.linspace(-3, 3, 12).reshape(2, 6)
    model, v = _init([f"Activation('{name}')"], (6,))
    expected = {"relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "leaky_relu": lambda x: jnp.where(x > 0, x, 0.2 * x), "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
                "softmax": jax.nn.softmax}[name](x)
    np.testing.assert_allclose(model.apply(v, x), expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("name", ["relu", "relu6"])
def test_relu_equals_flax_in_value_and_gradient(dtype, name):
    """cnn's relu and relu6 (bf16 compared as integers, cnn.models.layers) against nn.relu and nn.relu6: equal
    outputs, signed zeros, tiny and huge values and 6 itself included, and equal gradients, 0 at 0 and 6."""
    import flax.linen as nn

    from cnn.models import layers

    ours, flax_ = getattr(layers, name), getattr(nn, name)
    x = jnp.concatenate([jnp.asarray([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, jnp.inf, -jnp.inf, 6.0, 6.0]),
                         3 * jax.random.normal(jax.random.key(0), (500,))]).astype(dtype)
    assert ours(x).dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(flax_(x), np.float32))
    weights = jnp.arange(x.size, dtype=jnp.float32) - 100
    grad = lambda f: jax.grad(lambda x: (f(x).astype(jnp.float32)[8:] * weights[8:]).sum())(x)
    np.testing.assert_array_equal(np.asarray(grad(ours), np.float32), np.asarray(grad(flax_), np.float32))


def test_final_softmax_gives_probabilities_and_logits_on_request():
    model, v = _init(["Flatten()", "Dense(5, activation='softmax')"], (3, 3, 1))
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 1))
    probs, logits = model.apply(v, x), model.apply(v, x, logits=True)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-6)
    assert model.output_activation == "softmax"
    model, v = _init(["Flatten()", "Dense(1)", "Activation('sigmoid')"], (3, 3, 1))
    np.testing.assert_allclose(model.apply(v, x), jax.nn.sigmoid(model.apply(v, x, logits=True)), rtol=1e-6)


def test_batch_norm_train_and_eval():
    model, v = _init(["BatchNormalization(momentum=0.5)"], (3,))
    x = jax.random.normal(jax.random.key(2), (64, 3)) * 4 + 10
    y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-4)  # batch statistics
    np.testing.assert_allclose(updates["batch_stats"]["batch_normalization"]["mean"], 0.5 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.apply(v, x), x / np.sqrt(1 + 1e-3), rtol=1e-5)  # running stats: mean 0, var 1


def test_dropout_only_in_training():
    model, v = _init(["Dropout(0.5)"], (1000,))
    x = jnp.ones((4, 1000))
    np.testing.assert_array_equal(model.apply(v, x), x)
    y = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)})
    dropped = float((y == 0).mean())
    assert 0.45 < dropped < 0.55 and float(y.max()) == 2.0


@pytest.mark.parametrize("spec, message", [
    ("Conv4D(8, 3)", "unknown layer 'Conv4D'; did you mean"),
    ("Conv2D(8)", "missing a required argument: 'kernel_size'"),
    ("Dense(10, act='relu')", "unexpected keyword argument 'act'"),
    ("Dense(10, activation='relux')", "activation='relux' is unknown"),
    ("Dense(-3)", "units=-3 is not valid: expected a positive integer"),
    ("MaxPooling2D(2, padding='full')", "padding='full' is not valid: expected 'valid' or 'same'"),
    ("Dropout(1.5)", "rate=1.5 is not valid: expected a number in [0, 1)"),
    ("Conv2D(8, (3, 3, 3))", "kernel_size=(3, 3, 3) is not valid: expected a positive integer or a tuple of 2"),
    ("Dense(__import__('os'))", "is not a layer spec"),
    ("dense 10", "is not a layer spec"),
    ("Conv2D(8, 3, bogus=1)", "unexpected keyword argument 'bogus'"),
    ("Conv2D(8, 3, 1, 'same', 'relu')", "Conv2D takes Conv2D(filters, kernel_size, strides=1, padding='valid', *, "
                                        "dilation_rate=1, groups=1, activation=None, use_bias=True)"),
    ("Conv2D(6, 3, groups=4)", "groups=4 does not divide filters=6"),
    ("Conv2D(8, 3, strides=2, dilation_rate=2)", "strides=(2, 2) and dilation_rate=(2, 2) cannot both be above 1"),
    ("Conv2D(8, 3, padding='causal')", "padding='causal' is not valid: expected 'valid' or 'same'"),
    ("Conv2DTranspose(4, 3, strides=2, output_padding=2)", "expected each entry below strides=(2, 2)"),
    ("ZeroPadding2D(((1, 2, 3), 1))", "expected an integer >= 0, or a tuple of 2 entries"),
    ("Cropping1D(-1)", "cropping=-1 is not valid"),
    ("Reshape((-1, -1))", "one of which may be -1"),
    ("ReLU(max_value=-1)", "max_value=-1 is not valid: expected a number >= 0"),
    ("GroupNormalization(0)", "groups=0 is not valid: expected a positive integer, or -1"),
    ("UpSampling2D(interpolation='cubic')", "interpolation='cubic' is not valid"),
    ("Softmax(axis=0)", "axis=0 is not valid"),
    ("PReLU(shared_axes=-1)", "expected axes from 1"),
    ("Rescaling(1 / 0)", "is not a layer spec"),
    ("Dense(2 ** 3)", "is not a layer spec"),  # + - * / only
    ("Dense('a' * 3)", "is not a layer spec"),  # on numbers only
    ("Rescaling(True + 1)", "is not a layer spec"),
])
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(cnn.ConfigError) as e:
        cnn.build_model(["Flatten()", spec])
    assert str(e.value).startswith(f"model.layers[1]={spec!r}") and message in str(e.value)


@pytest.mark.parametrize("specs, shape, message", [
    (["Conv2D(8, 3)", "MaxPooling2D(30)", "Flatten()", "Dense(10)"], (28, 28, 1),
     "model.layers[1]='MaxPooling2D(30)': MaxPooling2D has a window of (30, 30) but its input is only (None, 26, 26, 8)"),
    (["Conv2D(8, 9)", "Conv2D(8, 9)", "Flatten()", "Dense(10)"], (8, 8, 1), "model.layers[0]='Conv2D(8, 9)'"),
    (["Conv1D(8, 3)", "Flatten()", "Dense(10)"], (28, 28, 1), "use the 2D version"),
    (["Flatten()", "Conv2D(8, 3)", "Dense(10)"], (28, 28, 1), "move it before Flatten()"),
    (["Conv2D(8, 3)"], (6, 6, 6, 1), "Conv2D needs inputs shaped (height, width, channels) but got "
                                     "(None, 6, 6, 6, 1); use the 3D version, Conv3D, for this input"),
    (["MaxPooling3D(2)"], (8, 8, 1), "MaxPooling3D needs inputs shaped (depth, height, width, channels) but got "
                                     "(None, 8, 8, 1); use the 2D version, MaxPooling2D, for this input"),
    (["DepthwiseConv2D(3)"], (6, 6, 6, 1), "DepthwiseConv2D has no 3D version"),
    (["Conv2DTranspose(4, 2, strides=2, padding='same', output_padding=0)"], (1, 1, 3),
     "Conv2DTranspose would turn (None, 1, 1, 3) into an empty output"),
    (["Conv2D(4, 3, groups=2)"], (8, 8, 3), "Conv2D(groups=2) needs input channels divisible by 2 but got "
                                            "(None, 8, 8, 3)"),
    (["GroupNormalization(4)"], (8, 8, 6), "GroupNormalization(groups=4) needs input channels divisible by 4"),
    (["Conv1D(4, 3, dilation_rate=4)"], (8, 1), "Conv1D has a window of (3,) (spanning (9,) with its dilation)"),
    (["Cropping2D(3)"], (5, 5, 1), "Cropping2D would turn (None, 5, 5, 1) into an empty output; crop less"),
    (["Reshape((5, -1))"], (4, 4, 1), "Reshape((5, -1)) cannot hold inputs shaped (None, 4, 4, 1): 16 values"),
    (["LayerNormalization(axis=3)"], (6, 2), "LayerNormalization(axis=3) does not fit inputs shaped (None, 6, 2)"),
    (["PReLU(shared_axes=(1, 2, 3))"], (4, 4), "PReLU(shared_axes=(1, 2, 3)) does not fit inputs shaped (None, 4, 4)"),
])
def test_shapes_that_do_not_fit(specs, shape, message):
    with pytest.raises(cnn.ConfigError, match=None) as e:
        models.output_shape(cnn.build_model(specs), shape)
    assert message in str(e.value)


def test_spec_arithmetic_on_numbers():
    """Specs may compute numbers as Keras code does; the parser works them out from the syntax tree."""
    assert cnn.spec.parse_call("f(-(2 - 3) * 4 / 8, (1 + 1,), [2 * 2], s='a')", "f", "call", "") == (
        "f", [0.5, (2,), [4]], {"s": "a"})
    model, v = _init(["Rescaling(1. / 255, offset=-0.5)", "Reshape((2 * 3, -1))"], (3, 4, 1))
    x = jnp.arange(24.0).reshape(2, 3, 4, 1)
    np.testing.assert_allclose(model.apply(v, x), (x / 255 - 0.5).reshape(2, 6, 2), rtol=1e-6)


def test_layer_names_follow_keras():
    names = models.parse_stack(("Conv2DTranspose(4, 3)", "PReLU()", "ReLU()", "ReLU()", "MaxPooling3D()"))[2]
    assert names == ["conv2d_transpose", "p_re_lu", "re_lu", "re_lu_1", "max_pooling3d"]


def test_spatial_dropout_drops_whole_channels_in_training_only():
    model, v = _init(["SpatialDropout2D(0.5)"], (6, 6, 64))
    x = jnp.ones((4, 6, 6, 64))
    np.testing.assert_array_equal(model.apply(v, x), x)
    y = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)})
    kept = y[:, :1, :1, :]
    assert bool(jnp.all(y == kept)) and 0.3 < float((kept == 0).mean()) < 0.7 and float(y.max()) == 2.0


def test_a_final_softmax_layer_leaves_the_loss_its_logits():
    model, v = _init(["Flatten()", "Dense(5)", "Softmax()"], (3, 3, 1))
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 1))
    assert model.output_activation == "softmax"
    np.testing.assert_allclose(model.apply(v, x), jax.nn.softmax(model.apply(v, x, logits=True)), rtol=1e-6)


def test_head_must_fit_the_dataset():
    model = cnn.build_model(["Flatten()", "Dense(7)"])
    with pytest.raises(cnn.ConfigError, match=r"gives 7 outputs but the dataset has 10 classes; end the model with Dense\(10\)"):
        models.check_head(model, (8, 8, 1), 10, "auto")
    with pytest.raises(cnn.ConfigError, match="not \\(None, units\\); add Flatten"):
        models.check_head(cnn.build_model(["Conv2D(4, 3)", "Dense(10)"]), (8, 8, 1), 10, "auto")
    assert models.check_head(cnn.build_model(["Flatten()", "Dense(1, activation='sigmoid')"]), (8, 8, 1), 2,
                             "auto") == "sigmoid_binary_cross_entropy"
    with pytest.raises(cnn.ConfigError, match="needs a two-class dataset"):
        models.check_head(cnn.build_model(["Flatten()", "Dense(1)"]), (8, 8, 1), 10, "sigmoid_binary_cross_entropy")


def test_embedding_feeds_conv1d_and_accepts_float_ids():
    specs = ["Embedding(50, 8)", "Conv1D(4, 3)", "GlobalMaxPooling1D()", "Dense(2)"]
    model, v = _init(specs, (12,))
    assert v["params"]["embedding"]["embedding"].shape == (50, 8)
    ids = jnp.arange(24).reshape(2, 12) % 50
    np.testing.assert_allclose(model.apply(v, ids), model.apply(v, ids.astype(jnp.float32)))  # trainer inits with floats
    assert "(None, 12, 8)" in cnn.summary(model, (12,))
    with pytest.raises(cnn.ConfigError, match=r"Embedding needs token ids shaped \(None, length\)"):
        models.output_shape(cnn.build_model(["Embedding(5, 2)", "Flatten()"]), (4, 4, 1))


def test_residual_block_shortcuts():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    for spec, shape, params in [("ResidualBlock(4)", (2, 8, 8, 4), 2 * 144 + 16),
                                ("ResidualBlock(8, strides=2)", (2, 4, 4, 8), 288 + 576 + 32),
                                ("ResidualBlock(8, strides=2, shortcut='conv')", (2, 4, 4, 8), 288 + 576 + 32 + 32 + 16)]:
        model = cnn.build_model([spec])
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        assert models.output_shape(model, (8, 8, 4)) == (1, *shape[1:])
        assert parameter_count(v["params"]) == params, spec
    model, v = _init(["ResidualBlock(8, strides=2)"], (8, 8, 4))
    y, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert y.shape == (2, 4, 4, 8) and float(y.min()) >= 0  # ends in relu
    with pytest.raises(cnn.ConfigError, match="shortcut='bogus' is not valid: expected 'pad'"):
        cnn.build_model(["ResidualBlock(8, shortcut='bogus')"])
    with pytest.raises(cnn.ConfigError, match="it exists in 2D only"):
        models.output_shape(cnn.build_model(["ResidualBlock(8)"]), (8, 4))


def _fast_and_plain(specs, shape, seed=0):
    """The model of `specs` applied with cnn/kernels' CPU fast paths and with plain Flax, and its variables."""
    from cnn import kernels

    model = cnn.build_model(list(specs))
    fast, plain = kernels.apply_fn(model, "auto", "cpu"), kernels.apply_fn(model, "xla")
    x = jax.random.normal(jax.random.key(seed), shape)
    return fast, plain, x


def _assert_same(fast, plain, x, rtol, atol):
    """Same initial variables, outputs and gradients (parameters and input) with and without the fast paths."""
    close = lambda a, b: jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)
    variables = jax.jit(fast.init)(jax.random.key(1), x)
    close(variables, jax.jit(plain.init)(jax.random.key(1), x))
    close(jax.jit(fast)(variables, x), jax.jit(plain)(variables, x))
    grad = lambda f: jax.jit(jax.grad(lambda v, x: (f(v, x) ** 2).sum(), argnums=(0, 1)))(variables, x)
    close(grad(fast), grad(plain))


def test_fast_paths_apply_where_they_should():
    """The interceptor really takes the fast paths: their jaxprs differ from plain Flax's only where one applies."""
    from cnn import kernels

    def program(specs, shape, choice):
        model = cnn.build_model(list(specs))
        apply = kernels.apply_fn(model, choice, "cpu")
        x = jnp.ones((2, *shape))
        return str(jax.make_jaxpr(apply)(apply.init(jax.random.key(0), x), x))

    assert "custom_vjp_call" in program(["Conv2D(4, 3)"], (8, 8, 1), "auto")  # one channel: patches
    from cnn.kernels import onednn  # several channels: oneDNN's convolution where it is built, else XLA's own
    assert ("custom_vjp_call" in program(["Conv2D(4, 3)"], (8, 8, 3), "auto")) == onednn.available()
    assert "custom_vjp_call" not in program(["Conv2D(4, 3)"], (8, 8, 3), "xla")
    assert "custom_vjp_call" in program(["Flatten()", "Dense(4)"], (8, 8, 1), "auto")
    assert "reduce_window" not in program(["MaxPooling2D(2)"], (8, 8, 3), "auto")
    # Windows overlap: the extension's loops where it is built, else XLA's reduce-window.
    assert ("reduce_window" in program(["MaxPooling2D(3, strides=2)"], (8, 8, 3), "auto")) != onednn.available()
    plain = program(["Conv2D(4, 3)", "MaxPooling2D(2)", "Flatten()", "Dense(4)"], (8, 8, 1), "xla")
    assert "custom_vjp_call" not in plain and "reduce_window" in plain
    assert kernels.resolve("auto", "gpu") == ("tiled_pool",) and kernels.resolve("xla", "cpu") == ()


@pytest.mark.parametrize("kind", ["MaxPooling", "AveragePooling"])
@pytest.mark.parametrize("shape, window, padding", [((2, 15, 14, 3), 2, "valid"), ((2, 8, 6, 3), 2, "same"),
                                                    ((2, 9, 4), 3, "valid")])
def test_tiled_pooling_matches_reduce_window(kind, shape, window, padding):
    """Pools whose windows tile the input take a reshape path; values and gradients must equal Flax's pools."""
    spec = f"{kind}{len(shape) - 2}D({window}, padding={padding!r})"
    _assert_same(*_fast_and_plain([spec], shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec, shape", [("Dense(7, activation='relu')", (5, 12)), ("Dense(3, use_bias=False)", (4, 6)),
                                         ("Dense(4)", (2, 5, 6))])
def test_dense_fast_path_equals_flax_dense(spec, shape):
    """On a CPU, Dense layers compute the input gradient their own way: everything else must equal nn.Dense."""
    _assert_same(*_fast_and_plain([spec], shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, shape", [
    ("Conv2D(32, 3, padding='same')", (2, 28, 28, 1)),  # one input channel: patches times kernel on a CPU
    ("Conv2D(6, 5)", (2, 28, 27, 1)),
    ("Conv2D(4, (3, 2), strides=(2, 3), padding='same')", (2, 29, 28, 1)),
    ("Conv1D(8, 7, strides=2, padding='same')", (3, 50, 1)),
    ("Conv2D(8, 3, use_bias=False)", (2, 10, 10, 1)),
    ("Conv2D(16, 3, strides=2, use_bias=False)", (2, 12, 12, 3)),  # XLA's convolution
    ("Conv2D(8, 3, padding='same')", (2, 9, 9, 5)),
])
def test_conv_fast_path_equals_flax_conv(spec, shape):
    """One-channel convolutions run as patches times kernel on a CPU: values, gradients, parameter names and
    initial values must equal nn.Conv's."""
    _assert_same(*_fast_and_plain([spec], shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec, shape, patches", [
    ("Conv2D(4, 3, dilation_rate=2)", (2, 12, 12, 1), False),
    ("Conv1D(4, 5, dilation_rate=3, padding='causal')", (2, 30, 1), False),
    ("Conv2D(6, 3, groups=3, padding='same')", (2, 9, 9, 3), "onednn"),  # grouped: oneDNN's where it is built
    ("Conv3D(4, 3, padding='same')", (2, 6, 7, 5, 1), True),  # one channel: patches times kernel in 3-D too
    ("Conv3D(4, 2, strides=2)", (2, 6, 6, 4, 2), False),
    ("DepthwiseConv2D(3, depth_multiplier=2)", (2, 8, 8, 1), True),  # one channel: an ordinary convolution
    ("Conv2DTranspose(4, 3, strides=2)", (2, 5, 5, 1), False),  # nn.ConvTranspose: no fast path intercepts it
])
def test_new_convolutions_under_auto_equal_xla(spec, shape, patches):
    """Dilated, grouped, 3-D, depthwise and transposed convolutions under train.kernels='auto': the same values,
    gradients and parameters as plain Flax, and a fast path only where one computes the layer (the patches for one
    input channel without groups or dilation, oneDNN for a grouped 2-D one)."""
    from cnn.kernels import onednn

    fast, plain, x = _fast_and_plain([spec], shape)
    _assert_same(fast, plain, x, rtol=1e-4, atol=1e-4)
    variables = jax.eval_shape(fast.init, jax.random.key(1), x)
    taken = onednn.available() if patches == "onednn" else patches
    assert ("custom_vjp_call" in str(jax.make_jaxpr(fast)(variables, x))) == taken


def test_residual_blocks_and_a_whole_model_equal_plain_flax():
    """The fast paths apply inside composite layers too (a ResidualBlock's convolutions are plain nn.Conv)."""
    specs = ["Conv2D(8, 3, padding='same')", "ResidualBlock(8)", "ResidualBlock(16, strides=2)",
             "AveragePooling2D(2)", "Flatten()", "Dense(10)"]
    _assert_same(*_fast_and_plain(specs, (2, 16, 16, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("specs, shape, dtype", [
    (["Conv2D(8, 3, padding='same', use_bias=False)", "BatchNormalization(momentum=0.9)", "Activation('relu')"],
     (4, 9, 9, 1), jnp.float32),
    (["Conv1D(6, 3)", "BatchNormalization(epsilon=1e-5)", "Flatten()", "Dense(3)"], (3, 20, 2), jnp.float32),
    (["Conv2D(8, 3, padding='same', use_bias=False)", "BatchNormalization()", "Activation('relu')"],
     (4, 9, 9, 2), jnp.bfloat16),
    (["ResidualBlock(8, strides=2, shortcut='conv')", "Flatten()", "Dense(3)"], (2, 8, 8, 4), jnp.float32),
])
def test_batch_norm_fast_path_equals_flax_in_training(specs, shape, dtype):
    """On a CPU, training-mode batch norm sums through matrix products: the output, the gradients of the
    parameters and the input, and the updated running statistics must equal nn.BatchNorm's in float32. In bf16
    (float32 statistics, as mixed precision keeps them) both paths must be within bf16's error of float32 Flax."""
    fast, plain, x = _fast_and_plain(specs, shape)
    x = x * 3 + 1  # a mean far from zero, where E[x^2] - E[x]^2 loses the most
    variables = fast.init(jax.random.key(1), x)

    def loss(f, dtype, params, x):
        v = {**variables, "params": jax.tree.map(lambda p: p.astype(dtype), params)}
        y, updates = f(v, x.astype(dtype), train=True, mutable=["batch_stats"])
        return (jnp.sin(y.astype(jnp.float32)) ** 2).sum(), (y.astype(jnp.float32), updates["batch_stats"])

    run = lambda f, dtype: jax.jit(jax.value_and_grad(functools.partial(loss, f, dtype), argnums=(0, 1),
                                                      has_aux=True))(variables["params"], x)
    assert "custom_vjp_call" in str(jax.make_jaxpr(functools.partial(loss, fast, dtype))(variables["params"], x))
    (_, (y, stats)), grads = run(fast, dtype)
    (_, (y_ref, stats_ref)), grads_ref = run(plain, jnp.float32)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), stats, variables["batch_stats"]))
    if dtype == jnp.float32:
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    else:  # bf16 keeps 8 bits: within 3% of each array's largest value, as XLA's own bf16 path is
        close = lambda a, b: np.testing.assert_allclose(a, b, atol=0.03 * float(np.abs(b).max()))
        (_, (y_bf16, _)), grads_bf16 = run(plain, dtype)
        jax.tree.map(close, (y_bf16, grads_bf16), (y_ref, grads_ref))
    jax.tree.map(close, (y, stats, grads), (y_ref, stats_ref, grads_ref))
