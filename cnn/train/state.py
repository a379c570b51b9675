"""What the training loop carries from step to step: the train state (every array a step reads, and how a fresh
one is made) and the epoch's running loss and accuracy sums."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from cnn import kernels, models


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, optimizer) plus batch-norm statistics, the dropout key and, with
    train.ema_decay > 0, the exponential moving average of the parameters.

    `apply_fn` is the model's apply with the kernels training chose
    (cnn/kernels); how a step treats its batch (augmentation, scaling,
    compute dtype, loss) is the step's `Recipe`, not part of the state.
    """

    batch_stats: Any
    dropout_rng: jax.Array
    ema_params: Any = None  # None: no average kept (train.ema_decay=0)
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    def variables(self, params: Any = None) -> dict:
        """The variables `apply_fn` takes: these parameters, by default the state's for inference (the moving
        average when one is kept, else the trained ones), and the batch statistics. Evaluation, prediction,
        pictures and exports all read the state's parameters through here."""
        if params is None:
            params = self.params if self.ema_params is None else self.ema_params
        out = {"params": params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out

    def apply_gradients(self, *, grads: Any, **kwargs) -> "TrainState":
        """Flax's update, then the moving average's: ema = d * ema + (1 - d) * params with the new parameters and
        d = min(ema_decay, (1 + t) / (10 + t)) at update t (0 first), so early averages are not stuck near the
        initial weights (TensorFlow's ExponentialMovingAverage with num_updates, timm's EMA warmup)."""
        new = super().apply_gradients(grads=grads, **kwargs)
        if self.ema_params is None:
            return new
        t = jnp.asarray(self.step, jnp.float32)
        decay = jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, new.params)
        return new.replace(ema_params=ema)


def create_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int,
                 kernel_choice: str = "auto", platform: str | None = None, ema_decay: float = 0.0) -> TrainState:
    """A fresh state: parameters initialised from `seed`, and a dropout key split from the same seed; with
    `ema_decay` > 0, a moving average starting at the initial parameters.

    One compiled program makes all of it, so the compilation cache serves a
    rerun; run eagerly, the keys and each optimizer array were an XLA program
    apiece, compiled anew in every process (half a second of start-up).
    """
    apply = kernels.apply_fn(models.adapt(model), kernel_choice, platform)  # a user's module under cnn's call

    def fresh() -> TrainState:
        init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
        variables = apply.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32))
        return TrainState.create(apply_fn=apply, params=variables["params"], tx=tx,
                                 batch_stats=variables.get("batch_stats", {}), dropout_rng=dropout_rng)

    state = jax.jit(fresh)()
    if not ema_decay:
        return state
    ema = jax.tree_util.tree_map(jnp.copy, state.params)  # its own buffers: the step donates both
    return state.replace(ema_params=ema, ema_decay=float(ema_decay))


class EpochSums(NamedTuple):
    """The epoch's running sums of the steps' mean loss and accuracy (a pytree: on the devices between steps, on
    the host where a record is written). Divided by the steps counted they give the epoch's train figures."""

    loss: Any
    accuracy: Any

    @classmethod
    def zeros(cls) -> "EpochSums":
        """The sums before an epoch's first step: float32 zeros on the host (device copies are donated by steps)."""
        return cls(np.zeros((), np.float32), np.zeros((), np.float32))

    def add(self, metrics: Mapping[str, Any]) -> "EpochSums":
        """These sums plus a step's (or a part's) {'loss', 'accuracy'}."""
        return EpochSums(self.loss + metrics["loss"], self.accuracy + metrics["accuracy"])
