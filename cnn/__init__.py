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

train on your own arrays:

    dataset = cnn.from_arrays(x_train, y_train, x_test, y_test, class_names=None)
    run = cnn.train_and_evaluate(config, "/tmp/mine", dataset=dataset)

and look inside a trained one:

    run = cnn.load_run("/tmp/digits")  # config.json + the newest checkpoint
    cnn.predict(run, images, top_k=3)  # [[(class name, probability), ...], ...]
    cnn.plots.filters(run)  # a matplotlib Figure; see cnn/plots.py for the others
"""

from cnn.config import ConfigError, base_config, load_config
from cnn.data import from_arrays, load_dataset
from cnn.inference import predict
from cnn.models import Sequential, build_model, presets
from cnn.run import load_run
from cnn.train import TrainResult, TrainState, checkpoint, eval_step, summary, train_and_evaluate, train_step

__all__ = [
    "ConfigError", "Sequential", "TrainResult", "TrainState", "base_config", "build_model", "eval_step",
    "from_arrays", "load_config", "load_dataset", "load_run", "plots", "predict", "summary", "train_and_evaluate", "train_step",
]


def __getattr__(name: str):
    """`cnn.plots` is imported on first use: matplotlib adds about a second to every start."""
    if name == "plots":
        import importlib

        return importlib.import_module("cnn.plots")
    raise AttributeError(f"module 'cnn' has no attribute {name!r}")
