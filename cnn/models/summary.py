"""A Keras-style model summary: layer, output shape, parameter count, totals."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cnn.models.layers import format_shape, parameter_count
from cnn.models.sequential import Sequential, layer_outputs, parse_stack


def summary(model: Sequential, input_shape: Sequence[int]) -> str:
    """Returns the table Keras' `model.summary()` prints, for one example shaped `input_shape`.

    Nothing is computed: shapes come from `jax.eval_shape`. BatchNormalization
    moving statistics count as non-trainable, as in Keras.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["activations"]), variables, x)
    stack, _, names = parse_stack(tuple(model.layers))
    outputs = layer_outputs(model, state)
    rows = []
    for layer, name in zip(stack, names):
        count = parameter_count(variables.get("params", {}).get(name, {}))
        count += parameter_count(variables.get("batch_stats", {}).get(name, {}))
        rows.append((f"{name} ({layer.kind})", format_shape(outputs[name].shape), count))

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
