"""A Keras-style model summary: layer, output shape, parameter count, totals."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from cnn.config import ConfigError
from cnn.layers import format_shape, parameter_count
from cnn.models import Sequential, build_model, parse_stack


def dataset_input_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The (height, width, channels) of `config.data`'s images, from the dataset's description, without loading it."""
    if data.name == "digits":
        shape = (8, 8, 1)
    else:
        from cnn.data import _builder

        info = _builder(data).info
        keys = info.supervised_keys
        if not keys or len(keys) != 2 or not hasattr(info.features[keys[0]], "shape"):
            raise ConfigError(f"data.name={data.name!r} is not an image-classification dataset "
                              "(it has no (image, label) supervised keys)")
        shape = tuple(info.features[keys[0]].shape)
        if len(shape) == 2:
            shape = (*shape, 1)
    if data.image_size is not None:
        shape = (*(int(v) for v in data.image_size), shape[-1])
    if None in shape:
        raise ConfigError(f"data.name={data.name!r} has images of varying size {shape}; set data.image_size=(height, "
                          "width), or pass input_shape to summary()")
    return tuple(int(v) for v in shape)


def summary(model: Sequential | ml_collections.ConfigDict, input_shape: Sequence[int] | None = None) -> str:
    """Returns the table Keras' `model.summary()` prints, for one example shaped `input_shape`.

    `model` may be a whole config: the model is built from `config.model`
    and, unless `input_shape` is given, the shape comes from the dataset's
    description (its images are not loaded). Nothing is computed: shapes
    come from `jax.eval_shape`. BatchNormalization moving statistics count
    as non-trainable, as in Keras.
    """
    if isinstance(model, ml_collections.ConfigDict):
        config = model
        model = build_model(config.model)
        if input_shape is None:
            input_shape = dataset_input_shape(config.data)
    elif input_shape is None:
        raise ConfigError("summary(model) needs input_shape, e.g. summary(model, (28, 28, 1)); or pass a config, "
                          "whose dataset gives it")
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
                              variables, x)
    outputs = state["intermediates"]
    stack, output_activation, names = parse_stack(tuple(model.layers))
    rows = []
    for layer, name in zip(stack, names):
        trainable = parameter_count(variables.get("params", {}).get(name, {}))
        fixed = parameter_count(variables.get("batch_stats", {}).get(name, {}))
        shape = outputs[name]["__call__"][-1].shape
        rows.append((f"{name} ({layer.kind})", format_shape(shape), trainable + fixed))
    if len(stack) < len(model.layers):  # a final Activation('softmax') the model applies itself
        rows.append((f"{names[-1]} (Activation)", rows[-1][1], 0))

    trainable = parameter_count(variables.get("params", {}))
    fixed = parameter_count(variables.get("batch_stats", {}))
    widths = (max(33, *(len(r[0]) + 2 for r in rows)), 26, 12)
    rule = "_" * sum(widths)
    line = lambda cells: "".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = ['Model: "sequential"', rule, line(("Layer (type)", "Output Shape", "Param #")), "=" * sum(widths)]
    for i, row in enumerate(rows):
        out.append(line((row[0], row[1], f"{row[2]:,}")))
        if i < len(rows) - 1:
            out.append("")
    out += ["=" * sum(widths), f"Total params: {trainable + fixed:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {fixed:,}", rule]
    return "\n".join(out)
