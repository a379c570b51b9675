"""The run configuration: every field a run reads, its default, and its checks.

Each file in `configs/` starts from `base_config()` and changes only what
differs, so a reader sees the whole schema in one place (here) and each
experiment's intent in a few lines (there).
"""

from __future__ import annotations

import importlib.util
import numbers
import os
from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict


class ConfigError(ValueError):
    """A problem the user can fix by changing the config or the command line.

    The message names the field, the bad value and what would work; the CLI
    prints it alone, without a traceback.
    """


class Pruned(Exception):
    """A sweep's pruner stopped the trial at an epoch end, after saving its checkpoint (cnn.main exits with 3)."""


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")
PAD_MODES = ("constant", "reflect")
LOSSES = ("auto", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")


def base_config() -> ml_collections.ConfigDict:
    """Returns the full schema with defaults (the classic Flax MNIST recipe)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # 'digits' (embedded in scikit-learn, offline) or any TFDS image
    # classification dataset, e.g. 'mnist', 'fashion_mnist', 'eurosat/rgb'.
    c.data.name = "mnist"
    c.data.train_split = "train"
    c.data.test_split = "test"
    # Where TFDS keeps prepared data; None means $TFDS_DATA_DIR or
    # ~/tensorflow_datasets.
    c.data.data_dir = config_dict.placeholder(str)
    # A folder holding the dataset's original archive files, used to prepare
    # it without a network.
    c.data.manual_dir = config_dict.placeholder(str)
    # (height, width) to resize images to when loading; None keeps them.
    c.data.image_size = config_dict.placeholder(tuple)
    # Per-channel mean and std applied after scaling pixels to [0, 1].
    c.data.mean = config_dict.placeholder(tuple)
    c.data.std = config_dict.placeholder(tuple)
    # Keep decoded arrays next to the prepared data so later runs skip
    # decoding (and TensorFlow).
    c.data.cache = True
    # Image channels after loading: 1 (RGB to grey), 3 (grey to RGB) or None
    # (as stored).
    c.data.channels = config_dict.placeholder(int)
    # Training augmentation, per example inside the compiled step
    # (data.augment): pad by this many pixels and crop back at a random
    # offset (0: off), the padding zeros ('constant') or mirrored ('reflect');
    # and mirror half of the images left to right.
    c.data.crop_padding = 0
    c.data.pad_mode = "constant"
    c.data.flip = False
    # Text sets: words kept in the vocabulary (built from the training split;
    # ids 0 and 1 are padding and unknown words), and the ids per text (longer
    # texts are cut, shorter padded). max_length is also the length of
    # 'synthetic_series'.
    c.data.vocab_size = 20000
    c.data.max_length = 256

    c.model = ml_collections.ConfigDict()
    # A named architecture instead of `layers`: 'flax_cnn', 'keras_seed',
    # 'keras_seed_binary', 'lenet5', 'vgg' or 'resnet20', optionally with
    # overrides written as a call, e.g. "vgg(widths=(32, 64), depths=(2, 2))"
    # (see cnn/presets.py). Set `layers = ()` when using one.
    c.model.preset = config_dict.placeholder(str)
    # Units of a preset's output layer; None means the dataset's class count
    # where the caller passes it to models.build_model.
    c.model.num_classes = config_dict.placeholder(int)
    # Keras-style layer specs, one string per layer; see cnn/layers.py.
    # These defaults are the 'flax_cnn' preset for ten classes.
    c.model.layers = (
        "Conv2D(32, 3, activation='relu', padding='same')",
        "AveragePooling2D(2)",
        "Conv2D(64, 3, activation='relu', padding='same')",
        "AveragePooling2D(2)",
        "Flatten()",
        "Dense(256, activation='relu')",
        "Dense(10)",
    )
    # 'auto': sigmoid binary cross-entropy for one output unit, softmax
    # cross-entropy otherwise.
    c.loss = "auto"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9  # sgd only; 0 disables momentum
    c.optimizer.nesterov = False  # sgd only
    c.optimizer.b1 = 0.9  # adam and adamw
    c.optimizer.b2 = 0.999  # adam and adamw
    c.optimizer.weight_decay = 0.0  # decoupled for adamw, added to grads else
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_epochs = 0.0  # warmup_cosine only
    # warmup_cosine only: epochs at which the schedule starts a new warmup
    # and cosine cycle (warm restarts, Loshchilov & Hutter 2017), e.g. (1,)
    # for a one-epoch cycle that anneals early, then one to train.num_epochs.
    # Restarts at or after train.num_epochs are left out, so a shortened run
    # (--config.train.num_epochs=1) keeps the cycles that fit.
    c.optimizer.restart_epochs = ()

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10
    c.train.batch_size = 128
    c.train.eval_batch_size = 1000
    # Checkpoints: every this many steps (0: only at epoch ends) and at the
    # end of every epoch, keeping the newest few. A rerun resumes from them.
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 3
    # Devices to split each batch over; 0 means every local device. On a CPU
    # 0 splits it into one host device per two cores (see sharding.py).
    c.train.num_devices = 0
    # 'bfloat16' computes the forward and backward pass in bf16 while the
    # parameters and optimizer state stay float32 (mixed precision).
    c.train.compute_dtype = "float32"
    # Gradient accumulation: each step's batch in parts of this many examples,
    # one compiled call each, then one update (the batch size: off). 0 lets
    # sharding.micro_batch_size choose for the hardware.
    c.train.micro_batch_size = 0
    return c


def load(path: str) -> ml_collections.ConfigDict:
    """Returns `get_config()` from a config file, as `--config=PATH` does.

    In a notebook, change fields by assignment afterwards:
    `config.train.num_epochs = 3`.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a file such as configs/mnist.py")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config() function")
    return module.get_config()


