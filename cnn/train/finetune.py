"""Fine-tuning: a run that starts from trained weights (`model.pretrained`) and trains its head apart.

`model.pretrained` is a weight file (cnn.models.weights reads it) or the
workdir of an earlier cnn run (its newest checkpoint's parameters and batch
statistics: a warm start). Either fills the freshly initialised state by
layer name (a Keras legacy file into layer specs: by place); the head
(cnn.models.head) keeps its initial values when the source has none that
fits, e.g. another class count. The optimizer then treats the head and the
backbone apart (cnn/train/optimizer.py), and while the backbone is frozen
the step runs the model in inference mode (cnn/train/steps.py, Recipe.frozen).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import flax.linen as nn
import ml_collections

from cnn import models
from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.models import backbones, weights
from cnn.models.head import head_layer
from cnn.train.checkpoint import Checkpoints
from cnn.train.state import TrainState

FIELD = "model.pretrained"


def head(config: ml_collections.ConfigDict, model: nn.Module, input_shape: Sequence[int]) -> str | None:
    """The layer trained apart from the backbone in a run from pretrained weights; None in any other run."""
    return head_layer(model, input_shape) if config.model.get("pretrained") else None


def frozen_throughout(config: ml_collections.ConfigDict) -> bool:
    """optimizer.backbone_lr_scale=0: the backbone never trains, and the step runs the model as while frozen."""
    return config.model.get("pretrained") is not None and config.optimizer.get("backbone_lr_scale", 1.0) == 0


def start(config: ml_collections.ConfigDict, model: nn.Module, state: TrainState, head_name: str | None
          ) -> tuple[ml_collections.ConfigDict, TrainState, str]:
    """The fresh `state` with model.pretrained's weights put in; the config with data.preprocessing set to what
    the weights expect where the user left it (and data.mean) None; and the start-up line saying what loaded."""
    path = config.model.get("pretrained")
    if path is None:
        return config, state, ""
    path = os.path.expanduser(path)  # config.validate has checked that it exists
    preset = _preset(model)
    if os.path.isdir(path):
        source, mode, origin = *_workdir_source(path), "a cnn run's newest checkpoint"
        how = None  # a cnn run names its layers as this model does
    else:
        # the preset as the config writes it, overrides included: a torchvision file needs style='torchvision'
        source, mode, origin, how = None, None, "", (config.model.preset or preset) if preset else _specs(model)
    try:
        variables, report = weights.fill(how, state.variables(), path, head_name, source)
    except ConfigError as e:
        raise ConfigError(f"{FIELD}: {e}") from None
    if preset and source is None:
        mode, origin = backbones.preprocessing(preset, report.layout), f"{report.layout} weight file"
    config, note = _preprocessing(config, mode, preset)
    params = variables["params"]
    state = state.replace(params=params, batch_stats=variables.get("batch_stats", state.batch_stats),
                          opt_state=state.tx.init(params))
    left = f"left at their initial values: {', '.join(report.left)}" if report.left else "none left at initial values"
    return config, state, f"{FIELD}: {report.loaded} tensors loaded from {path} ({origin or report.layout}); " \
                          f"{left}{note}"


def _preset(model: nn.Module) -> str | None:
    """The backbone preset `model` is (cnn/models/backbones.py), or None."""
    name = getattr(type(model), "PRESET", None)
    backbone = backbones.BACKBONES.get(name) if isinstance(name, str) else None
    return name if backbone is not None and type(model) is backbone.module else None


def _specs(model: nn.Module) -> tuple[str, ...] | None:
    """A Sequential's layer specs; None for your own module (its layers are found by name)."""
    return tuple(model.layers) if isinstance(model, models.Sequential) else None


def _workdir_source(path: str) -> tuple[tuple[weights.Layers, str], str | None]:
    """A cnn workdir's newest checkpoint as a weight file's layers, and the preprocessing that run used."""
    saved = workdir_lib.read_json(os.path.join(path, workdir_lib.CONFIG))
    if not isinstance(saved, dict) or not workdir_lib.has_checkpoints(path):
        raise ConfigError(f"{FIELD}={path!r} is a folder but not the workdir of a cnn run with checkpoints (no "
                          "config.json or no checkpoints/); give a weight file or a workdir that training wrote")
    checkpoints = Checkpoints(path)
    try:
        variables = checkpoints.newest_variables()
    finally:
        checkpoints.close()
    return (weights.as_layers(variables), "cnn checkpoint"), (saved.get("data") or {}).get("preprocessing")


def _preprocessing(config: ml_collections.ConfigDict, mode: str | None, preset: str | None
                   ) -> tuple[ml_collections.ConfigDict, str]:
    """The config with data.preprocessing=`mode` if the user left it and data.mean None, and what the line says."""
    data = config.data
    if data.get("preprocessing") is not None or data.mean is not None:
        chosen = f"data.preprocessing={data.get('preprocessing')!r}" if data.mean is None else "data.mean/std"
        return config, f"; inputs scaled by your {chosen}"
    if mode is None:
        itself = f" ({preset} scales its inputs itself)" if preset == "efficientnet_b0" else ""
        return config, f"; data.preprocessing=None{itself}"
    config = config.copy_and_resolve_references()
    config.data.preprocessing = mode
    return config, f"; data.preprocessing={mode!r} set, as these weights expect"
