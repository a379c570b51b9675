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
import numpy as np
import optax

from cnn.config import LOSS_NAMES
from cnn.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Loss:
    """One loss: what training minimises, what evaluation counts as correct, what prediction reports."""

    per_example: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]  # float32 logits, labels -> (loss, 0/1)
    # float32 logits, targets (a distribution over the classes per example, [batch, classes]) -> (loss, 0/1 where
    # the predicted class is the target's most likely one)
    per_target: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
    probabilities: Callable[[jax.Array], jax.Array]  # float32 logits -> [batch, classes]
    # The head check: None if a model ending in `units` outputs fits a dataset of `classes` classes, else what to do
    # (the model's last layer, `last`, is named in it).
    head_error: Callable[[int, int, str], str | None]
    output_activation: str  # the activation that turns its logits into probabilities: a final layer may end in it


def _softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            (jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def _softmax_cross_entropy_targets(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    return (optax.softmax_cross_entropy(logits, targets),
            (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32))


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


def _sigmoid_binary_cross_entropy_targets(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    z, p = logits[:, 0], targets[:, 1]  # the target probability of class 1
    return optax.sigmoid_binary_cross_entropy(z, p), ((z > 0) == (p > 0.5)).astype(jnp.float32)


def _sigmoid_probabilities(logits: jax.Array) -> jax.Array:
    p = jax.nn.sigmoid(logits[:, 0])
    return jnp.stack([1 - p, p], axis=-1)


def _sigmoid_head(units: int, classes: int, last: str) -> str | None:
    if classes == 2 and units == 1:
        return None
    return (f"loss='sigmoid_binary_cross_entropy' needs a two-class dataset and a final Dense(1, "
            f"activation='sigmoid'); this dataset has {classes} classes and the model ends in {units} units ({last})")


LOSSES: dict[str, Loss] = {
    "softmax_cross_entropy": Loss(_softmax_cross_entropy, _softmax_cross_entropy_targets,
                                  lambda logits: jax.nn.softmax(logits, axis=-1), _softmax_head, "softmax"),
    "sigmoid_binary_cross_entropy": Loss(_sigmoid_binary_cross_entropy, _sigmoid_binary_cross_entropy_targets,
                                         _sigmoid_probabilities, _sigmoid_head, "sigmoid"),
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


def training_loss(loss: str, logits: jax.Array, labels: jax.Array, mix: tuple[jax.Array, jax.Array] | None = None,
                  smoothing: float = 0.0, class_weights: tuple[float, ...] | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """The batch's training loss and accuracy: what a step minimises and reports.

    `mix` = (partner labels, ratio), from mixup or cutmix: example i's target
    is ratio_i * onehot(labels_i) + (1 - ratio_i) * onehot(partner_i); then
    label smoothing (loss_label_smoothing) moves every target toward uniform
    over the classes (a one-unit sigmoid head has two, so toward 0.5). The
    accuracy counts a prediction right where it is the target's most likely
    class (the dominant of two mixed labels). With `class_weights`
    (train.class_weights), example i's loss is multiplied by its class's
    weight (with mixed labels, the same blend of the two weights), and the
    batch's loss is the sum divided by the batch size. Without a mix or
    smoothing the integer-label loss (`compute_loss`) runs, as evaluation's.
    """
    logits = logits.astype(jnp.float32)
    if mix is None and not smoothing:
        per_example, correct = LOSSES[loss].per_example(logits, labels)
        targets = None
    else:
        partner, ratio = mix if mix is not None else (labels, jnp.ones(labels.shape, jnp.float32))
        classes = max(logits.shape[-1], 2)  # one sigmoid unit: two classes
        targets = ratio[:, None] * jax.nn.one_hot(labels, classes) + (1 - ratio[:, None]) * jax.nn.one_hot(
            partner, classes)
        per_example, correct = LOSSES[loss].per_target(logits, optax.smooth_labels(targets, smoothing))
    if class_weights is not None:
        weights = jnp.asarray(class_weights, jnp.float32)
        per_example = per_example * (weights[labels] if targets is None else targets @ weights)
    return per_example.mean(), correct.mean()


def resolve_class_weights(setting, labels: np.ndarray, num_classes: int) -> tuple[float, ...] | None:
    """train.class_weights as one float per class: None stays None, 'balanced' is scikit-learn's
    compute_class_weight over the training `labels`, a tuple must have one weight per class."""
    if setting is None:
        return None
    if setting == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        counts = np.bincount(np.asarray(labels), minlength=num_classes)
        if not counts.all():
            raise ConfigError(f"train.class_weights='balanced': class {int(np.argmin(counts))} has no training "
                              "examples, so it has no weight; give a tuple of weights instead")
        return tuple(float(w) for w in compute_class_weight("balanced", classes=np.arange(num_classes), y=labels))
    if len(setting) != num_classes:
        raise ConfigError(f"train.class_weights has {len(setting)} weights but the dataset has {num_classes} "
                          f"classes; give one per class, in class order, or 'balanced'")
    return tuple(float(w) for w in setting)
