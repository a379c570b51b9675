"""The head of a model: the one layer fine-tuning treats apart from the rest (the backbone).

The head is the last layer with parameters that a forward pass calls, named
by its top-level key in the parameter tree: a backbone's classifier
('predictions' for Keras' applications, 'fc' for torchvision's ResNet), the
last Dense of a Sequential, or whatever your own module calls last. It is
found by running the model once on shapes only (no arithmetic) and watching
which submodules it calls, so no architecture has to declare it. Weight files
may leave it at its initial values (a new class count), and
`train.freeze_epochs` / `optimizer.backbone_lr_scale` train it apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.errors import ConfigError
from cnn.models.sequential import adapt


def head_layer(model: nn.Module, input_shape: Sequence[int]) -> str:
    """The top-level parameter name of the last layer with parameters that `model` calls on `input_shape` inputs."""
    adapted = adapt(model)
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(adapted.init, jax.random.key(0), x)
    params = variables.get("params", {})
    called: list[str] = []

    def watch(call, args, kwargs, context):
        path = context.module.path
        if context.method_name == "__call__" and path and path[0] in params:
            called.append(path[0])
        return call(*args, **kwargs)

    with nn.intercept_methods(watch):
        jax.eval_shape(lambda v, x: adapted.apply(v, x, train=False, logits=True), variables, x)
    if not called:
        raise ConfigError(f"the model ({type(model).__name__}) has no layer with parameters, so no head to fine-tune")
    return called[-1]


def labels(params: dict, head: str) -> dict:
    """The parameter tree with each leaf labelled 'head' (under `head`) or 'backbone' (everything else), for
    optax.multi_transform."""
    return {name: jax.tree_util.tree_map(lambda _, label="head" if name == head else "backbone": label, tree)
            for name, tree in params.items()}
