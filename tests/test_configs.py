"""Every shipped config builds and trains end to end, on TFDS mock data where it names a TFDS set."""

import json
import pathlib

import pytest
import tensorflow_datasets as tfds

import cnn
from conftest import CONFIGS

CONFIG_FILES = sorted(p.stem for p in CONFIGS.glob("*.py"))
EXPECTED_PARAMETERS = {"keras_seed": 3_938_570, "keras_seed_binary": 3_937_409}


def test_all_configs_are_covered():
    assert {"mnist", "fashion_mnist", "digits", "keras_seed", "keras_seed_binary"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_trains_on_mock_data(name, tmp_path):
    config = cnn.load_config(str(CONFIGS / f"{name}.py"))
    cnn.config.validate(config)
    config.train.num_epochs = 1
    config.train.batch_size = 8
    config.data.cache = False
    with tfds.testing.mock_data(num_examples=24):
        run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["steps"] == (24 if config.data.name != "digits" else 1437) // 8
    assert 0.0 <= run.results["test_accuracy"] <= 1.0
    summary = (tmp_path / "summary.txt").read_text()
    if name in EXPECTED_PARAMETERS:
        assert run.results["parameters"] == EXPECTED_PARAMETERS[name]
        assert f"Total params: {EXPECTED_PARAMETERS[name]:,}" in summary
        assert run.results["dataset"] in ("eurosat/rgb", "horses_or_humans")
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 1
