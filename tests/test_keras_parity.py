"""Every layer spec against Keras' layer of the same text: each spec string is parsed once by cnn and called as
`keras.layers.<Name>(*args, **kwargs)`, Keras' weights (set to random values) are copied into the Flax parameters,
and the output shape, parameter count, summary row and output must match Keras' to 1e-5 in float32.

Keras runs on its TensorFlow backend, an implementation independent of cnn's. Importing TensorFlow takes seconds,
so every comparison lives in this one module and builds each Keras layer once.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn
from cnn import spec as spec_lib
from cnn.models.layers import ACTIVATIONS, format_shape

CASES = [  # (spec, input shape without the batch)
    # Convolutions: strides, padding, dilation, groups, activations, ranks.
    ("Conv1D(4, 3)", (11, 3)),
    ("Conv1D(6, 5, strides=2, padding='same', activation='relu')", (16, 2)),
    ("Conv1D(4, 3, dilation_rate=2, padding='causal')", (12, 3)),
    ("Conv1D(6, 3, dilation_rate=2, groups=3)", (12, 6)),
    ("Conv2D(4, 3)", (7, 8, 3)),
    ("Conv2D(4, (3, 2), strides=(2, 1), padding='same', use_bias=False)", (9, 8, 2)),
    ("Conv2D(6, 3, dilation_rate=(2, 1), padding='same')", (9, 8, 2)),
    ("Conv2D(8, 3, groups=4, activation='tanh')", (7, 7, 4)),
    ("Conv3D(4, 3)", (6, 7, 5, 2)),
    ("Conv3D(4, (3, 1, 2), strides=2, padding='same')", (7, 6, 5, 1)),
    ("Conv3D(6, 2, dilation_rate=2, groups=2)", (6, 6, 6, 4)),
    ("Conv1DTranspose(4, 3)", (5, 3)),
    ("Conv1DTranspose(4, 4, strides=2, padding='same')", (6, 2)),
    ("Conv1DTranspose(3, 3, strides=3, output_padding=1)", (4, 2)),
    ("Conv2DTranspose(4, 3, strides=2)", (4, 5, 3)),
    ("Conv2DTranspose(4, (3, 2), strides=(2, 3), padding='same')", (4, 5, 2)),
    ("Conv2DTranspose(2, 3, strides=2, padding='same', output_padding=1, activation='relu')", (3, 4, 2)),
    ("Conv2DTranspose(2, (4, 3), strides=2, padding='same', output_padding=(1, 0))", (3, 4, 2)),
    ("Conv2DTranspose(3, 3, dilation_rate=2, padding='same')", (5, 5, 2)),
    ("Conv2DTranspose(3, 1, strides=2)", (4, 4, 2)),  # a kernel smaller than its strides
    ("Conv3DTranspose(2, 3, strides=2, padding='same')", (3, 4, 3, 2)),
    ("DepthwiseConv2D(3)", (7, 7, 3)),
    ("DepthwiseConv2D(3, strides=2, padding='same', depth_multiplier=2)", (8, 7, 3)),
    ("DepthwiseConv2D((3, 2), dilation_rate=2, use_bias=False)", (8, 8, 2)),
    ("DepthwiseConv1D(5, depth_multiplier=3)", (12, 2)),
    ("SeparableConv2D(5, 3)", (7, 7, 3)),
    ("SeparableConv2D(4, 3, strides=2, padding='same', depth_multiplier=2, activation='relu')", (8, 8, 3)),
    ("SeparableConv2D(4, 3, dilation_rate=2, use_bias=False)", (9, 9, 2)),
    ("SeparableConv1D(4, 3, padding='same')", (10, 3)),
    # Pooling.
    ("MaxPooling1D(3, strides=2)", (11, 2)),
    ("AveragePooling2D(3, strides=2, padding='same')", (7, 8, 2)),
    ("MaxPooling3D(2)", (6, 5, 4, 2)),
    ("MaxPooling3D((3, 2, 2), strides=2, padding='same')", (7, 6, 5, 2)),
    ("AveragePooling3D(2, padding='same')", (5, 5, 3, 2)),
    ("GlobalAveragePooling2D()", (5, 5, 3)),
    ("GlobalAveragePooling3D()", (4, 3, 5, 2)),
    ("GlobalMaxPooling3D()", (4, 3, 5, 2)),
    # Resizing, padding, cropping, reshaping.
    ("UpSampling1D(3)", (4, 2)),
    ("UpSampling2D()", (3, 4, 2)),
    ("UpSampling2D((2, 3), interpolation='bilinear')", (3, 4, 2)),
    ("UpSampling3D((1, 2, 2))", (2, 3, 3, 2)),
    ("ZeroPadding1D((1, 3))", (5, 2)),
    ("ZeroPadding2D()", (3, 4, 2)),
    ("ZeroPadding2D(((1, 0), (2, 3)))", (3, 4, 2)),
    ("ZeroPadding3D(1)", (2, 3, 2, 1)),
    ("Cropping1D((2, 1))", (7, 2)),
    ("Cropping2D(1)", (6, 5, 2)),
    ("Cropping2D(((1, 0), (2, 1)))", (6, 6, 2)),
    ("Cropping3D()", (4, 4, 4, 1)),
    ("Reshape((-1, 2))", (4, 3, 2)),
    ("Reshape((6, 2 * 2))", (4, 3, 2)),
    ("Flatten()", (3, 3, 2)),
    # Normalisation (evaluation mode: BatchNormalization on its moving statistics).
    ("BatchNormalization(momentum=0.9, epsilon=1e-5)", (4, 4, 3)),
    ("LayerNormalization()", (5, 6)),
    ("LayerNormalization(axis=(1, 2, 3), epsilon=1e-5)", (4, 4, 3)),
    ("LayerNormalization(axis=1, center=False)", (6, 3)),
    ("GroupNormalization(2)", (5, 5, 4)),
    ("GroupNormalization(-1, epsilon=1e-5)", (6, 3)),
    ("GroupNormalization(3, scale=False)", (4, 4, 6)),
    # Activations, scaling, dense, dropout (evaluation mode: the identity).
    ("ReLU()", (3, 4, 2)),
    ("ReLU(max_value=1.5)", (3, 4, 2)),
    ("ReLU(negative_slope=0.1, threshold=0.5)", (3, 4, 2)),
    ("ReLU(6., 0.2, 0.3)", (12,)),
    ("LeakyReLU()", (12,)),
    ("LeakyReLU(negative_slope=0.05)", (3, 4)),
    ("PReLU()", (4, 4, 3)),
    ("PReLU(shared_axes=(1, 2))", (4, 4, 3)),
    ("ELU()", (12,)),
    ("ELU(alpha=0.5)", (3, 4)),
    ("Softmax()", (5,)),
    ("Softmax(axis=1)", (4, 3)),
    ("Rescaling(1. / 255, offset=-0.5)", (3, 3, 2)),
    ("Rescaling(2)", (5,)),
    ("Dense(5, activation='relu')", (7,)),
    ("Dense(3, use_bias=False)", (4, 6)),
    ("Dropout(0.5)", (8,)),
    ("SpatialDropout1D(0.5)", (6, 3)),
    ("SpatialDropout2D(0.3)", (4, 4, 3)),
    ("SpatialDropout3D(0.2)", (2, 3, 2, 3)),
    ("Embedding(20, 4)", (7,)),
    *[(f"Activation({name!r})", (3, 5)) for name in ACTIVATIONS],
]

# Keras weight names -> Flax's (depthwise kernels are reshaped in _flax_params).
_NAMES = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias", "alpha": "alpha",
          "embeddings": "embedding", "moving_mean": "mean", "moving_variance": "var"}


@pytest.fixture(scope="module")
def keras():
    """Keras on TensorFlow, imported when the first test here runs (not when pytest collects the suite)."""
    pytest.importorskip("tensorflow")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the independent reference, whatever ~/.keras says
    keras = pytest.importorskip("keras")
    keras.config.set_image_data_format("channels_last")
    return keras


def _keras_layer(keras, spec):
    """The Keras layer written exactly as the spec: its name and arguments as cnn's parser reads them."""
    name, args, kwargs = spec_lib.parse_call(spec, "spec", "layer spec", "")
    return getattr(keras.layers, name)(*args, **kwargs)


