"""The training step and the evaluation step, and how they are compiled.

A training step, read in order: `part_gradients` (the gradients of a batch,
or of one part of it), `apply_update` (the optimizer's update from them);
`train_step` is the two on a whole batch. `compile_train_step` makes the
step the loop runs, alone choosing whether a batch goes in one compiled
call or in several (parts). Every function is pure: arrays in (the state,
the epoch's sums, a batch staged on the devices), arrays out, plus a static
`Recipe`. Fusing several steps into one call with `lax.scan` is avoided:
XLA:CPU runs convolutions inside loops far slower (docs/devices.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import losses, sharding
import cnn.train.tta as tta_lib
from cnn.data.images import Augmentation, preprocess
from cnn.losses import compute_loss, training_loss
from cnn.train.state import EpochSums, TrainState


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a step treats a batch besides running the model: augmentation (mixing included), input scaling, compute
    dtype, loss (with its label smoothing and class weights).

    Static (hashable): it is part of each compiled step, so another recipe compiles another step.
    """

    loss: str = "softmax_cross_entropy"
    compute_dtype: str = "float32"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: Augmentation = Augmentation()
    preprocessing: str | None = None  # data.preprocessing: a Keras preprocess_input mode instead of mean/std
    # The backbone is frozen (train.freeze_epochs, optimizer.backbone_lr_scale=0): training runs the model in
    # inference mode, batch norm on its moving statistics (and leaving them) and no dropout, as Keras's
    # transfer-learning guide runs a frozen base model; the optimizer leaves the backbone's weights.
    frozen: bool = False
    label_smoothing: float = 0.0  # loss_label_smoothing
    class_weights: tuple[float, ...] | None = None  # train.class_weights, one per class (losses.resolve_class_weights)
    tta: str | None = None  # eval.tta: the views whose probabilities evaluation and prediction average

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, loss: str,
                    class_weights: tuple[float, ...] | None = None) -> "Recipe":
        """The recipe of `config` (data.mean/std or data.preprocessing, augmentation, train.compute_dtype,
        loss_label_smoothing) with the loss `check_head` chose and the resolved class weights."""
        data = config.data
        return cls(loss=loss, compute_dtype=config.train.compute_dtype,
                   mean=None if data.mean is None else tuple(data.mean),
                   std=None if data.std is None else tuple(data.std), augmentation=Augmentation.from_config(data),
                   preprocessing=data.get("preprocessing"),  # absent from workdirs made before the field
                   label_smoothing=float(config.get("loss_label_smoothing", 0.0)), class_weights=class_weights,
                   tta=tta_lib.configured(config))

    def inputs(self, images: jax.Array) -> jax.Array:
        return preprocess(images, self.mean, self.std, self.preprocessing).astype(self.compute_dtype)

    def train_inputs(self, batch: dict[str, jax.Array], rng: jax.Array
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """A training batch's inputs, cropped and flipped, scaled, then mixed (mixup or cutmix, before the cast to
        the compute dtype); and the mix, (partner labels, ratios), that the loss's targets need (None: no mixing)."""
        images = self.augmentation(batch["image"], jax.random.fold_in(rng, 1))
        x, mix = self.augmentation.mix(preprocess(images, self.mean, self.std, self.preprocessing), batch["label"],
                                       jax.random.fold_in(rng, 2))
        return x.astype(self.compute_dtype), mix

    def loss_and_accuracy(self, logits: jax.Array, labels: jax.Array, mix: tuple[jax.Array, jax.Array] | None
                          ) -> tuple[jax.Array, jax.Array]:
        """The batch's training loss and accuracy (losses.training_loss)."""
        return training_loss(self.loss, logits, labels, mix, self.label_smoothing, self.class_weights)

    def logits(self, apply_fn: Callable[..., jax.Array], variables: dict, x: jax.Array) -> jax.Array:
        """The model's logits in evaluation mode for raw inputs `x`; with `tta`, the logits whose probabilities are
        the mean of the views' (cnn/train/tta.py). Evaluation and prediction both come through here."""
        variables = self.cast(variables)
        if self.tta is None:
            return apply_fn(variables, self.inputs(x), train=False, logits=True)
        return tta_lib.combine([apply_fn(variables, self.inputs(view), train=False, logits=True)
                                for view in tta_lib.views(self.tta, x)])

    def cast(self, variables: dict) -> dict:
        """Parameters in the compute dtype (mixed precision; a no-op in float32).

        Cast inside the differentiated function, so gradients arrive in
        float32 and the optimizer only sees float32.
        """
        if self.compute_dtype == "float32":
            return variables
        cast = lambda p: p.astype(self.compute_dtype)
        return {**variables, "params": jax.tree_util.tree_map(cast, variables["params"])}


class Gradients(NamedTuple):
    """What a batch, or a part of one, gives the step's update: the mean loss's gradients, the batch-norm statistics
    after it, and its mean {'loss', 'accuracy'}. With parts, the gradients and metrics are the parts' sums."""

    grads: Any
    batch_stats: Any
    metrics: dict[str, jax.Array]

    @classmethod
    def zeros(cls, state: TrainState) -> "Gradients":
        """Nothing summed yet: zero gradients and metrics, and the state's batch-norm statistics."""
        return cls(jax.tree_util.tree_map(jnp.zeros_like, state.params), state.batch_stats,
                   EpochSums.zeros()._asdict())


def part_gradients(state: TrainState, batch: dict[str, jax.Array], batch_stats: Any, recipe: Recipe = Recipe(),
                   part: jax.Array | int = 0, parts: int = 1) -> Gradients:
    """The `Gradients` of part `part` of `parts` of the step's `batch` (parts=1: the whole batch).

    Part p is every `parts`-th example from the p-th, so when the batch is
    split over devices each device's share of a part is already on it.
    Batch norm normalises each part with its own statistics (`batch_stats`:
    the previous part's) and dropout and augmentation draw a key per part.
    """
    rng = jax.random.fold_in(state.dropout_rng, state.step)
    if parts > 1:
        batch = jax.tree_util.tree_map(
            lambda a: jax.lax.dynamic_index_in_dim(a.reshape(-1, parts, *a.shape[1:]), part, axis=1, keepdims=False),
            batch)
        rng = jax.random.fold_in(rng, part + 2)
    x, mix = recipe.train_inputs(batch, rng)

    def loss_fn(params):
        variables = recipe.cast({"params": params, **({"batch_stats": batch_stats} if batch_stats else {})})
        logits, updates = state.apply_fn(variables, x, train=not recipe.frozen, logits=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
        loss, accuracy = recipe.loss_and_accuracy(logits, batch["label"], mix)
        return loss, (accuracy, updates)

    (loss, (accuracy, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return Gradients(grads, updates.get("batch_stats", batch_stats), {"loss": loss, "accuracy": accuracy})


def add_part(state: TrainState, total: Gradients, batch: dict[str, jax.Array], part: jax.Array, parts: int,
             recipe: Recipe = Recipe()) -> Gradients:
    """`total` (`Gradients.zeros` before the first part) plus part `part` of `parts` of `batch`."""
    gradients = part_gradients(state, batch, total.batch_stats, recipe, part, parts)
    grads, metrics = jax.tree_util.tree_map(jnp.add, (total.grads, total.metrics),
                                            (gradients.grads, gradients.metrics))
    return Gradients(grads, gradients.batch_stats, metrics)


def apply_update(state: TrainState, gradients: Gradients, parts: int = 1
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The optimizer's update from the step's gradients; returns the new state and the batch's mean metrics.

    After `parts` parts the sums become means, so the update is the whole batch's.
    """
    grads, metrics = gradients.grads, gradients.metrics
    if parts > 1:
        grads, metrics = jax.tree_util.tree_map(lambda a: a / parts, (grads, metrics))
    return state.apply_gradients(grads=grads, batch_stats=gradients.batch_stats), metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], recipe: Recipe = Recipe()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one whole batch; returns the new state and the batch's mean loss and accuracy."""
    return apply_update(state, part_gradients(state, batch, state.batch_stats, recipe))


def chunk_batch(state: TrainState, chunk: dict[str, jax.Array], chunk_start: jax.Array) -> dict[str, jax.Array]:
    """Batch `state.step - chunk_start` of a chunk of batches staged on the devices."""
    i = state.step - chunk_start
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), chunk)


TrainStepFn = Callable[[TrainState, EpochSums, dict, jax.Array], tuple[TrainState, EpochSums, jax.Array]]


def compile_train_step(mesh: jax.sharding.Mesh, parts: int = 1, recipe: Recipe = Recipe()) -> TrainStepFn:
    """The step the loop runs: (state, sums, chunk, chunk_start) -> (state, sums + the batch's metrics, its loss),
    on the step's batch of a chunk already on the devices; it donates the state and the sums.

    parts=1: one compiled call, `train_step`. parts > 1: `parts` compiled
    calls of `add_part`, then one of `apply_update`. Separate calls, not a
    loop inside one program: XLA:CPU runs convolutions inside loops far
    slower, and on a CPU several calls on small parts beat one call on the
    whole batch (sharding.micro_batch_size). This is the only place that
    chooses between the two.
    """
    replicated, chunk_sharding = sharding.replicated(mesh), sharding.chunk_sharding(mesh)
    if parts == 1:
        def whole(state, sums, chunk, chunk_start):
            state, metrics = train_step(state, chunk_batch(state, chunk, chunk_start), recipe)
            return state, sums.add(metrics), metrics["loss"]

        return jax.jit(whole, donate_argnums=(0, 1), in_shardings=(replicated, replicated, chunk_sharding, replicated),
                       out_shardings=(replicated, replicated, replicated))

    def one_part(state, total, chunk, chunk_start, part):
        return add_part(state, total, chunk_batch(state, chunk, chunk_start), part, parts, recipe)

    def update(state, sums, total):
        state, metrics = apply_update(state, total, parts)
        return state, sums.add(metrics), metrics["loss"]

    zeros = jax.jit(Gradients.zeros, out_shardings=replicated)
    add = jax.jit(one_part, donate_argnums=(1,), out_shardings=replicated,
                  in_shardings=(replicated, replicated, chunk_sharding, replicated, replicated))
    update = jax.jit(update, donate_argnums=(0, 1), out_shardings=(replicated, replicated, replicated))
    part_numbers = [sharding.put_replicated(np.int32(p), mesh) for p in range(parts)]  # device arrays, put once

    def step_in_parts(state, sums, chunk, chunk_start):
        total = zeros(state)
        for part in part_numbers:
            total = add(state, total, chunk, chunk_start, part)
        return update(state, sums, total)

    return step_in_parts


def eval_step(state: TrainState, batch: dict[str, jax.Array], recipe: Recipe = Recipe()) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask 1) examples, and every example's class
    probabilities and predicted class (padding's too: the host drops them; cnn/train/evaluation.py)."""
    logits = recipe.logits(state.apply_fn, state.variables(), batch["image"])
    per_example, correct = compute_loss(recipe.loss, logits, batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (per_example * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum(),
            "probabilities": losses.probabilities(recipe.loss, logits), "predicted": losses.predicted_class(logits)}


def compile_eval_step(mesh: jax.sharding.Mesh, recipe: Recipe = Recipe()) -> Callable[[TrainState, dict], dict]:
    replicated = sharding.replicated(mesh)
    return jax.jit(functools.partial(eval_step, recipe=recipe), in_shardings=(replicated, sharding.batch_sharding(mesh)),
                   out_shardings=replicated)


def class_probabilities(apply_fn: Callable[..., jax.Array], variables: dict, x: jax.Array, recipe: Recipe = Recipe()
                        ) -> jax.Array:
    """Class probabilities (N, classes) in float32 from raw inputs (uint8 pixels, ids, series), as evaluation computes
    them: the recipe's scaling, the model's logits (averaged over eval.tta's views), then softmax (or sigmoid, for
    one-logit binary heads)."""
    return losses.probabilities(recipe.loss, recipe.logits(apply_fn, variables, x))


def probabilities_fn(recipe: Recipe) -> Callable[[TrainState, jax.Array], jax.Array]:
    """A compiled function from (state, uint8 inputs) to class probabilities; exports trace `class_probabilities`."""
    @jax.jit
    def probabilities(state: TrainState, x: jax.Array) -> jax.Array:
        return class_probabilities(state.apply_fn, state.variables(), x, recipe)

    return probabilities
