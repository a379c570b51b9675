"""The run configuration: every field a run reads, its default, and its checks.

Each file in `configs/` starts from `base_config()` and changes only what
differs, so a reader sees the whole schema in one place (here) and each
experiment's intent in a few lines (there).
"""

from __future__ import annotations

import importlib.util
import numbers
import os
import traceback
import types
from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict

from cnn.data_sources import OWN_DATA
from cnn.errors import ConfigError, int_at_least, is_int, require

__all__ = ["ConfigError", "RERUN_MAY_CHANGE", "base_config", "call_file", "changed_fields", "check_fields", "file_error",
           "load_config", "run_file", "unknown_field", "validate"]

# optax's optimizers of these names (muon from optax.contrib); cnn/train/optimizer.py builds them.
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "lamb", "lion", "rmsprop", "adagrad", "adafactor", "muon")
SCHEDULES = ("constant", "warmup_cosine", "step", "one_cycle", "linear", "exponential")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
PAD_MODES = ("constant", "reflect")
LOSS_NAMES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy")  # cnn.losses.LOSSES: what each one computes
LOSSES = ("auto", *LOSS_NAMES)  # auto: the one the model's output fits (cnn.losses.auto)
KERNELS = ("auto", "xla", "onednn")
PREPROCESSING = ("caffe", "tf", "torch")  # cnn/data/images.py applies them
# The epoch record's metrics train.monitor can name (cnn/train/monitor.py judges by them): top5_accuracy is
# recorded for more than five classes, roc_auc and average_precision for two.
MONITORS = ("test_accuracy", "test_loss", "macro_f1", "balanced_accuracy", "top5_accuracy", "roc_auc",
            "average_precision", "train_accuracy", "train_loss")
TTA = ("flip",)  # eval.tta: cnn/train/tta.py makes the views
# The fields a rerun on a workdir that holds checkpoints may change: how often the run logs, saves and draws,
# how it evaluates and where it finds its data. Every other field changes what a step computes (the model, the
# data and its augmentation, the optimizer, seed and model.pretrained (the start), batch and micro-batch size,
# dtype, kernels, devices, loss, num_epochs through the schedule), so a change there would make config.json misstate
# how the checkpoints were made: such a rerun is refused (`changed_fields`).
RERUN_MAY_CHANGE = (
    "train.pictures", "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.eval_batch_size", "data.data_dir", "data.manual_dir", "data.cache_dir", "data.cache",
    "data.max_memory_gb", "data.strict",
)


