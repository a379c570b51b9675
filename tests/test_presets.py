"""Presets: names, overrides, errors, and the parameter counts their papers or reference code report."""

import re

import jax
import jax.numpy as jnp
import pytest

import cnn
from cnn import models
from cnn.models import presets
from cnn.models.layers import parameter_count


def _counts(specs, shape):
    model = cnn.build_model(list(specs))
    variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    return parameter_count(variables["params"]), parameter_count(variables.get("batch_stats", {}))


@pytest.mark.parametrize("name", sorted(presets.PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    shape, classes, published, _ = presets.PUBLISHED[name]
    trainable, _ = _counts(presets.expand(name, classes), shape)
    assert trainable == published


def test_resnet20_summary_is_keras_style_with_bn_averages_non_trainable():
    text = cnn.summary(cnn.build_model(list(presets.expand("resnet20", 10))), (32, 32, 3))
    assert "Trainable params: 269,722" in text and "Non-trainable params: 1,376" in text  # He et al.: 0.27M
    assert text.count("(ResidualBlock)") == 9 and "(None, 8, 8, 64)" in text


def test_flax_cnn_is_the_default_model():
    assert presets.expand("flax_cnn", 10) == tuple(cnn.base_config().model.layers)


def test_overrides_change_widths_and_depths():
    specs = presets.expand("vgg(widths=(8, 16), depths=(1, 2))", 10)
    assert sum(s.startswith("Conv2D(8,") for s in specs) == 1 and sum(s.startswith("Conv2D(16,") for s in specs) == 2
    assert _counts(presets.expand("resnet20(depths=(5, 5, 5))", 10), (32, 32, 3))[0] == 464_154  # ResNet-32: 0.46M
    assert len(presets.expand("keras_seed(widths=(32, 64))", 10)) == 7


def test_config_preset_takes_the_class_count():
    config = cnn.load_config("configs/cifar100.py")
    model = models.build_model(config.model)
    assert model.layers[-1] == "Dense(100)"
    config.model.num_classes = None
    assert models.build_model(config.model, num_classes=7).layers[-1] == "Dense(7)"
    with pytest.raises(cnn.ConfigError, match="needs the number of classes"):
        models.build_model(config.model)
    config.model.num_classes = 10
    with pytest.raises(cnn.ConfigError, match=r"set model.num_classes=100"):
        models.check_head(models.build_model(config.model), (32, 32, 3), 100, "auto")


def test_images_too_small_for_the_image_folder_preset_name_the_smallest_image_size():
    """data.image_size=(2, 2) under configs/image_folder.py: the error names the layer the preset made, the field
    to change, and a size that builds (and is the smallest that does)."""
    config = cnn.load_config("configs/image_folder.py")
    model = models.build_model(config.model, num_classes=5)
    with pytest.raises(cnn.ConfigError) as e:
        models.check_head(model, (2, 2, 3), 5, config.loss)
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.layers[3]='AveragePooling2D(2)': ")
    side = int(re.search(r"set data\.image_size=\((\d+), \1\) or larger", message).group(1))
    assert side == 4
    assert models.check_head(model, (side, side, 3), 5, config.loss) == "softmax_cross_entropy"
    with pytest.raises(cnn.ConfigError):
        models.output_shape(model, (side - 1, side - 1, 3))
    with pytest.raises(cnn.ConfigError) as e:  # not the input's size: no size is offered
        models.check_head(models.build_model(["Conv1D(8, 3)", "Flatten()", "Dense(5)"]), (2, 2, 3), 5, "auto")
    assert "data.image_size" not in str(e.value)


@pytest.mark.parametrize("preset, message", [
    ("resnet", "unknown preset 'resnet'; did you mean 'resnet50'?"),
    ("vgg(widths=(8, 16))", "must have one entry per stage"),
    ("vgg(width=(8,))", "unexpected keyword argument 'width'; vgg takes vgg(widths="),
    ("vgg((8,))", "give overrides by keyword"),
    ("lenet5(padding=__import__('os'))", "is not a preset"),
    ("keras_seed_binary", "for two classes, not 10"),
])
def test_bad_presets_name_the_field(preset, message):
    with pytest.raises(cnn.ConfigError) as e:
        presets.expand(preset, 10)
    assert str(e.value).startswith(f"model.preset={preset!r}") and message in str(e.value)


def test_preset_and_layers_together_or_neither_are_refused():
    config = cnn.base_config()
    config.model.preset = "lenet5"
    with pytest.raises(cnn.ConfigError, match=r"both set; keep one: set model.layers=\(\)"):
        models.check_config(config.model)
    config.model.preset = "lenett5"
    with pytest.raises(cnn.ConfigError, match="did you mean 'lenet5'"):
        models.check_config(config.model)
    config.model.preset, config.model.layers = None, ()
    with pytest.raises(cnn.ConfigError, match="model.layers=\\(\\) is not valid"):
        models.check_config(config.model)
    with pytest.raises(cnn.ConfigError, match="model.preset is not set"):
        models.build_model(config.model)


def test_presets_table_configs_fit_every_dataset():
    """experiments/presets_table.py moves each preset's config to MNIST, Fashion-MNIST or CIFAR-10; all must fit."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("presets_table", REPO / "experiments" / "presets_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for dataset in table.DATASETS:
        for preset in table.PRESET_CONFIGS:
            config = table.preset_config(preset, dataset, 1, None, None)
            cnn.config.validate(config)
            channels = 3 if dataset == "cifar10" else 1
            size = tuple(config.data.image_size or ((32, 32) if dataset == "cifar10" else (28, 28)))
            models.check_head(models.build_model(config.model), (*size, channels), 10, config.loss)
