"""A finished (or interrupted) run read back from its workdir: config.json, the newest checkpoint, results.

    run = cnn.load_run("runs/mnist")  # as cnn.train_and_evaluate returned it

Prediction, the pictures and their command lines all start from here.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import ml_collections

from cnn import data as data_lib
from cnn import models
from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.train import Recipe, TrainResult, create_state, make_optimizer
from cnn.train import finetune
from cnn.train.checkpoint import Checkpoints


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its config.json)."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"workdir={workdir!r} does not exist; pass the --workdir of a training run "
                          "(python -m cnn.main --config=CONFIG --workdir=DIR)")
    path = os.path.join(workdir, workdir_lib.CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"workdir={workdir!r} has no config.json, so no training run wrote it; pass the --workdir "
                          "given to python -m cnn.main")
    content = workdir_lib.read_json(path)
    missing = [k for k in ("data", "model", "optimizer", "train") if not isinstance(content, dict) or k not in content]
    if missing:
        raise ConfigError(f"{path} is not a config written by training (it lacks {', '.join(missing)}); pass the "
                          "--workdir given to python -m cnn.main, or train again there")
    config = ml_collections.ConfigDict(content)
    if "kernels" not in config.train:  # workdirs from before train.kernels existed
        config.train.kernels = "auto"
    return config


def load_run(workdir: str, model: nn.Module | None = None, checkpoint: str = "auto") -> TrainResult:
    """The trained state of `workdir` (config.json and its newest checkpoint), as `train_and_evaluate` returns it.

    `model` is the module the run trained when config.json cannot name it
    (one made in a notebook: `load_run(workdir, model=Net(num_classes=10))`);
    by default config.model builds it. Class names and the input shape come from results.json; a run still
    training has none yet, and then the dataset is loaded to find them. `checkpoint`: 'auto' takes the best
    epoch's state where the run kept one (train.keep_best), saying so on stderr, else the newest; 'latest' the
    newest, 'best' the best.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint={checkpoint!r} is not valid: expected one of {', '.join(CHECKPOINT_CHOICES)}")
    config = read_config(workdir)
    best = checkpoint == "best" or (checkpoint == "auto" and workdir_lib.has_checkpoints(workdir, workdir_lib.BEST))
    no_checkpoint = ConfigError(f"workdir={workdir!r} has no checkpoint yet; train first (python -m cnn.main "
                                f"--config=CONFIG --workdir={workdir}) or pass the workdir of a run that saved one")
    if best and not workdir_lib.has_checkpoints(workdir, workdir_lib.BEST):
        raise ConfigError(f"workdir={workdir!r} has no best checkpoint (train.keep_best was off, or no epoch has "
                          "ended); load it with checkpoint='latest'")
    if not workdir_lib.has_checkpoints(workdir):
        raise no_checkpoint  # before any work
    results = workdir_lib.read_json(os.path.join(workdir, workdir_lib.RESULTS)) or {}
    if not {"class_names", "input_shape"} <= results.keys():
        results = {**results, **data_lib.describe(data_lib.load_dataset(config.data, config.seed))}
    class_names, input_shape = list(results["class_names"]), tuple(results["input_shape"])
    model = models.build_model(config.model, len(class_names)) if model is None else model
    loss = models.check_head(model, input_shape, len(class_names), config.loss)
    # The optimizer gives the checkpoint's structure; its schedule's length does not matter here.
    head = finetune.head(config, model, input_shape)  # a fine-tuning run's optimizer treats its head apart
    tx = make_optimizer(config.optimizer, 1, config.train.num_epochs, head, config.train.get("freeze_epochs", 0))
    checkpoints = Checkpoints(workdir, folder=workdir_lib.BEST if best else workdir_lib.CHECKPOINTS)
    try:
        restored = checkpoints.restore(create_state(model, tx, input_shape, config.seed, config.train.kernels,
                                                    ema_decay=config.train.get("ema_decay", 0.0)))
    finally:
        checkpoints.close()
    if restored is None:  # every one was damaged, and set aside
        raise no_checkpoint
    history = read_history(workdir)
    if best:
        _say_best(workdir, int(restored[0].step), history, config.train.get("monitor", "test_accuracy"))
    return TrainResult(state=restored[0], model=model, history=history, results=results,
                       class_names=class_names, recipe=Recipe.from_config(config, loss),
                       steps=read_history(workdir, workdir_lib.STEPS))


def read_history(workdir: str, name: str = workdir_lib.METRICS) -> list[dict]:
    """The records of metrics.jsonl (per epoch) or steps.jsonl (per window); none if it is missing or unreadable."""
    try:
        with open(os.path.join(workdir, name)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


CHECKPOINT_CHOICES = ("auto", "best", "latest")


def _say_best(workdir: str, step: int, history: list[dict], monitor: str) -> None:
    """The note that prediction uses the best epoch's state, not the newest."""
    record = next((r for r in history if r.get("step") == step), {})
    value = f", {monitor} {record[monitor]:.4g}" if isinstance(record.get(monitor), (int, float)) else ""
    last = f" of {history[-1]['epoch']}" if history else ""
    print(f"note: {workdir}: using the best checkpoint (epoch {record.get('epoch', '?')}{last}{value}; "
          f"train.keep_best), not the newest", file=sys.stderr, flush=True)