def base_config() -> ml_collections.ConfigDict:
    """Returns the full schema with defaults (the classic Flax MNIST recipe)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # 'digits' (embedded in scikit-learn, offline), 'synthetic_series', any
    # TFDS image or text classification dataset ('mnist', 'fashion_mnist',
    # 'eurosat/rgb', 'imdb_reviews', ...), or your own data at data.path:
    # 'image_folder', 'text_folder', 'series_file' or 'npz'. The registry of
    # sources is cnn/data_sources.py.
    c.data.name = "mnist"
    c.data.train_split = "train"
    c.data.test_split = "test"
    # Where TFDS keeps prepared data; None means $TFDS_DATA_DIR or
    # ~/tensorflow_datasets.
    c.data.data_dir = config_dict.placeholder(str)
    # A folder holding the dataset's original archive files, used to prepare
    # it without a network. For 'mnist', 'fashion_mnist' and 'kmnist', the
    # four IDX archives (train-images-idx3-ubyte.gz, ...) there are read
    # directly, with no TFDS preparation and no TensorFlow.
    c.data.manual_dir = config_dict.placeholder(str)
    # Your own data: a folder of class folders (ROOT/<class>/<files>) for
    # 'image_folder' and 'text_folder', a .ts/.tsv/.csv file for
    # 'series_file', an .npz file for 'npz'.
    c.data.path = config_dict.placeholder(str)
    # The test data in the same form; None holds out test_fraction of the
    # training data, stratified by class and drawn from `seed`.
    c.data.test_path = config_dict.placeholder(str)
    c.data.test_fraction = 0.2
    # Refuse a file that cannot be decoded (naming it) instead of skipping it;
    # skipped files are listed in WORKDIR/skipped_files.txt.
    c.data.strict = False
    # Where decoded folders and files are cached; None means $CNN_CACHE_DIR,
    # else ~/.cache/cnn. (TFDS sets are cached beside their prepared data.)
    c.data.cache_dir = config_dict.placeholder(str)
    # (height, width) to resize images to when loading; None keeps them.
    c.data.image_size = config_dict.placeholder(tuple)
    # Per-channel mean and std applied after scaling pixels to [0, 1].
    c.data.mean = config_dict.placeholder(tuple)
    c.data.std = config_dict.placeholder(tuple)
    # Instead of mean and std: the input scaling a set of pretrained weights
    # was trained with, as Keras's imagenet_utils.preprocess_input does it:
    # 'caffe' (BGR, ImageNet mean pixel subtracted), 'tf' (to [-1, 1]),
    # 'torch' (to [0, 1], ImageNet mean and std), or None.
    c.data.preprocessing = config_dict.placeholder(str)
    # Keep decoded arrays (next to prepared TFDS data, or in data.cache_dir)
    # so later runs skip decoding (and TensorFlow).
    c.data.cache = True
    # Budget for decoded data in RAM per process, in GB (10**9 bytes); None:
    # a quarter of the machine's memory divided by its local processes. A
    # decoded image folder or .npz larger than this streams from its on-disk
    # cache (a batch at a time, read ahead by a thread) instead of loading.
    c.data.max_memory_gb = config_dict.placeholder(float)
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
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), inside the
    # compiled step after the crop and flip: each example is blended with
    # (mixup), or has a random box pasted from (cutmix), its partner in the
    # batch reversed, with its own ratio drawn from Beta(alpha, alpha); its
    # target becomes the same blend of the two one-hot labels. 0.0: off. With
    # both on, each step uses one of them, chosen at random (as timm does).
    c.data.mixup_alpha = 0.0
    c.data.cutmix_alpha = 0.0
    # Text sets: words kept in the vocabulary (built from the training split;
    # ids 0 and 1 are padding and unknown words), and the ids per text (longer
    # texts are cut, shorter padded; None: 256). max_length is also the
    # length of 'synthetic_series' (None: 128) and of every series of a
    # 'series_file' (None: the longest, the others padded with zeros).
    c.data.vocab_size = 20000
    c.data.max_length = config_dict.placeholder(int)

    c.model = ml_collections.ConfigDict()
    # A named architecture instead of `layers`: 'flax_cnn', 'keras_seed',
    # 'keras_seed_binary', 'lenet5', 'vgg', 'resnet20' or 'fcn' (1D), optionally with
    # overrides written as a call, e.g. "vgg(widths=(32, 64), depths=(2, 2))"
    # (see cnn/models/presets.py). Set `layers = ()` when using one.
    c.model.preset = config_dict.placeholder(str)
    # Units of a preset's output layer; None means the dataset's class count
    # where the caller passes it to models.build_model.
    c.model.num_classes = config_dict.placeholder(int)
    # Keras-style layer specs, one string per layer; see cnn/models/layers.py.
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
    # Your own Flax Linen module instead of `layers` or `preset`: a class (or
    # a function returning a module) in a file, "path/to/nets.py:Net", or
    # in an importable package, "my_package.nets:Net", with literal keyword
    # arguments as a call: "nets.py:Net(width=32)". cnn calls it with
    # num_classes=N plus those; its __call__(x, train) returns logits (see
    # cnn/models/module.py). Set `layers = ()` when using one. A run records
    # a file's absolute path in its config.json.
    c.model.module = config_dict.placeholder(str)
    # Start from trained weights instead of random ones: a weight file (a
    # Keras .h5 of the same architecture, e.g. a keras.applications file for
    # model.preset='resnet50'), or a cnn workdir (its newest checkpoint's
    # parameters and batch statistics). The head is left at its initial
    # values when its shape differs (another class count). A backbone
    # preset's file also sets data.preprocessing when that is None. Only the
    # start: a rerun with checkpoints resumes from them (docs/finetuning.md).
    c.model.pretrained = config_dict.placeholder(str)
    # 'auto': sigmoid binary cross-entropy for one output unit, softmax
    # cross-entropy otherwise.
    c.loss = "auto"
    # Label smoothing for training: the target of class k becomes
    # (1 - s) * onehot + s / classes (a one-unit sigmoid head counts two
    # classes, so its target moves toward 0.5). 0.0: off.
    c.loss_label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    # One of OPTIMIZERS above: optax's function of that name.
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.momentum = 0.9  # sgd only; 0 disables momentum
    c.optimizer.nesterov = False  # sgd only
    c.optimizer.b1 = 0.9  # adam, adamw and nadam
    c.optimizer.b2 = 0.999  # adam, adamw and nadam
    # Decoupled for the optimizers that take weight_decay (adamw, lamb, lion,
    # muon), added to the gradients for the others.
    c.optimizer.weight_decay = 0.0
    # 'constant', 'warmup_cosine' (warmup_epochs up, cosine down, restarts
    # at restart_epochs), 'step' (times decay_factor at boundaries_epochs),
    # 'one_cycle' (optax's cosine one-cycle: from learning_rate/25 up to
    # learning_rate over warmup_epochs, or 30% of the run if 0, then down
    # to learning_rate/2.5e5), 'linear' (down to 0 at the end of the run) or
    # 'exponential' (times decay_factor per epoch).
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_epochs = 0.0  # warmup_cosine and one_cycle
    # warmup_cosine only: epochs at which the schedule starts a new warmup
    # and cosine cycle (warm restarts, Loshchilov & Hutter 2017), e.g. (1,)
    # for a one-epoch cycle that anneals early, then one to train.num_epochs.
    # Restarts at or after train.num_epochs are left out, so a shortened run
    # (--config.train.num_epochs=1) keeps the cycles that fit.
    c.optimizer.restart_epochs = ()
    # With model.pretrained: the learning rate of every layer but the head,
    # relative to the head's (0 freezes them, as train.freeze_epochs does).
    c.optimizer.backbone_lr_scale = 1.0
    # 'step' only: epochs at which the rate is multiplied by decay_factor,
    # e.g. (30, 60). 'exponential' multiplies it by decay_factor per epoch,
    # continuously (so 0.9 there, not 0.1).
    c.optimizer.boundaries_epochs = ()
    c.optimizer.decay_factor = 0.1
    # Clip the gradients to this global norm before the optimizer (0: off).
    c.optimizer.clip_norm = 0.0
    # More keyword arguments of the optax optimizer, checked against its
    # signature, e.g. {'eps': 1e-6} for adam or {'b2': 0.98} for lion;
    # learning_rate and weight_decay come from the fields above, and so do
    # momentum and nesterov for sgd, b1 and b2 for adam, adamw and nadam.
    # From the command line: --config.optimizer.args="{'b2': 0.98}".
    c.optimizer.args = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 10
    # With model.pretrained: train only the head for this many epochs (the
    # rest of the model in inference mode, its weights and batch-norm
    # statistics unchanged), then everything.
    c.train.freeze_epochs = 0
    c.train.batch_size = 128
    c.train.eval_batch_size = 1000
    # Checkpoints: every this many steps (0: only at epoch ends) and at the
    # end of every epoch, keeping the newest few. A rerun resumes from them.
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 3
    # Step records (WORKDIR/steps.jsonl and TensorBoard's train/loss,
    # train/accuracy, learning_rate): the mean training loss and accuracy of
    # every this many steps, and the learning rate (0: epoch ends only).
    c.train.log_every_steps = 50
    # `python -m cnn.main` draws WORKDIR/plots/*.png and their TensorBoard
    # copies after training (seconds of matplotlib); False
    # skips them, e.g. for sweep trials. `python -m cnn.visualize` draws
    # them later from the workdir either way.
    c.train.pictures = True
    # Devices to split each batch over; 0 means every local device. On a CPU
    # 0 is one host device where oneDNN computes the convolutions (the
    # extension built, kernels not 'xla'), else one per two cores
    # (cnn.kernels.cpu_devices, docs/devices.md).
    c.train.num_devices = 0
    # 'bfloat16' computes the forward and backward pass in bf16 while the
    # parameters and optimizer state stay float32 (mixed precision). 'auto':
    # bfloat16 where it pays (a CPU with bf16 instructions and oneDNN's
    # extension, cnn/kernels), float32 elsewhere; the start-up line says which.
    c.train.compute_dtype = "float32"
    # Gradient accumulation: each step's batch in parts of this many examples,
    # one compiled call each, then one update (the batch size: off). 0 lets
    # sharding.micro_batch_size choose for the hardware.
    c.train.micro_batch_size = 0
    # How layers compute: 'auto' takes the fast paths in cnn/kernels that pay
    # on this hardware (on a CPU with bf16 instructions, oneDNN for bf16
    # layers when its extension is built), 'onednn' oneDNN for every conv,
    # dense layer and tiling average pool it can take, 'xla' plain Flax and
    # XLA everywhere (same results up to float rounding).
    c.train.kernels = "auto"
    # The end-of-epoch decisions (cnn/train/monitor.py): the epoch record's
    # metric that judges epochs ('test_accuracy', 'test_loss', 'macro_f1',
    # ... MONITORS; a loss is better lower, the others higher); keep_best
    # keeps the best epoch's state in WORKDIR/best_checkpoint/, which
    # prediction then uses; early stopping ends the run once the metric has
    # not improved for this many epochs (0: off). The learning rate schedule
    # stays the one num_epochs sets: a stopped run just ends sooner on it.
    c.train.monitor = "test_accuracy"
    c.train.keep_best = False
    c.train.early_stopping_patience = 0
    # Weights of the classes in the training loss: None (all 1), 'balanced'
    # (n_samples / (n_classes * count of the class) over the training labels,
    # as scikit-learn's compute_class_weight) or one number per class. Each
    # example's loss is multiplied by its class's weight and the batch's loss
    # is their sum divided by the batch size (Keras's class_weight does the
    # same); test_loss stays unweighted.
    c.train.class_weights = config_dict.placeholder(object)
    # Exponential moving average of the parameters, updated after every step
    # with decay min(ema_decay, (1 + t) / (10 + t)) at update t (warming up
    # as TensorFlow's and timm's do); evaluation, prediction, pictures and
    # exports use the average. Batch-norm statistics are the trained ones.
    # 0: off.
    c.train.ema_decay = 0.0

    c.eval = ml_collections.ConfigDict()
    # Test-time augmentation: None, or 'flip', which averages the class
    # probabilities of each image and its left-right mirror. It applies to
    # the test evaluation (metrics.jsonl, results.json) and to prediction and
    # exports of the run; images only.
    c.eval.tta = config_dict.placeholder(str)
    return c


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns `get_config()` from a config file, as `--config=PATH` does.

    In a notebook, change fields by assignment afterwards:
    `config.train.num_epochs = 3`.
    """
    config = call_file(path, "get_config", "config file", "configs/mnist.py")
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict; end it with "
                          "`return config`, as configs/mnist.py does")
    return config


