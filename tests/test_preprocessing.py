"""data.preprocessing: the input scaling of Keras's imagenet_utils.preprocess_input, inside the compiled step."""

import numpy as np
import pytest

import cnn
from cnn.data.images import preprocess


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_each_mode_equals_keras_preprocess_input(mode):
    keras = pytest.importorskip("keras")
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    expected = keras.applications.imagenet_utils.preprocess_input(images.astype(np.float32), mode=mode)
    np.testing.assert_allclose(np.asarray(preprocess(images, mode=mode)), expected, rtol=1e-6, atol=1e-5)


def test_a_run_scales_its_inputs_by_the_mode_and_records_it(config_path, tmp_path, capsys):
    """The recipe carries the mode into the step, evaluation and prediction; config.json keeps it for load_run."""
    config = cnn.load_config(config_path("digits"))
    config.data.preprocessing, config.train.num_epochs = "tf", 1
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.recipe.preprocessing == "tf"
    assert "inputs scaled as 'tf' weights expect" in capsys.readouterr().out
    images = run.dataset.test.images[:4]
    np.testing.assert_array_equal(np.asarray(run.recipe.inputs(images)), images.astype(np.float32) / 127.5 - 1.0)
    assert cnn.load_run(str(tmp_path)).recipe.preprocessing == "tf"


@pytest.mark.parametrize("change, message", [
    ({"preprocessing": "keras"}, "data.preprocessing='keras' is not valid: expected one of 'caffe', 'tf', 'torch'"),
    ({"preprocessing": "torch", "mean": (0.5,), "std": (0.5,)},
     "data.preprocessing='torch' and data.mean/data.std both scale the inputs; keep one"),
])
def test_bad_values_are_one_line(config_path, change, message):
    config = cnn.load_config(config_path("digits"))
    for field, value in change.items():
        config.data[field] = value
    with pytest.raises(cnn.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cnn.config.validate(config)
