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

train your own Flax module (its `__call__(x, train)` returns logits):

    run = cnn.train_and_evaluate(config, "/tmp/own", model=Net(num_classes=10))
    cnn.load_run("/tmp/own", model=Net(num_classes=10))  # or config.model.module = "nets.py:Net(width=32)"

cross-validate it (stratified K-fold over the training split, a run per fold):

    summary = cnn.cross_validate(config, "/tmp/digits_cv", folds=5)  # mean and std of each figure

train on your own arrays:

    dataset = cnn.from_arrays(x_train, y_train, x_test, y_test, class_names=None)
    run = cnn.train_and_evaluate(config, "/tmp/mine", dataset=dataset)

and look inside a trained one:

    run = cnn.load_run("/tmp/digits")  # config.json + the newest checkpoint
    cnn.predict(run, images, top_k=3)  # [[(class name, probability), ...], ...]
    cnn.plots.filters(run)  # a matplotlib Figure; see cnn/plots.py for the others
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Each public name and the module that defines it, imported on first use: `import cnn`, and the `cnn` command
# before it picks a subcommand, then start without JAX and Flax or matplotlib (each a second or more).
_HOMES = {
    "ConfigError": "cnn.config", "UserError": "cnn.errors", "base_config": "cnn.config", "load_config": "cnn.config",
    "from_arrays": "cnn.data", "load_dataset": "cnn.data",
    "predict": "cnn.inference",
    "Sequential": "cnn.models", "build_model": "cnn.models", "presets": "cnn.models",
    "load_run": "cnn.run",
    "TrainResult": "cnn.train", "TrainState": "cnn.train", "checkpoint": "cnn.train", "eval_step": "cnn.train",
    "summary": "cnn.train", "train_and_evaluate": "cnn.train", "train_step": "cnn.train",
    "cross_validate": "cnn.train.folds",
    "plots": "cnn.plots",
}
__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # type checkers and editors do not run __getattr__
    from cnn import plots
    from cnn.config import ConfigError, base_config, load_config
    from cnn.data import from_arrays, load_dataset
    from cnn.errors import UserError
    from cnn.inference import predict
    from cnn.models import Sequential, build_model, presets
    from cnn.run import load_run
    from cnn.train import TrainResult, TrainState, checkpoint, eval_step, summary, train_and_evaluate, train_step
    from cnn.train.folds import cross_validate


def __getattr__(name: str):
    """Imports a public name's module on first use (PEP 562) and keeps the name."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'cnn' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if home == f"cnn.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
