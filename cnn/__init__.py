"""cnn: define a CNN in a config, train it with JAX, Flax and optax.

From a notebook:

    import cnn
    config = cnn.load_config("configs/digits.py")
    run = cnn.train_and_evaluate(config, "/tmp/digits")
    run.results["test_accuracy"]

or build a model and apply it without training:

    model = cnn.build_model(["Conv2D(8, 3, activation='relu')", "Flatten()", "Dense(10)"])
    variables = model.init(jax.random.key(0), x)
    model.apply(variables, x)
"""

from cnn.config import ConfigError, base_config
from cnn.config import load as load_config
from cnn.data import load as load_dataset
from cnn.models import Sequential, build_model
from cnn import checkpoint, presets
from cnn.summary import summary
from cnn.train import TrainResult, TrainState, eval_step, train_and_evaluate, train_step

__all__ = [
    "ConfigError", "Sequential", "TrainResult", "TrainState", "base_config", "build_model", "eval_step",
    "load_config", "load_dataset", "summary", "train_and_evaluate", "train_step",
]