def call_file(path: str, function: str, kind: str, example: str):
    """Runs the user's Python file `path` and returns `function()`; any failure is one ConfigError line.

    The line names the file and the line of it where things went wrong
    (`configs/x.py, line 12: SyntaxError: ...`): a traceback through
    importlib is no help to someone who only wrote the file.
    """
    module = run_file(path, kind, example)
    if not callable(getattr(module, function, None)):
        raise ConfigError(f"{path} has no {function}() function; define one that returns the {kind.split()[0]}, "
                          f"as {example} does")
    try:
        return getattr(module, function)()
    except Exception as e:  # noqa: BLE001
        raise file_error(path, e) from None


def run_file(path: str, kind: str, example: str) -> types.ModuleType:
    """Runs the user's Python file `path` as a module and returns it; a failure is one ConfigError line naming
    the file and line (see `call_file`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{kind} {path!r} does not exist; pass a file such as {example}")
    try:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the user's file raised, a SyntaxError included
        raise file_error(path, e) from None
    return module


def file_error(path: str, error: Exception) -> ConfigError:
    """`path, line N: Type: message`, N the last line of the user's file the error came through."""
    if isinstance(error, SyntaxError):  # in the file itself, or in a module it imports
        same = error.filename and os.path.abspath(error.filename) == os.path.abspath(path)
        return ConfigError(f"{path if same else error.filename}, line {error.lineno}: SyntaxError: {error.msg}")
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(path)]
    where = f"{path}, line {lines[-1]}" if lines else path
    message = (str(error).strip().splitlines() or [""])[0]
    if isinstance(error, ConfigError):  # cnn's own check, already worded for the user
        return ConfigError(f"{where}: {message}")
    return ConfigError(f"{where}: {type(error).__name__}" + (f": {message}" if message else ""))