def _randomise(layer, rng):
    """Random weights, so that biases, scales and moving statistics are not their zeros and ones."""
    layer.set_weights([rng.uniform(0.5, 2.0, w.shape) if "variance" in w.name else rng.normal(size=w.shape)
                       for w in layer.weights])


def _flax_params(kind, layer):
    """Keras' weights as cnn's variables for one layer: {'params': ..., 'batch_stats': ...}."""
    weights = {w.name: np.asarray(w.numpy()) for w in layer.weights}
    if kind.startswith(("DepthwiseConv", "SeparableConv")):
        depthwise = weights.pop("depthwise_kernel" if kind.startswith("Separable") else "kernel")
        params = {"depthwise": {"kernel": depthwise.reshape(*depthwise.shape[:-2], 1, -1)}}
        if kind.startswith("Separable"):
            params["pointwise"] = {"kernel": weights.pop("pointwise_kernel")}
            params["pointwise"].update({"bias": weights.pop("bias")} if "bias" in weights else {})
        else:
            params["depthwise"].update({"bias": weights.pop("bias")} if "bias" in weights else {})
        return {"params": params}
    stats = {_NAMES[k]: weights.pop(k) for k in ("moving_mean", "moving_variance") if k in weights}
    return {"params": {_NAMES[k]: v for k, v in weights.items()}, **({"batch_stats": stats} if stats else {})}


def _summary_row(model, shape):
    """(name, kind, output shape, parameter count) from cnn's one-layer summary."""
    rows = [line for line in cnn.summary(model, shape).splitlines() if "(None" in line]
    assert len(rows) == 1, rows
    name, kind, out, count = re.fullmatch(r"(\S+) \((\w+)\)\s+(\(None[^)]*\))\s+([\d,]+)", rows[0]).groups()
    return name, kind, out, int(count.replace(",", ""))


@pytest.mark.parametrize("spec, shape", CASES)
def test_layer_matches_keras(keras, spec, shape):
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 20, (2, *shape)) if spec.startswith("Embedding") else rng.normal(size=(2, *shape)))
    x = x.astype(np.float32)
    layer = _keras_layer(keras, spec)
    layer(x)  # builds the weights
    _randomise(layer, rng)
    expected = keras.ops.convert_to_numpy(layer(x, training=False))

    model = cnn.build_model([spec])
    row = _summary_row(model, shape)
    keras_name = re.sub(r"_\d+$", "", layer.name)  # Keras numbers a session's second conv2d conv2d_1, ...
    assert row == (keras_name, type(layer).__name__, format_shape(layer.compute_output_shape((None, *shape))),
                   layer.count_params())

    name, x = row[0], jnp.asarray(x)
    variables = {k: v for k, v in _flax_params(row[1], layer).items() if v}
    ours = jax.eval_shape(model.init, jax.random.key(0), x)
    layout = lambda tree: jax.tree.map(lambda a: a.shape, tree)
    assert layout({k: c[name] for k, c in ours.items() if name in c}) == layout(variables), "parameter layout"

    y = np.asarray(jax.jit(model.apply)({k: {name: v} for k, v in variables.items()}, x))
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
