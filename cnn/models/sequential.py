"""A Sequential model: a stack of layers from the config, as in Keras.

The module is plain Linen: `model.init(rng, x)` gives the variables (params,
and batch_stats when the stack has BatchNormalization) and
`model.apply(variables, x)` runs it. The output follows the specs, so a stack
ending in softmax returns probabilities; training asks for `logits=True`.
Each layer's output (after its activation) is sown, in order, into the
'activations' collection (`layer_outputs` reads it), which the summary asks
for as mutable; otherwise sowing costs nothing. (The pictures find every
convolution through Flax's intermediates capture, in any model.)

Your own Flax module (config.model.module, cnn/models/module.py) is built
by the same `build_model` and checked by the same `check_head`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnn import losses
from cnn.errors import ConfigError, ShapeError
import cnn.models.layers as layers_lib
import cnn.models.module as module_lib
import cnn.models.presets as presets


@functools.lru_cache(maxsize=64)
def parse_stack(specs: tuple[str, ...]) -> tuple[list[layers_lib.Layer], str | None, list[str]]:
    """Parses specs into (layers with any final softmax/sigmoid taken off, that activation, Keras names)."""
    parsed = [layers_lib.parse(spec, f"model.layers[{i}]") for i, spec in enumerate(specs)]
    names, seen = [], {}
    for layer in parsed:  # Keras numbering: conv2d, conv2d_1, conv2d_2, ...
        n = seen.get(layer.name, 0)
        seen[layer.name] = n + 1
        names.append(layer.name if n == 0 else f"{layer.name}_{n}")
    stack, output_activation = layers_lib.split_output_activation(parsed)
    return stack, output_activation, names


class Sequential(nn.Module):
    """Applies `layers` (spec strings) in order."""

    layers: tuple[str, ...]

    @property
    def output_activation(self) -> str | None:
        """'softmax' or 'sigmoid' if the stack ends in one, else None."""
        return parse_stack(tuple(self.layers))[1]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, logits: bool = False) -> jax.Array:
        stack, output_activation, names = parse_stack(tuple(self.layers))
        sowing = not self.is_initializing() and self.is_mutable_collection("activations")
        fused = None  # the layer whose output the one before it already gave (a relu, or an average pool)
        calls = train and not sowing and not self.is_initializing()  # layers cnn/kernels can fuse into one call
        for i, (layer, name) in enumerate(zip(stack, names)):
            module = None if layer.module is None else layer.module.clone(parent=self, name=name)
            try:
                if i == fused:
                    pass
                elif calls and _norm_then_relu(stack, i):
                    x, fused = module(x, use_running_average=False, relu=True), i + 1
                elif calls and layer.fuses_relu:  # a convolution's relu, and an average pool after it
                    pool = stack[i + 1].tiling_avg_pool if i + 1 < len(stack) else None
                    x = layer(module, x, train, fused=True, avg_pool=pool)
                    fused = i + 1 if pool else None
                else:
                    x = layer(module, x, train)
            except ConfigError as e:
                raise type(e)(f"model.layers[{i}]={layer.spec!r}: {e}") from None
            if sowing:
                self.sow("activations", "layers", x)
        if output_activation and not logits:
            x = layers_lib.ACTIVATIONS[output_activation](x)
        return x


def _norm_then_relu(stack: list[layers_lib.Layer], i: int) -> bool:
    """Whether layer i is a plain BatchNormalization and the next an Activation('relu')."""
    return (i + 1 < len(stack) and isinstance(stack[i].module, layers_lib.BatchNorm) and not stack[i].activation
            and stack[i + 1].kind == "Activation" and stack[i + 1].activation == "relu")


def layer_outputs(model: Sequential, sown: dict) -> dict:
    """Each layer's output by its Keras name, from the 'activations' collection of `model.apply(..., mutable=...)`."""
    return dict(zip(parse_stack(tuple(model.layers))[2], sown["activations"]["layers"]))


def check_config(model_config: ml_collections.ConfigDict) -> None:
    """Refuses a config.model that sets more than one of layers, preset and module, or none; a preset that does
    not parse, and a module that cannot be found (its file, its name in it, an error importing it).

    Runs before any data is loaded; the layer specs and the module's
    arguments and output are checked when the model is built, once the
    class count is known.
    """
    preset, specs, module = model_config.get("preset"), model_config.layers, model_config.get("module")
    if preset is not None:
        presets.parse(preset)
    given = [name for name, on in (("model.preset", preset is not None), ("model.module", module is not None)) if on]
    if len(given) == 2:
        raise ConfigError(f"model.preset={preset!r} and model.module={module!r} are both set; keep one")
    if given and specs:
        raise ConfigError(f"{given[0]}={preset if module is None else module!r} and model.layers (with {len(specs)} "
                          f"layers) are both set; keep one: set model.layers=() to use the "
                          f"{given[0].split('.')[1]}, or {given[0]}=None to use the layers")
    if module is not None:
        module_lib.factory(module_lib.parse(module))
    elif preset is None and (not isinstance(specs, (list, tuple)) or not specs):
        note = model_config.get("note")
        if note:  # the run's model came from a notebook
            raise ConfigError(f"config.model names no model: {note}")
        raise ConfigError(f"model.layers={specs!r} is not valid and model.preset is not set: give a tuple of layer "
                          "specs such as (\"Conv2D(32, 3, activation='relu')\", 'Flatten()', 'Dense(10)'), a "
                          f"preset such as model.preset='flax_cnn' (known: {', '.join([*presets.PRESETS, *presets.BACKBONES])}), or your "
                          "own module as model.module='nets.py:Net'")


