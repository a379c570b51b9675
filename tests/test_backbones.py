"""ImageNet backbones (cnn/models/backbones.py) and Keras weight files (cnn/models/weights.py).

Each Keras application is built once with random weights (moving variances positive), saved in both layouts
(Keras 3 `.weights.h5` and the legacy HDF5 of keras.applications' downloads), loaded through
`cnn.models.pretrained`, and its softmax compared with Keras' predictions. Keras runs on TensorFlow, imported
once here.
"""

import os
import re

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


def test_a_keras_sequential_loads_layer_by_layer_into_the_same_specs(keras, tmp_path):
    specs = ["Conv2D(4, 3, activation='relu')", "BatchNormalization()", "DepthwiseConv2D(3, depth_multiplier=2)",
             "MaxPooling2D(2)", "Flatten()", "Dense(5, activation='softmax')"]
    rng = np.random.default_rng(1)
    keras.layers.Conv2D(1, 1)  # a layer made before: the session's names (conv2d_1, ...) differ from cnn's
    model = keras.Sequential([keras.Input((10, 10, 3)), *(_keras_layer(keras, s) for s in specs)])
    _randomise(model, rng)
    x = rng.normal(size=(3, 10, 10, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    for path in _save_both(keras, model, tmp_path, "sequential"):
        module, variables = cnn.models.pretrained(specs, path, input_shape=(10, 10, 3))
        np.testing.assert_allclose(module.apply(variables, jnp.asarray(x)), expected, atol=1e-5, err_msg=str(path))


def _keras_layer(keras, spec):
    from cnn import spec as spec_lib
    name, args, kwargs = spec_lib.parse_call(spec, "spec", "layer spec", "")
    return getattr(keras.layers, name)(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(backbones.PUBLISHED))
def test_parameter_counts_are_the_references(name):
    shape, classes, published, which, _ = backbones.PUBLISHED[name]
    text = cnn.summary(cnn.models.build_model(presets_config(name, classes)), shape)
    assert f"{which} params: {published:,}" in text


def presets_config(preset, classes):
    config = cnn.load_config("configs/cifar100.py")
    config.model.preset, config.model.num_classes = preset, classes
    return config.model


def test_resnet18_runs_and_trains_its_batch_statistics():
    model = cnn.models.build_model(presets_config("resnet18", 7))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 7) and np.isfinite(logits).all()
    assert not np.allclose(state["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
    assert parameter_count(variables["params"]) == 11_689_512 - 512 * 993 - 993


def test_a_backbone_preset_in_a_config_checks_its_head_and_takes_overrides():
    config = presets_config("mobilenet_v2(alpha=0.35)", None)
    model = cnn.models.build_model(config, num_classes=3)
    assert isinstance(model, backbones.MobileNetV2) and model.alpha == 0.35
    assert cnn.models.check_head(model, (32, 32, 3), 3, "auto") == "softmax_cross_entropy"
    with pytest.raises(cnn.ConfigError, match=r"takes images .* of at least 32x32, not 16x16x3; set "
                                              r"data.image_size=\(32, 32\)"):
        cnn.models.check_head(model, (16, 16, 3), 3, "auto")
    with pytest.raises(cnn.ConfigError, match="mobilenet_v2 has no override 'width'; it takes mobilenet_v2"):
        cnn.models.build_model(presets_config("mobilenet_v2(width=2)", 3))
    with pytest.raises(cnn.ConfigError, match="is a Flax module"):
        presets.expand("resnet50", 10)
    pytorch = cnn.models.build_model(presets_config("mobilenet_v2(style='pytorch')", 3))
    with pytest.raises(cnn.ConfigError, match=r"^mobilenet_v2\(style='pytorch'\): style is one of 'keras', "
                                              r"'torchvision'"):
        cnn.models.check_head(pytorch, (32, 32, 3), 3, "auto")


def test_weight_files_of_another_kind_or_architecture_are_one_line_errors(keras, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    with pytest.raises(cnn.ConfigError, match="is not a known weight format"):
        cnn.models.pretrained("resnet50", text)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4)
    new, legacy = _save_both(keras, model, tmp_path, "small")
    for path in (new, legacy):
        with pytest.raises(cnn.ConfigError) as error:
            cnn.models.pretrained("mobilenet_v2", path, input_shape=(32, 32, 3))
        message = str(error.value)
        shape = r"\(\d+(,|(, \d+)+)\)"
        assert re.search(rf"layer '\w+' tensor \d \(the model's \w+/\w+\) has shape {shape} in the file but {shape} "
                         r"in the model: the file is for another architecture", message), message
        assert "\n" not in message
        if path == legacy:  # the legacy layout lists layers in the model's order: the stem comes first
            assert "layer 'Conv1' tensor 0 (the model's Conv1/kernel) has shape (3, 3, 3, 16) in the file but " \
                   "(3, 3, 3, 32) in the model" in message
        with pytest.raises(cnn.ConfigError, match=r"has no layer 'conv1_\w+': the file is for another architecture"):
            cnn.models.pretrained("resnet50", path, input_shape=(32, 32, 3))
    module, variables = cnn.models.pretrained("mobilenet_v2(alpha=0.35)", legacy, (32, 32, 3), num_classes=6)
    assert module.num_classes == 6 and variables["params"]["predictions"]["kernel"].shape == (1280, 6)
