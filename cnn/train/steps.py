"""The compiled steps: training on a batch (whole, or in accumulated parts) and evaluation.

Every step is a pure function of arrays (the state, running sums, a batch
or a chunk of batches staged on the devices) plus a `Recipe`, which is
static: part of the compiled program. Fusing several steps into one call
with `lax.scan` is avoided: XLA:CPU runs convolutions inside loops far
slower (docs/devices.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cnn import sharding
from cnn.data.images import Augmentation, preprocess
from cnn.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a step does to a batch besides running the model: augmentation, input scaling, compute dtype, loss."""

    loss: str = "softmax_cross_entropy"
    compute_dtype: str = "float32"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augmentation: Augmentation = Augmentation()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, loss: str) -> "Recipe":
        """The recipe of `config` (data.mean/std, augmentation, train.compute_dtype) with the loss `check_head` chose."""
        data = config.data
        return cls(loss=loss, compute_dtype=config.train.compute_dtype,
                   mean=None if data.mean is None else tuple(data.mean),
                   std=None if data.std is None else tuple(data.std), augmentation=Augmentation.from_config(data))

    def inputs(self, images: jax.Array) -> jax.Array:
        return preprocess(images, self.mean, self.std).astype(self.compute_dtype)

    def cast(self, variables: dict) -> dict:
        """Parameters in the compute dtype (mixed precision; a no-op in float32).

        Cast inside the differentiated function, so gradients arrive in
        float32 and the optimizer only sees float32.
        """
        if self.compute_dtype == "float32":
            return variables
        cast = lambda p: p.astype(self.compute_dtype)
        return {**variables, "params": jax.tree_util.tree_map(cast, variables["params"])}


