"""Test-time augmentation (config.eval.tta): the model sees each input in several views, and its class probabilities
are the mean of theirs.

`Recipe.logits` (cnn/train/steps.py) calls `views` and `combine`, so the test evaluation, prediction and exports
all average the same way. What comes back is logits, not probabilities: logits whose probabilities are the views'
mean, so the loss, the correctness and the predicted class are computed from them exactly as without TTA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cnn.config import TTA
from cnn.errors import ConfigError


def configured(config) -> str | None:
    """The config's eval.tta; None for a config (a workdir's config.json) from before the field."""
    return config.eval.get("tta") if "eval" in config else None


def views(name: str, x: jax.Array) -> list[jax.Array]:
    """The views of a raw uint8 image batch (N, H, W, C) that `name` averages: 'flip', the batch and its left-right
    mirror."""
    if name == "flip":
        return [x, x[:, :, ::-1]]
    raise ValueError(f"eval.tta={name!r}: expected one of {TTA}")


def combine(logits: list[jax.Array]) -> jax.Array:
    """Logits whose class probabilities are the mean of the views' `logits` (each (N, classes), or (N, 1) for a
    one-logit sigmoid head), averaged in log space so no probability underflows to log(0).

    Softmax of log(mean p) is mean p; for a one-logit head, the logit of the mean p, log(mean p) - log(mean (1 - p)).
    """
    stacked = jnp.stack([jnp.asarray(v, jnp.float32) for v in logits])
    if stacked.shape[-1] == 1:
        z = stacked[..., 0]
        return (jax.nn.logsumexp(jax.nn.log_sigmoid(z), axis=0)
                - jax.nn.logsumexp(jax.nn.log_sigmoid(-z), axis=0))[:, None]
    return jax.nn.logsumexp(jax.nn.log_softmax(stacked, axis=-1), axis=0) - math.log(len(logits))


def check(tta: str | None, dataset) -> None:
    """Refuses views that need images (all of them) on a `cnn.data.Dataset` of series or token ids, in one line."""
    if tta is not None and not dataset.is_image:
        raise ConfigError(f"eval.tta={tta!r} mirrors images, but {dataset.name} holds sequences shaped "
                          f"{dataset.input_shape}; leave eval.tta=None")