def unknown_field(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Why the dotted `key` names no field of `config` ("train has no field 'x'; its fields: ..."), or None."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not hasattr(node, "keys") or part not in node:
            where = ".".join(parts[:i]) or "the config"
            known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (not a section)"
            return f"{where} has no field {part!r}; its fields: {known}"
        node = node[part]
    return None


def check_fields(config: ml_collections.ConfigDict, keys: Iterable[str], where: str) -> None:
    """Every override must name a field the config has: refused now, not after an hour of other work.

    `where` starts the message, e.g. '--config.'.
    """
    for key in keys:
        problem = unknown_field(config, key)
        if problem:
            raise ConfigError(f"{where}{key}: {problem}")


# Fields whose value is a free-form dict: compared whole, so a key set in one config and not the other counts.
_DICT_FIELDS = ("optimizer.args",)


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train.batch_size': 128, ...} from a nested dict, as JSON has it (tuples are lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in _DICT_FIELDS:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(saved: dict, config: ml_collections.ConfigDict) -> list[tuple[str, object, object]]:
    """(field, saved value, new value) for each field outside RERUN_MAY_CHANGE on which `config` differs from
    `saved`, a workdir's config.json. A field config.json lacks (it predates the field) counts as its default."""
    import json

    new = _flat(json.loads(config.to_json_best_effort()))
    old = {**_flat(json.loads(base_config().to_json_best_effort())), **_flat(saved)}
    return [(key, old.get(key), value) for key, value in new.items()
            if key not in RERUN_MAY_CHANGE and old.get(key) != value]


def _number(value, field: str, low: float, high: float, expected: str, high_open: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and low <= value and (
        value < high if high_open else value <= high)
    require(ok, field, value, expected)


def _numbers(value, field: str, length: int | None = None) -> None:
    ok = isinstance(value, Iterable) and all(isinstance(v, numbers.Real) for v in value)
    require(ok and (length is None or len(value) == length), field, value,
            f"a tuple of {length or 'per-channel'} numbers")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every scalar field; layer specs and presets are checked by cnn.models, datasets where loaded."""
    require(is_int(config.seed), "seed", config.seed, "an integer")
    require(config.loss in LOSSES, "loss", config.loss, f"one of {', '.join(LOSSES)}")
    _number(config.get("loss_label_smoothing", 0.0), "loss_label_smoothing", 0, 1, "a number in [0, 1) such as 0.1")
    _validate_train(config.train)
    _validate_optimizer(config.optimizer, config.train.num_epochs)
    _validate_data(config.data)
    tta = config.eval.tta if "eval" in config else None
    require(tta is None or tta in TTA, "eval.tta", tta, f"None or one of {', '.join(map(repr, TTA))}")
    if config.model.get("num_classes") is not None:
        int_at_least(config.model.num_classes, "model.num_classes")
    _validate_finetuning(config)


def _validate_finetuning(config: ml_collections.ConfigDict) -> None:
    """model.pretrained, train.freeze_epochs and optimizer.backbone_lr_scale; the file itself is read at set-up."""
    pretrained = config.model.get("pretrained")
    require(pretrained is None or (isinstance(pretrained, str) and pretrained != ""), "model.pretrained", pretrained,
            "a weight file or a cnn workdir, or None")
    if pretrained is not None and not os.path.exists(os.path.expanduser(pretrained)):
        raise ConfigError(f"model.pretrained={pretrained!r} does not exist; give a weight file (a Keras .h5 such as "
                          "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5) or the workdir of a cnn run")
    freeze, scale = config.train.get("freeze_epochs", 0), config.optimizer.get("backbone_lr_scale", 1.0)
    int_at_least(freeze, "train.freeze_epochs", 0, "0 (no freezing) or a number of epochs")
    _number(scale, "optimizer.backbone_lr_scale", 0, float("inf"), "a number >= 0 (0 freezes the backbone)")
    for field, value, default in (("train.freeze_epochs", freeze, 0), ("optimizer.backbone_lr_scale", scale, 1.0)):
        if value != default and pretrained is None:
            raise ConfigError(f"{field}={value!r} needs a pretrained backbone, and model.pretrained is None; set "
                              f"model.pretrained to a weight file or a cnn workdir, or {field}={default!r}")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    for name in ("num_epochs", "batch_size", "eval_batch_size", "keep_checkpoints"):
        int_at_least(t[name], f"train.{name}")
    int_at_least(t.checkpoint_every_steps, "train.checkpoint_every_steps", 0,
                 "0 (epoch ends only) or a positive integer")
    int_at_least(t.log_every_steps, "train.log_every_steps", 0, "0 (epoch ends only) or a positive integer")
    int_at_least(t.num_devices, "train.num_devices", 0, "0 (all local devices) or a positive integer")
    require(t.compute_dtype in COMPUTE_DTYPES, "train.compute_dtype", t.compute_dtype,
            f"one of {', '.join(COMPUTE_DTYPES)}")
    micro = t.micro_batch_size
    require(is_int(micro) and micro >= 0 and (micro == 0 or t.batch_size % micro == 0), "train.micro_batch_size",
            micro, "0 (automatic) or a divisor of train.batch_size")
    require(isinstance(t.get("pictures", True), bool), "train.pictures", t.get("pictures"), "True or False")
    require(t.get("kernels", "auto") in KERNELS, "train.kernels", t.get("kernels"), f"one of {', '.join(KERNELS)}")
    require(t.get("monitor", "test_accuracy") in MONITORS, "train.monitor", t.get("monitor"),
            f"a metric of the epoch records: one of {', '.join(MONITORS)}")
    require(isinstance(t.get("keep_best", False), bool), "train.keep_best", t.get("keep_best"), "True or False")
    int_at_least(t.get("early_stopping_patience", 0), "train.early_stopping_patience", 0,
                 "0 (off) or a positive number of epochs")
    weights = t.get("class_weights")
    listed = isinstance(weights, (tuple, list)) and len(weights) > 0 and all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w < float("inf") for w in weights)
    require(weights is None or weights == "balanced" or listed, "train.class_weights", weights,
            "None, 'balanced' or a tuple of one weight >= 0 per class")
    _number(t.get("ema_decay", 0.0), "train.ema_decay", 0, 1, "a number in [0, 1) such as 0.999 (0: off)")


def _validate_optimizer(o: ml_collections.ConfigDict, num_epochs: int) -> None:
    require(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {', '.join(OPTIMIZERS)}")
    require(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {', '.join(SCHEDULES)}")
    require(isinstance(o.learning_rate, numbers.Real) and o.learning_rate > 0,
            "optimizer.learning_rate", o.learning_rate, "a positive number such as 0.1")
    for name in ("momentum", "b1", "b2"):
        _number(o[name], f"optimizer.{name}", 0, 1, "a number in [0, 1)")
    _number(o.weight_decay, "optimizer.weight_decay", 0, float("inf"), "a number >= 0", high_open=False)
    _number(o.warmup_epochs, "optimizer.warmup_epochs", 0, num_epochs,
            f"a number between 0 and train.num_epochs={num_epochs}", high_open=False)
    _epochs_for_schedule(o, "restart_epochs", "warmup_cosine",
                         "increasing positive epochs such as (1,), or () for none")
    _validate_recipe_optimizer(o)


def _epochs_for_schedule(o: ml_collections.ConfigDict, field: str, schedule: str, expected: str) -> None:
    """optimizer.<field>: increasing positive epochs, which only optimizer.schedule=`schedule` reads."""
    epochs = o.get(field, ())
    require(isinstance(epochs, (tuple, list)) and all(
        isinstance(e, numbers.Real) and not isinstance(e, bool) and 0 < e < float("inf") for e in epochs)
        and list(epochs) == sorted(set(epochs)), f"optimizer.{field}", epochs, expected)
    if epochs and o.schedule != schedule:
        raise ConfigError(f"optimizer.{field}={tuple(epochs)} needs optimizer.schedule={schedule!r} (now "
                          f"{o.schedule!r}); set it, or set {field}=()")


# The fields each optimizer reads besides learning_rate and weight_decay (cnn/train/optimizer.py); the others take
# their hyperparameters from optimizer.args.
OPTIMIZER_FIELDS = {"sgd": ("momentum", "nesterov"), "adam": ("b1", "b2"), "adamw": ("b1", "b2"), "nadam": ("b1", "b2")}


def _validate_recipe_optimizer(o: ml_collections.ConfigDict) -> None:
    """The fields of optax's wider optimizer set and schedules: clip_norm, args, boundaries_epochs, decay_factor."""
    _number(o.get("clip_norm", 0.0), "optimizer.clip_norm", 0, float("inf"), "a number >= 0 (0: off)")
    factor = o.get("decay_factor", 0.1)
    require(isinstance(factor, numbers.Real) and not isinstance(factor, bool) and 0 < factor < float("inf"),
            "optimizer.decay_factor", factor, "a positive number such as 0.1 ('step') or 0.9 ('exponential')")
    _epochs_for_schedule(o, "boundaries_epochs", "step", "increasing positive epochs such as (30, 60), or ()")
    args = o.get("args", {})
    require(hasattr(args, "keys") and all(isinstance(k, str) for k in args.keys()), "optimizer.args", args,
            "a dict of keyword arguments of the optax optimizer, such as {'eps': 1e-6}")
    defaults = base_config().optimizer
    for field in ("momentum", "nesterov", "b1", "b2"):  # sgd, adam and adamw ignore the others' fields, as before
        if o.name not in ("sgd", "adam", "adamw") and o[field] != defaults[field] \
                and field not in OPTIMIZER_FIELDS.get(o.name, ()):
            readers = [name for name, fields in OPTIMIZER_FIELDS.items() if field in fields]
            raise ConfigError(f"optimizer.{field}={o[field]!r} is read by {', '.join(readers)} only; for "
                              f"optimizer.name={o.name!r} pass it in optimizer.args (e.g. optimizer.args="
                              f"{{{field!r}: {o[field]!r}}}) if optax.{o.name} takes it")


def _validate_data(d: ml_collections.ConfigDict) -> None:
    require(isinstance(d.name, str) and d.name != "", "data.name", d.name, "a dataset name such as 'mnist' or 'digits'")
    if d.image_size is not None:
        _numbers(d.image_size, "data.image_size", 2)
        require(all(int(v) == v and v > 0 for v in d.image_size), "data.image_size", d.image_size,
                "(height, width) in whole pixels")
    if (d.mean is None) != (d.std is None):
        raise ConfigError("data.mean and data.std must be set together (or both left as None)")
    mode = d.get("preprocessing")
    require(mode is None or mode in PREPROCESSING, "data.preprocessing", mode,
            f"one of {', '.join(map(repr, PREPROCESSING))} (Keras's preprocess_input modes) or None")
    if mode is not None and d.mean is not None:
        raise ConfigError(f"data.preprocessing={mode!r} and data.mean/data.std both scale the inputs; keep one (set "
                          "data.mean=None and data.std=None, or data.preprocessing=None)")
    if d.mean is not None:
        _numbers(d.mean, "data.mean")
        _numbers(d.std, "data.std", len(d.mean))
        require(all(s > 0 for s in d.std), "data.std", d.std, "positive numbers")
    if d.channels is not None:
        require(d.channels in (1, 3) and not isinstance(d.channels, bool), "data.channels", d.channels,
                "1 (grey), 3 (RGB) or None (as stored)")
    budget = d.get("max_memory_gb")
    require(budget is None or (isinstance(budget, numbers.Real) and not isinstance(budget, bool) and 0 < budget
                               < float("inf")), "data.max_memory_gb", budget,
            "a positive number of GB such as 4.0, or None (a quarter of this machine's memory)")
    int_at_least(d.crop_padding, "data.crop_padding", 0, "0 (no random crop) or a positive integer")
    require(d.pad_mode in PAD_MODES, "data.pad_mode", d.pad_mode, f"one of {', '.join(PAD_MODES)}")
    require(isinstance(d.flip, bool), "data.flip", d.flip, "True or False")
    for field in ("mixup_alpha", "cutmix_alpha"):
        _number(d.get(field, 0.0), f"data.{field}", 0, float("inf"), "a number >= 0 such as 0.2 (0: off)")
    int_at_least(d.vocab_size, "data.vocab_size", 3, "an integer >= 3 (ids 0 and 1 are padding and unknown words)")
    if d.max_length is not None:
        int_at_least(d.max_length, "data.max_length", 1, "a positive integer, or None")
    _validate_own_data(d)
    if d.manual_dir is not None and not os.path.isdir(d.manual_dir):
        raise ConfigError(f"data.manual_dir={d.manual_dir!r} is not a folder; point it at the folder "
                          "holding the dataset's original archive files")


def _validate_own_data(d: ml_collections.ConfigDict) -> None:
    """The fields of your own data; whether the files are there (and data.path is set at all: a dataset passed
    to train_and_evaluate needs none) is checked where they are read."""
    for field in ("path", "test_path", "cache_dir"):
        value = d.get(field)
        require(value is None or (isinstance(value, str) and value != ""), f"data.{field}", value,
                "a path, or None")
    for field in ("path", "test_path"):
        if d.name not in OWN_DATA and d.get(field) is not None:
            raise ConfigError(f"data.{field}={d[field]!r} is set but data.name={d.name!r} does not read it; use "
                              f"data.name={' or '.join(map(repr, OWN_DATA))}, or leave data.{field}=None")
    fraction = d.get("test_fraction", 0.2)
    _number(fraction, "data.test_fraction", 0, 1, "a fraction between 0 and 1, such as 0.2")
    require(fraction > 0, "data.test_fraction", fraction, "a fraction between 0 and 1, such as 0.2")
    require(isinstance(d.get("strict", False), bool), "data.strict", d.get("strict"), "True or False")
