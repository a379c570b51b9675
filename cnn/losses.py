"""The losses `config.loss` can name: for each, its per-example loss and correctness, its class probabilities, and
the model head it needs (how many output units for a dataset's classes).

Adding a loss is one entry in `LOSSES`, with its name also in cnn.config.LOSS_NAMES, the list config validation
reads without importing JAX (the import below refuses a registry and a list that differ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cnn.config import LOSS_NAMES


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss: what training minimises, what evaluation counts as correct, what prediction reports."""

    per_example: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # float32 logits, labels -> (loss, 0/1)
    probabilities: Callable[[jax.Array], jax.Array]  # float32 logits -> [batch, classes]
    # The head check: None if a model ending in `units` outputs fits a dataset of `classes` classes, else what to do
    # (the model's last layer, `last`, is named in it).
    head_error: Callable[[int, int, str], str | None]
    output_activation: str  # the activation that turns its logits into probabilities: a final layer may end in it


def _softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            (jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def _softmax_head(units: int, classes: int, last: str) -> str | None:
    if units == classes:
        return None
    return (f"{last} gives {units} outputs but the dataset has {classes} classes; end the model with Dense({classes})"
            + (" or Dense(1, activation='sigmoid')" if classes == 2 else "")
            + f" (with a model.preset, set model.num_classes={classes})")


def _sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = logits[:, 0]
    return optax.sigmoid_binary_cross_entropy(z, labels.astype(z.dtype)), ((z > 0) == (labels == 1)).astype(
        jnp.float32)


def _sigmoid_probabilities(logits: jax.Array) -> jax.Array:
    p = jax.nn.sigmoid(logits[:, 0])
    return jnp.stack([1 - p, p], axis=-1)


def _sigmoid_head(units: int, classes: int, last: str) -> str | None:
    if classes == 2 and units == 1:
        return None
    return (f"loss='sigmoid_binary_cross_entropy' needs a two-class dataset and a final Dense(1, "
            f"activation='sigmoid'); this dataset has {classes} classes and the model ends in {units} units ({last})")


LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": Loss(_softmax_cross_entropy, lambda logits: jax.nn.softmax(logits, axis=-1),
                                  _softmax_head, "softmax"),
    "sigmoid_binary_cross_entropy": Loss(_sigmoid_binary_cross_entropy, _sigmoid_probabilities, _sigmoid_head,
                                         "sigmoid"),
}
if tuple(LOSSES) != LOSS_NAMES:
    raise ImportError(f"cnn.losses.LOSSES names {tuple(LOSSES)} but cnn.config.LOSS_NAMES lists {LOSS_NAMES}: "
                      "a loss belongs in both")


def auto(units: int) -> str:
    """The loss config.loss='auto' means for a model ending in `units` outputs."""
    return "sigmoid_binary_cross_entropy" if units == 1 else "softmax_cross_entropy"


def compute_loss(loss: str, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and correctness (1.0 or 0.0) from the model's logits, in float32."""
    return LOSSES[loss].per_example(logits.astype(jnp.float32), labels)


def predicted_class(logits: jax.Array) -> jax.Array:
    """The class each row of logits predicts, as the losses count a prediction correct: the largest logit, or for a
    one-logit (sigmoid) head class 1 where the logit is positive. int32, [batch]."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def probabilities(loss: str, logits: jax.Array) -> jax.Array:
    """Class probabilities, [batch, classes], from the model's logits, in float32."""
    return LOSSES[loss].probabilities(logits.astype(jnp.float32))