def check_fields(config: ml_collections.ConfigDict, keys: Iterable[str], where: str) -> None:
    """Raises ConfigError for the first dotted key ('train.num_epochs') that names no field of `config`.

    Overrides are checked before anything runs, so a typo is one line, not a
    failure deep in training. `where` starts the message, e.g. '--config.'.
    """
    for key in keys:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                section = ".".join(parts[:i]) or "the config"
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (not a section)"
                raise ConfigError(f"{where}{key}: {section} has no field {part!r}; its fields: {known}")
            node = node[part]


def _need(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is not valid: expected {expected}")


def _positive_int(field: str, value) -> None:
    _need(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0,
          field, value, "a positive integer")


def _pair_of_numbers(field: str, value, length: int | None = None) -> None:
    ok = isinstance(value, Iterable) and all(isinstance(v, numbers.Real) for v in value)
    _need(ok and (length is None or len(value) == length), field, value,
          f"a tuple of {length or 'per-channel'} numbers")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every scalar field; layers and datasets are checked where built."""
    _need(isinstance(config.seed, numbers.Integral), "seed", config.seed, "an integer")
    t = config.train
    _positive_int("train.num_epochs", t.num_epochs)
    _positive_int("train.batch_size", t.batch_size)
    _positive_int("train.eval_batch_size", t.eval_batch_size)
    _positive_int("train.keep_checkpoints", t.keep_checkpoints)
    _need(isinstance(t.checkpoint_every_steps, numbers.Integral) and t.checkpoint_every_steps >= 0,
          "train.checkpoint_every_steps", t.checkpoint_every_steps, "0 (epoch ends only) or a positive integer")
    _need(isinstance(t.num_devices, numbers.Integral) and t.num_devices >= 0,
          "train.num_devices", t.num_devices, "0 (all local devices) or a positive integer")
    _need(t.compute_dtype in COMPUTE_DTYPES, "train.compute_dtype", t.compute_dtype,
          f"one of {', '.join(COMPUTE_DTYPES)}")
    _need(isinstance(t.micro_batch_size, numbers.Integral) and not isinstance(t.micro_batch_size, bool)
          and t.micro_batch_size >= 0
          and (t.micro_batch_size == 0 or t.batch_size % t.micro_batch_size == 0),
          "train.micro_batch_size", t.micro_batch_size, "0 (automatic) or a divisor of train.batch_size")

    o = config.optimizer
    _need(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {', '.join(OPTIMIZERS)}")
    _need(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {', '.join(SCHEDULES)}")
    _need(isinstance(o.learning_rate, numbers.Real) and o.learning_rate > 0,
          "optimizer.learning_rate", o.learning_rate, "a positive number such as 0.1")
    _need(isinstance(o.momentum, numbers.Real) and 0 <= o.momentum < 1,
          "optimizer.momentum", o.momentum, "a number in [0, 1)")
    for name in ("b1", "b2"):
        value = o[name]
        _need(isinstance(value, numbers.Real) and 0 <= value < 1, f"optimizer.{name}", value, "a number in [0, 1)")
    _need(isinstance(o.weight_decay, numbers.Real) and o.weight_decay >= 0,
          "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _need(isinstance(o.warmup_epochs, numbers.Real) and 0 <= o.warmup_epochs <= t.num_epochs,
          "optimizer.warmup_epochs", o.warmup_epochs, f"a number between 0 and train.num_epochs={t.num_epochs}")
    restarts = o.restart_epochs
    _need(isinstance(restarts, (tuple, list)) and all(
        isinstance(e, numbers.Real) and not isinstance(e, bool) and 0 < e < float("inf") for e in restarts)
        and list(restarts) == sorted(set(restarts)), "optimizer.restart_epochs", restarts,
        "increasing positive epochs such as (1,), or () for none")
    if restarts and o.schedule != "warmup_cosine":
        raise ConfigError(f"optimizer.restart_epochs={tuple(restarts)} needs optimizer.schedule='warmup_cosine' "
                          f"(now {o.schedule!r}); set it, or set restart_epochs=()")

    _need(config.loss in LOSSES, "loss", config.loss, f"one of {', '.join(LOSSES)}")

    d = config.data
    _need(isinstance(d.name, str) and d.name != "", "data.name", d.name, "a dataset name such as 'mnist' or 'digits'")
    if d.image_size is not None:
        _pair_of_numbers("data.image_size", d.image_size, 2)
        _need(all(int(v) == v and v > 0 for v in d.image_size), "data.image_size", d.image_size,
              "(height, width) in whole pixels")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std must be set together (or both left as None)")
    if d.mean is not None:
        _pair_of_numbers("data.mean", d.mean)
        _pair_of_numbers("data.std", d.std, len(d.mean))
        _need(all(s > 0 for s in d.std), "data.std", d.std, "positive numbers")
    if d.channels is not None:
        _need(d.channels in (1, 3) and not isinstance(d.channels, bool), "data.channels", d.channels,
              "1 (grey), 3 (RGB) or None (as stored)")
    _need(isinstance(d.crop_padding, numbers.Integral) and not isinstance(d.crop_padding, bool)
          and d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "0 (no random crop) or a positive integer")
    _need(d.pad_mode in PAD_MODES, "data.pad_mode", d.pad_mode, f"one of {', '.join(PAD_MODES)}")
    _need(isinstance(d.flip, bool), "data.flip", d.flip, "True or False")
    _need(isinstance(d.vocab_size, numbers.Integral) and not isinstance(d.vocab_size, bool) and d.vocab_size >= 3,
          "data.vocab_size", d.vocab_size, "an integer >= 3 (ids 0 and 1 are padding and unknown words)")
    _positive_int("data.max_length", d.max_length)
    if d.manual_dir is not None and not os.path.isdir(d.manual_dir):
        raise ConfigError(f"data.manual_dir={d.manual_dir!r} is not a folder; point it at the folder "
                          "holding the dataset's original archive files")
    m = config.model
    if m.get("num_classes") is not None:
        _positive_int("model.num_classes", m.num_classes)
    if m.get("preset") is not None:
        from cnn import presets  # no flax import: checks the name and the overrides only

        presets.parse(m.preset)
        if m.layers:
            raise ConfigError(f"model.preset={m.preset!r} and model.layers are both set; keep one: set "
                              "model.layers=() to use the preset, or model.preset=None to use the layers")
    elif not isinstance(m.layers, (tuple, list)) or not m.layers:
        raise ConfigError(f"model.layers={m.layers!r} is not valid: expected a tuple of layer specs "
                          "such as (\"Conv2D(32, 3, activation='relu')\", 'Flatten()', 'Dense(10)'), "
                          "or set model.preset such as 'resnet20'")