def compute_loss(loss: str, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and correctness (1.0 or 0.0) from the model's logits, in float32."""
    logits = logits.astype(jnp.float32)
    if loss == "sigmoid_binary_cross_entropy":
        z = logits[:, 0]
        return optax.sigmoid_binary_cross_entropy(z, labels.astype(z.dtype)), ((z > 0) == (labels == 1)).astype(
            jnp.float32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            (jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def batch_gradients(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, batch_stats: Any,
                    recipe: Recipe) -> tuple[Any, Any, dict[str, jax.Array]]:
    """The mean loss's gradients on `batch`, the batch-norm statistics after it, and its mean loss and accuracy."""
    x = recipe.inputs(recipe.augmentation(batch["image"], jax.random.fold_in(rng, 1)))

    def loss_fn(params):
        variables = recipe.cast({"params": params, **({"batch_stats": batch_stats} if batch_stats else {})})
        logits, updates = state.apply_fn(variables, x, train=True, logits=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
        losses, correct = compute_loss(recipe.loss, logits, batch["label"])
        return losses.mean(), (correct.mean(), updates)

    (loss, (accuracy, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, updates.get("batch_stats", batch_stats), {"loss": loss, "accuracy": accuracy}


def train_step(state: TrainState, batch: dict[str, jax.Array], recipe: Recipe = Recipe()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch; returns the new state and the batch's mean loss and accuracy."""
    rng = jax.random.fold_in(state.dropout_rng, state.step)
    grads, batch_stats, metrics = batch_gradients(state, batch, rng, state.batch_stats, recipe)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def train_step_and_sum(state: TrainState, sums: dict[str, jax.Array], batch: dict[str, jax.Array],
                       recipe: Recipe = Recipe()) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """`train_step`, adding its loss and accuracy to the epoch's running `sums`; also returns the step's loss."""
    state, metrics = train_step(state, batch, recipe)
    return state, jax.tree_util.tree_map(jnp.add, sums, metrics), metrics["loss"]


def chunk_batch(state: TrainState, chunk: dict[str, jax.Array], chunk_start: jax.Array) -> dict[str, jax.Array]:
    """Batch `state.step - chunk_start` of a chunk of batches staged on the devices."""
    i = state.step - chunk_start
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), chunk)


def train_chunk_step(state: TrainState, sums: dict[str, jax.Array], chunk: dict[str, jax.Array],
                     chunk_start: jax.Array, recipe: Recipe = Recipe()
                     ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """`train_step_and_sum` on the step's batch of `chunk`, whose batches are already on the devices."""
    return train_step_and_sum(state, sums, chunk_batch(state, chunk, chunk_start), recipe)


def accumulate_part(state: TrainState, acc: dict, chunk: dict[str, jax.Array], chunk_start: jax.Array,
                    part: jax.Array, parts: int, recipe: Recipe = Recipe()) -> dict:
    """Gradient accumulation: adds part `part` of `parts` of the step's batch to `acc` (`empty_accumulator` first).

    Part p is every `parts`-th example from the p-th, so when the batch is
    split over devices each device's share of a part is already on it.
    Batch norm normalises each part with its own statistics and updates its
    running averages once per part; dropout and augmentation draw per part.
    """
    batch = chunk_batch(state, chunk, chunk_start)
    batch = jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a.reshape(-1, parts, *a.shape[1:]), part, axis=1, keepdims=False),
        batch)
    rng = jax.random.fold_in(jax.random.fold_in(state.dropout_rng, state.step), part + 2)
    grads, batch_stats, metrics = batch_gradients(state, batch, rng, acc["batch_stats"], recipe)
    grads, metrics = jax.tree_util.tree_map(jnp.add, (acc["grads"], acc["metrics"]), (grads, metrics))
    return {"grads": grads, "batch_stats": batch_stats, "metrics": metrics}


def empty_accumulator(state: TrainState) -> dict:
    """Zero gradients and metrics, and the state's batch-norm statistics, for the step's first part."""
    return {"grads": jax.tree_util.tree_map(jnp.zeros_like, state.params), "batch_stats": state.batch_stats,
            "metrics": {"loss": jnp.zeros(()), "accuracy": jnp.zeros(())}}


def apply_accumulated(state: TrainState, sums: dict[str, jax.Array], acc: dict, parts: int
                      ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """The update after `parts` calls of `accumulate_part`: the parts' mean gradient, as the whole batch's."""
    grads, metrics = jax.tree_util.tree_map(lambda a: a / parts, (acc["grads"], acc["metrics"]))
    state = state.apply_gradients(grads=grads, batch_stats=acc["batch_stats"])
    return state, jax.tree_util.tree_map(jnp.add, sums, metrics), metrics["loss"]


TrainStepFn = Callable[[TrainState, dict, dict, jax.Array], tuple[TrainState, dict, jax.Array]]


def compile_train_step(mesh: jax.sharding.Mesh, parts: int = 1, recipe: Recipe = Recipe()) -> TrainStepFn:
    """The training step the loop runs: `train_chunk_step`, or with `parts` > 1 its batch in parts.

    With parts: `parts` calls of one compiled `accumulate_part`, then
    `apply_accumulated`. Separate calls, not a loop inside one program: on a
    CPU several calls on small parts beat one call on the whole batch
    (sharding.micro_batch_size). Either way the result is a function of
    (state, sums, chunk, chunk_start) that donates state and sums.
    """
    replicated, chunk_sharding = sharding.replicated(mesh), sharding.chunk_sharding(mesh)
    if parts == 1:
        return jax.jit(functools.partial(train_chunk_step, recipe=recipe), donate_argnums=(0, 1),
                       in_shardings=(replicated, replicated, chunk_sharding, replicated),
                       out_shardings=(replicated, replicated, replicated))
    empty = jax.jit(empty_accumulator, out_shardings=replicated)
    add = jax.jit(functools.partial(accumulate_part, parts=parts, recipe=recipe), out_shardings=replicated,
                  donate_argnums=(1,), in_shardings=(replicated, replicated, chunk_sharding, replicated, replicated))
    update = jax.jit(functools.partial(apply_accumulated, parts=parts), donate_argnums=(0, 1),
                     out_shardings=(replicated, replicated, replicated))
    index = [sharding.put_replicated(np.int32(p), mesh) for p in range(parts)]

    def step(state, sums, chunk, chunk_start):
        acc = empty(state)
        for p in index:
            acc = add(state, acc, chunk, chunk_start, p)
        return update(state, sums, acc)

    return step


def eval_step(state: TrainState, batch: dict[str, jax.Array], recipe: Recipe = Recipe()) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask 1) examples."""
    logits = state.apply_fn(recipe.cast(state.variables()), recipe.inputs(batch["image"]), train=False, logits=True)
    losses, correct = compute_loss(recipe.loss, logits, batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def compile_eval_step(mesh: jax.sharding.Mesh, recipe: Recipe = Recipe()) -> Callable[[TrainState, dict], dict]:
    replicated = sharding.replicated(mesh)
    return jax.jit(functools.partial(eval_step, recipe=recipe), in_shardings=(replicated, sharding.batch_sharding(mesh)),
                   out_shardings=replicated)


def class_probabilities(apply_fn: Callable[..., jax.Array], variables: dict, x: jax.Array, recipe: Recipe = Recipe()
                        ) -> jax.Array:
    """Class probabilities (N, classes) in float32 from raw inputs (uint8 pixels, ids, series), as evaluation computes
    them: the recipe's scaling, the model's logits, then softmax (or sigmoid, for one-logit binary heads)."""
    logits = apply_fn(recipe.cast(variables), recipe.inputs(x), train=False, logits=True)
    logits = logits.astype(jnp.float32)
    if recipe.loss == "sigmoid_binary_cross_entropy":
        p = jax.nn.sigmoid(logits[:, 0])
        return jnp.stack([1 - p, p], axis=-1)
    return jax.nn.softmax(logits, axis=-1)


def probabilities_fn(recipe: Recipe) -> Callable[[TrainState, jax.Array], jax.Array]:
    """A compiled function from (state, uint8 inputs) to class probabilities; exports trace `class_probabilities`."""
    @jax.jit
    def probabilities(state: TrainState, x: jax.Array) -> jax.Array:
        return class_probabilities(state.apply_fn, state.variables(), x, recipe)

    return probabilities
