"""Every shipped config builds and trains end to end, on TFDS mock data where it names a TFDS set."""

import json

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

import cnn
from cnn import models
from conftest import CONFIGS

CONFIG_FILES = sorted(p.stem for p in CONFIGS.glob("*.py"))
EXPECTED_PARAMETERS = {"keras_seed": 3_938_570, "keras_seed_binary": 3_937_409, "lenet5": 61_706, "mnist": 206_970,
                       "fashion_mnist": 421_738, "flax_cnn": 824_458}
EMBEDDED_SIZES = {"digits": 1437, "synthetic_series": 3000}
# Compiling a deep preset takes 10-20 s on 2 cores. The preset configs train
# a two-stage, one-block-per-stage version; the dataset configs check that their own
# model fits the data (shapes only, nothing compiled) and train a tiny one, as
# their point is the data path. Full parameter counts: test_presets.py.
SMALLER = {"resnet20": "resnet20(widths=(4, 8), depths=(1, 1))", "vgg": "vgg(widths=(4, 8), depths=(1, 1))"}
DATASET_CONFIGS = {"kmnist", "emnist_letters", "cifar10", "cifar100", "svhn", "eurosat", "horses_or_humans",
                   "colorectal_histology"}


def test_all_configs_are_covered():
    assert {"mnist", "fashion_mnist", "digits", "keras_seed", "keras_seed_binary", "kmnist", "emnist_letters",
            "cifar10", "cifar100", "svhn", "eurosat", "horses_or_humans", "colorectal_histology", "lenet5", "vgg",
            "resnet20", "imdb", "series", "flax_cnn", "image_folder", "ucr"} <= set(CONFIG_FILES)




def _own_data(name: str, folder) -> str:
    """30 examples of 3 classes in the form `name` reads (24 train once 20% are held out)."""
    rng = np.random.default_rng(0)
    if name == "image_folder":
        for c in range(3):
            (folder / f"class{c}").mkdir(parents=True)
            for i in range(10):
                Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8)).save(folder / f"class{c}" / f"{i}.png")
        return str(folder)
    folder.mkdir(parents=True)
    path = folder / "tiny_TRAIN.ts"
    lines = ["@problemName tiny", "@univariate true", "@classLabel true a b c", "@data"]
    lines += [",".join(f"{v:.3f}" for v in rng.normal(size=20)) + f":{'abc'[i % 3]}" for i in range(30)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_trains_on_mock_data(name, tmp_path):
    config = cnn.load_config(str(CONFIGS / f"{name}.py"))
    if config.data.name in cnn.config.OWN_DATA:
        config.data.path = _own_data(config.data.name, tmp_path / "data")
    if name == "finetune":  # its weight file is not here (tests/test_finetune.py fine-tunes from files): the data
        config.model.preset, config.model.pretrained = "flax_cnn(widths=(4,), dense=8)", None  # path, a tiny model
        config.data.image_size = (32, 32)
        config.train.freeze_epochs, config.optimizer.backbone_lr_scale = 0, 1.0
    cnn.config.validate(config)
    config.train.num_epochs = 1
    config.train.batch_size = 8
    config.data.cache = False
    if config.model.preset in SMALLER:
        config.model.preset = SMALLER[config.model.preset]
    with tfds.testing.mock_data(num_examples=24):
        if name in DATASET_CONFIGS:
            data = cnn.load_dataset(config.data)
            models.check_head(models.build_model(config.model), data.input_shape, data.num_classes, config.loss)
            binary = (config.model.preset or "").startswith("keras_seed_binary")
            config.model.layers, config.model.num_classes = (), data.num_classes
            config.model.preset = f"{'keras_seed_binary' if binary else 'flax_cnn'}(widths=(4,), dense=8)"
        run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["steps"] == EMBEDDED_SIZES.get(config.data.name, 24) // 8
    assert 0.0 <= run.results["test_accuracy"] <= 1.0
    summary = (tmp_path / "summary.txt").read_text()
    if name in EXPECTED_PARAMETERS:
        assert run.results["parameters"] == EXPECTED_PARAMETERS[name]
        assert f"Trainable params: {EXPECTED_PARAMETERS[name]:,}" in summary
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 1
