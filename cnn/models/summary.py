"""A Keras-style model summary: layer, output shape, parameter count, totals.

A Sequential lists its layers by their Keras names (pooling and Flatten
included, which are functions, not modules). Any other Flax module lists
every submodule it calls, in call order, as `nn.tabulate` finds them: a
method interceptor records each module call and its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.models.layers import format_shape, parameter_count
from cnn.models.sequential import Sequential, adapt, layer_outputs, parse_stack

Row = tuple[str, str, int]  # (layer (type), output shape, parameters)


def summary(model: nn.Module, input_shape: Sequence[int]) -> str:
    """Returns the table Keras' `model.summary()` prints, for one example shaped `input_shape`.

    Nothing is computed: shapes come from `jax.eval_shape`. BatchNormalization
    moving statistics count as non-trainable, as in Keras. A module's rows
    count the parameters each submodule holds itself, so they add up to the
    total.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    adapted = adapt(model)
    variables = jax.eval_shape(adapted.init, jax.random.key(0), x)
    if isinstance(model, Sequential):
        rows, title = _layer_rows(model, variables, x), "sequential"
    else:
        rows, title = _module_rows(adapted, variables, x), type(model).__name__
    trainable = parameter_count(variables.get("params", {}))
    fixed = parameter_count(variables.get("batch_stats", {}))
    widths = (max(33, *(len(r[0]) + 2 for r in rows)), max(26, *(len(r[1]) + 2 for r in rows)), 12)
    rule = "_" * sum(widths)
    line = lambda cells: "".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [f'Model: "{title}"', rule, line(("Layer (type)", "Output Shape", "Param #")), "=" * sum(widths)]
    for i, row in enumerate(rows):
        out.append(line((row[0], row[1], f"{row[2]:,}")))
        if i < len(rows) - 1:
            out.append("")
    out += ["=" * sum(widths), f"Total params: {trainable + fixed:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {fixed:,}", rule]
    return "\n".join(out)


def _layer_rows(model: Sequential, variables: dict, x: jax.ShapeDtypeStruct) -> list[Row]:
    """One row per layer spec, from the outputs the Sequential sows into 'activations'."""
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["activations"]), variables, x)
    stack, _, names = parse_stack(tuple(model.layers))
    outputs = layer_outputs(model, state)
    return [(f"{name} ({layer.kind})", format_shape(outputs[name].shape), _count(variables, (name,), own=False))
            for layer, name in zip(stack, names)]


def _module_rows(adapted: nn.Module, variables: dict, x: jax.ShapeDtypeStruct) -> list[Row]:
    """One row per submodule call, in the order the calls start, with the parameters the submodule holds itself
    (a module called again, sharing its weights, counts them once); the top module's own parameters last."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not context.module.path:  # the top module, and the adapter
            return next_fun(*args, **kwargs)
        row = [context.module.path, type(context.module).__name__, None]
        calls.append(row)
        row[2] = next_fun(*args, **kwargs)
        return row[2]

    with nn.intercept_methods(record):
        jax.eval_shape(adapted.apply, variables, x)
    rows, seen = [], set()
    for path, kind, output in calls:
        shapes = [format_shape(a.shape) for a in jax.tree_util.tree_leaves(output) if hasattr(a, "shape")]
        rows.append((f"{'/'.join(path)} ({kind})", ", ".join(shapes), 0 if path in seen else
                     _count(variables, path, own=True)))
        seen.add(path)
    top = _count(variables, (), own=True)
    if top:
        rows.append((f"({type(adapted.module).__name__}'s own)", "", top))
    return rows


def _count(variables: dict, path: tuple[str, ...], own: bool) -> int:
    """Parameters and batch statistics at `path`: all below it, or (`own`) only those of the module itself."""
    total = 0
    for collection in ("params", "batch_stats"):
        tree: Any = variables.get(collection, {})
        for name in path:
            tree = tree.get(name, {}) if hasattr(tree, "get") else {}
        if own and hasattr(tree, "items"):
            tree = [v for v in tree.values() if not hasattr(v, "items")]
        total += parameter_count(tree)
    return total
