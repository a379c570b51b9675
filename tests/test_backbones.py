"""ImageNet backbones (cnn/models/backbones.py) and Keras weight files (cnn/models/weights.py).

Each Keras application is built once with random weights (moving variances positive), saved in both layouts
(Keras 3 `.weights.h5` and the legacy HDF5 of keras.applications' downloads), loaded through
`cnn.models.pretrained`, and its softmax compared with Keras' predictions. Keras runs on TensorFlow, imported
once here.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn
from cnn.models import backbones, presets
from cnn.models.layers import parameter_count

# preset, Keras application, its keyword arguments, input size (small: each takes 32x32 and up)
KERAS = [("resnet50", "ResNet50", {}, 64),
         ("mobilenet_v2(alpha=0.35)", "MobileNetV2", {"alpha": 0.35}, 96),
         ("efficientnet_b0", "EfficientNetB0", {}, 64)]


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tensorflow")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    keras = pytest.importorskip("keras")
    keras.config.set_image_data_format("channels_last")
    return keras


def _randomise(model, rng):
    """Every weight random; moving variances (and Normalization's variance) positive, counts whole."""
    for w in model.weights:
        name = w.path.rsplit("/", 1)[-1]
        if "variance" in name:
            value = rng.uniform(0.5, 2.0, w.shape)
        elif name == "count":
            value = np.asarray(7)
        else:
            value = rng.normal(0.0, 0.1 if "kernel" in name else 0.5, w.shape)
        w.assign(np.asarray(value, dtype=w.dtype))


def _save_both(keras, model, tmp_path, stem):
    from keras.src.legacy.saving import legacy_h5_format
    import h5py
    new, legacy = tmp_path / f"{stem}.weights.h5", tmp_path / f"{stem}.h5"
    model.save_weights(new)
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return new, legacy


@pytest.mark.parametrize("preset, application, kwargs, size", KERAS)
def test_keras_weights_load_in_both_layouts_and_predict_as_keras(keras, tmp_path, preset, application, kwargs, size):
    rng = np.random.default_rng(0)
    model = getattr(keras.applications, application)(weights=None, input_shape=(size, size, 3), classes=10, **kwargs)
    _randomise(model, rng)
    x = rng.uniform(0, 255 if application == "EfficientNetB0" else 1, (2, size, size, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.ptp(expected, axis=1).min() > 0.05, "near-uniform predictions would make the comparison weak"
    for path in _save_both(keras, model, tmp_path, application):
        module, variables = cnn.models.pretrained(preset, path, input_shape=(size, size, 3))
        probabilities = jax.nn.softmax(module.apply(variables, jnp.asarray(x), train=False))
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=str(path))