def layer_specs(model_config: ml_collections.ConfigDict, num_classes: int | None = None) -> tuple[str, ...]:
    """The specs `config.model` stands for: `model.layers`, or `model.preset` expanded.

    A preset's output layer gets `model.num_classes` units, else `num_classes`
    (the dataset's, from a caller that has loaded it).
    """
    check_config(model_config)
    if model_config.get("preset") is not None:
        return presets.expand(model_config.preset, model_config.get("num_classes") or num_classes)
    return tuple(model_config.layers)


def build_model(model_config: ml_collections.ConfigDict | Sequence[str], num_classes: int | None = None
                ) -> nn.Module:
    """Builds the model from `config.model` (or a list of specs): a Sequential, checking every spec, a backbone
    preset's module (cnn/models/backbones.py), or the user's own module for `model.module` (cnn/models/module.py).

    `num_classes` sizes a preset's output layer, and is passed to a user's
    module, when `model.num_classes` is None.
    """
    if not isinstance(model_config, (list, tuple)) and model_config.get("module") is not None:
        check_config(model_config)
        return module_lib.build(model_config.module, model_config.get("num_classes") or num_classes)
    if isinstance(model_config, (list, tuple)):
        specs = model_config
        if not specs:
            raise ConfigError(f"model.layers={specs!r} is not valid: expected a non-empty tuple of layer specs")
    elif model_config.get("preset") is not None and presets.is_module(model_config.preset):
        check_config(model_config)
        return presets.module(model_config.preset, model_config.get("num_classes") or num_classes)
    else:
        specs = layer_specs(model_config, num_classes)
    parse_stack(tuple(specs))  # raises ConfigError on a bad spec
    return Sequential(layers=tuple(specs))


def adapt(model: nn.Module) -> nn.Module:
    """The model under cnn's call `(x, train, logits)`: a Sequential as it is, a user's module in the adapter
    that keeps its parameter tree (module.Own), once its __call__ is checked to take `train`."""
    if isinstance(model, (Sequential, module_lib.Own)):
        return model
    module_lib.check_call(model, f"model={type(model).__name__}")
    return module_lib.Own(model)


def output_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The model's output shape for one batch, found without computing anything.

    Raises ShapeError if a layer does not fit its input; an error inside a
    user's module is one line naming its file and line.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    adapted = adapt(model)
    try:
        variables = jax.eval_shape(adapted.init, jax.random.key(0), x)
        return jax.eval_shape(adapted.apply, variables, x).shape
    except Exception as e:  # noqa: BLE001 - a user's module can raise anything
        if isinstance(model, Sequential) or isinstance(e, ConfigError):
            raise
        raise module_lib.shape_error(model, f"model={type(model).__name__}", e) from None


def smallest_image_size(model: Sequential, input_shape: Sequence[int], limit: int = 4096) -> int | None:
    """The smallest side of a square image (with `input_shape`'s channels) that the model takes, if the given
    shape fails for its size alone: None when no square up to `limit` fits (the cause is then another).

    Larger inputs never fit worse, so a doubling search then a bisection finds it in a few shape checks.
    """
    def fits(side: int) -> bool:
        try:
            output_shape(model, (side, side, input_shape[-1]))
            return True
        except ShapeError:
            return False

    low, high = 0, max(int(input_shape[0]), int(input_shape[1]), 1)  # `low` never fits; `high` is tried
    while not fits(high):
        if high >= limit:
            return None
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def check_head(model: nn.Module, input_shape: Sequence[int], num_classes: int, loss: str) -> str:
    """Checks the model's output against the dataset and the loss (cnn.losses), and picks the loss for 'auto'.

    Returns the loss name to train with. Images too small for the model
    (a layer's window outgrows what the layers before it leave) are named
    with the smallest square `data.image_size` that fits.
    """
    try:
        shape = output_shape(model, input_shape)
    except ShapeError as e:
        image = len(input_shape) == 3 and isinstance(model, Sequential)
        size = smallest_image_size(model, input_shape) if image else None
        if size is None:
            raise
        what, _, advice = str(e).partition("; ")
        raise ShapeError(f"{what}; the {input_shape[0]}x{input_shape[1]} images are too small for this model: set "
                         f"data.image_size=({size}, {size}) or larger" + (f", or {advice}" if advice else "")) from None
    if not isinstance(model, Sequential):
        return module_lib.check_output(shape, num_classes, loss, f"the model ({type(model).__name__})")
    last = len(model.layers) - 1
    if len(shape) != 2:
        raise ConfigError(f"model.layers: the model's output is {layers_lib.format_shape(shape)}, not (None, units); "
                          "add Flatten() or GlobalAveragePooling2D() before the Dense layers")
    units = shape[1]
    loss = losses.auto(units) if loss == "auto" else loss
    error = losses.LOSSES[loss].head_error(units, num_classes, f"model.layers[{last}]={model.layers[last]!r}")
    if error:
        raise ConfigError(error)
    if model.output_activation == "sigmoid" and losses.LOSSES[loss].output_activation != "sigmoid":
        raise ConfigError("model.layers: a final sigmoid needs loss='sigmoid_binary_cross_entropy' and one output unit")
    return loss
