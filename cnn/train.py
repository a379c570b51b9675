"""Training and evaluation: the whole path from a config to a trained state.

Read top to bottom: the state, the loss, the compiled steps (training, on a
chunk of batches staged on the devices, and evaluation), the optimizer, then
`train_and_evaluate`, which ties them to the data and writes the workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
import types
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from cnn import config as config_lib
from cnn import data as data_lib
from cnn import checkpoint, models, sharding
from cnn.config import ConfigError
from cnn.progress import Progress
from cnn.summary import summary
from cnn.writer import MetricWriter


class TrainState(train_state.TrainState):
    """Flax's TrainState plus what a step needs besides the parameters.

    `loss`, `mean`, `std` and `compute_dtype` are static (part of the
    compiled program, not arrays), so the steps below are functions of
    (state, batch) alone.
    """

    batch_stats: Any
    dropout_rng: jax.Array
    loss: str = flax.struct.field(pytree_node=False, default="softmax_cross_entropy")
    mean: tuple[float, ...] | None = flax.struct.field(pytree_node=False, default=None)
    std: tuple[float, ...] | None = flax.struct.field(pytree_node=False, default=None)
    compute_dtype: str = flax.struct.field(pytree_node=False, default="float32")
    augment: tuple[int, bool, str] = flax.struct.field(pytree_node=False, default=(0, False, "constant"))

    def variables(self, params=None) -> dict:
        """The model's variables, with parameters cast to the compute dtype (a no-op in float32).

        Mixed precision: the cast is inside the differentiated function, so
        gradients arrive in float32 and the optimizer only sees float32.
        """
        params = self.params if params is None else params
        if self.compute_dtype != "float32":
            params = jax.tree_util.tree_map(lambda p: p.astype(self.compute_dtype), params)
        out = {"params": params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        return out

    def inputs(self, images: jax.Array) -> jax.Array:
        return data_lib.preprocess(images, self.mean, self.std).astype(self.compute_dtype)


def compute_loss(loss: str, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and correctness (1.0 or 0.0) from the model's logits, in float32."""
    logits = logits.astype(jnp.float32)
    if loss == "sigmoid_binary_cross_entropy":
        z = logits[:, 0]
        return optax.sigmoid_binary_cross_entropy(z, labels.astype(z.dtype)), ((z > 0) == (labels == 1)).astype(
            jnp.float32)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            (jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def batch_gradients(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, batch_stats: Any
                    ) -> tuple[Any, Any, dict[str, jax.Array]]:
    """The mean loss's gradients on `batch`, the batch-norm statistics after it, and its mean loss and accuracy."""
    images = batch["image"]
    if state.augment[:2] != (0, False):  # random crops and flips, on the device (data.crop_padding, data.flip)
        images = data_lib.augment(images, jax.random.fold_in(rng, 1), *state.augment)
    x = state.inputs(images)

    def loss_fn(params):
        variables = state.variables(params)
        if batch_stats:
            variables["batch_stats"] = batch_stats
        logits, updates = state.apply_fn(variables, x, train=True, logits=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
        losses, correct = compute_loss(state.loss, logits, batch["label"])
        return losses.mean(), (correct.mean(), updates)

    (loss, (accuracy, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return grads, updates.get("batch_stats", batch_stats), {"loss": loss, "accuracy": accuracy}


def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on one batch; returns the new state and the batch's mean loss and accuracy."""
    rng = jax.random.fold_in(state.dropout_rng, state.step)
    grads, batch_stats, metrics = batch_gradients(state, batch, rng, state.batch_stats)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def train_step_and_sum(state: TrainState, sums: dict[str, jax.Array], batch: dict[str, jax.Array]
                       ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """`train_step`, adding its loss and accuracy to the epoch's running `sums` in the same compiled call.

    Returns the step's loss too, for the NaN check before each checkpoint.
    (Fusing several steps into one call with `lax.scan` was measured and
    rejected: XLA:CPU runs convolutions inside a loop 10-40x slower.)
    """
    state, metrics = train_step(state, batch)
    return state, jax.tree_util.tree_map(jnp.add, sums, metrics), metrics["loss"]


def chunk_batch(state: TrainState, chunk: dict[str, jax.Array], chunk_start: jax.Array) -> dict[str, jax.Array]:
    """Batch `state.step - chunk_start` of a chunk of batches staged on the devices."""
    i = state.step - chunk_start
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), chunk)


def train_chunk_step(state: TrainState, sums: dict[str, jax.Array], chunk: dict[str, jax.Array],
                     chunk_start: jax.Array) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
    """`train_step_and_sum` on the step's batch of `chunk`, batches already on the devices.

    The loop puts many batches on the devices at once (`stage_chunk`), so a
    step moves no data from the host and the host only dispatches it: per
    step, gathering and copying a batch cost about 4% of a small CNN's
    training time on a CPU.
    """
    return train_step_and_sum(state, sums, chunk_batch(state, chunk, chunk_start))


def accumulate_part(state: TrainState, acc: dict, chunk: dict[str, jax.Array], chunk_start: jax.Array,
                    part: jax.Array, parts: int) -> dict:
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
    grads, batch_stats, metrics = batch_gradients(state, batch, rng, acc["batch_stats"])
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


def compile_train_step(mesh: jax.sharding.Mesh, parts: int = 1
                       ) -> Callable[[TrainState, dict, dict, jax.Array], tuple[TrainState, dict, jax.Array]]:
    """The training step `train_and_evaluate` runs: `train_chunk_step`, or with `parts` > 1 its batch in parts.

    `parts` calls of one compiled `accumulate_part`, then `apply_accumulated`:
    on a CPU, several calls on small parts can beat one call on the whole
    batch by far (sharding.micro_batch_size). Separate calls, not a loop
    inside one program: XLA:CPU runs convolutions inside loops far slower,
    and parts inside one call gained only 6-8%. Either way the result is a
    function of (state, sums, chunk, chunk_start) that donates state and sums.
    """
    replicated, chunk_sharding = sharding.replicated(mesh), sharding.chunk_sharding(mesh)
    if parts == 1:
        return jax.jit(train_chunk_step, in_shardings=(replicated, replicated, chunk_sharding, replicated),
                       out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    empty = jax.jit(empty_accumulator, out_shardings=replicated)
    add = jax.jit(functools.partial(accumulate_part, parts=parts), out_shardings=replicated, donate_argnums=(1,),
                  in_shardings=(replicated, replicated, chunk_sharding, replicated, replicated))
    update = jax.jit(functools.partial(apply_accumulated, parts=parts), donate_argnums=(0, 1),
                     out_shardings=(replicated, replicated, replicated))
    index = [sharding.put_replicated(np.int32(p), mesh) for p in range(parts)]

    def step(state, sums, chunk, chunk_start):
        acc = empty(state)
        for p in index:
            acc = add(state, acc, chunk, chunk_start, p)
        return update(state, sums, acc)

    return step


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums of loss and correct predictions over the batch's real (mask 1) examples."""
    logits = state.apply_fn(state.variables(), state.inputs(batch["image"]), train=False, logits=True)
    losses, correct = compute_loss(state.loss, logits, batch["label"])
    mask = batch["mask"].astype(jnp.float32)
    return {"loss": (losses * mask).sum(), "correct": (correct * mask).sum(), "count": mask.sum()}


def make_optimizer(opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
                   ) -> optax.GradientTransformation:
    """The optax optimizer and learning-rate schedule that `config.optimizer` names."""
    if opt.schedule == "warmup_cosine":
        # One cycle per span between restarts; one over the whole run without them.
        restarts = [e for e in opt.restart_epochs if e < num_epochs]  # a shortened run keeps the cycles that fit
        bounds = [round(e * steps_per_epoch) for e in (0, *restarts, num_epochs)]
        if any(end <= begin for begin, end in zip(bounds, bounds[1:])):
            raise ConfigError(f"optimizer.restart_epochs={tuple(restarts)} leaves a cycle without a step "
                              f"(an epoch is {steps_per_epoch} steps); space the restarts further apart")
        cycles = [{"init_value": 0.0, "peak_value": opt.learning_rate, "end_value": 0.0, "decay_steps": end - begin,
                   # Capped so a short cycle (or --config.train.num_epochs=1) still has a decay.
                   "warmup_steps": min(int(opt.warmup_epochs * steps_per_epoch), end - begin - 1)}
                  for begin, end in zip(bounds, bounds[1:])]
        lr = optax.sgdr_schedule(cycles)
    else:
        lr = opt.learning_rate
    if opt.name == "adamw":
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    tx = optax.adam(lr, b1=opt.b1, b2=opt.b2) if opt.name == "adam" else optax.sgd(
        lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), tx) if opt.weight_decay else tx


def create_state(model: models.Sequential, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                 seed: int, loss: str, data: ml_collections.ConfigDict, compute_dtype: str = "float32"
                 ) -> TrainState:
    init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
    variables = jax.jit(model.init)(init_rng, jnp.zeros((1, *input_shape), jnp.float32))
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables.get("batch_stats", {}),
        dropout_rng=dropout_rng, loss=loss, compute_dtype=compute_dtype,
        augment=(int(data.crop_padding), bool(data.flip), str(data.pad_mode)),
        mean=None if data.mean is None else tuple(data.mean), std=None if data.std is None else tuple(data.std))


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` gives back to a notebook."""

    state: TrainState
    model: models.Sequential
    history: list[dict[str, float]]  # one record per epoch, as in metrics.jsonl
    results: dict[str, Any]  # as in results.json
    class_names: list[str]


def host_batch(split: data_lib.Split, index: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's part of the batch `index` names, or of each batch if `index` is [steps, batch]
    (all of it unless several processes share the batch)."""
    columns = sharding.process_slice(index.shape[-1])
    out = {"image": split.images[index[..., columns]], "label": split.labels[index[..., columns]]}
    if mask is not None:
        out["mask"] = mask[..., columns]
    return out


CHUNK_BYTES = 64 << 20  # how much training data `stage_chunk` puts on the devices at a time


def chunk_steps(split: data_lib.Split, batch_size: int, steps_per_epoch: int) -> int:
    """Batches per chunk: an epoch of MNIST at once, fewer for larger inputs (bounded device memory)."""
    per_batch = batch_size * (split.images[0].nbytes + split.labels[0].nbytes)
    return max(1, min(steps_per_epoch, CHUNK_BYTES // per_batch))


def stage_chunk(split: data_lib.Split, rows: np.ndarray, steps: int, chunk_sharding) -> dict[str, jax.Array]:
    """The batches `rows` ([n, batch] indices, n <= steps) on the devices as one [steps, batch, ...] chunk.

    Short chunks (an epoch's last, or a resumed one) are padded with copies
    of their last batch, so every chunk has one shape and the step compiles once.
    """
    rows = np.concatenate([rows, np.repeat(rows[-1:], steps - len(rows), axis=0)])
    return sharding.put_batch(host_batch(split, rows), chunk_sharding)


def evaluate(state: TrainState, split: data_lib.Split, batch_size: int, eval_fn, batch_sharding) -> dict[str, float]:
    """Loss and accuracy over every example of `split`, in padded batches of one shape."""
    index, mask = data_lib.eval_index(len(split), batch_size)
    totals = None
    for i in range(len(index)):
        out = eval_fn(state, sharding.put_batch(host_batch(split, index[i], mask[i]), batch_sharding))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = sharding.to_host(totals)
    return {"loss": float(totals["loss"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def use_compilation_cache() -> None:
    """Keeps compiled steps on disk (~/.cache/cnn/xla), so a rerun of a config skips ~3 s of XLA compilation.

    Leaves a cache the user chose (JAX_COMPILATION_CACHE_DIR) alone.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(os.path.expanduser("~"), ".cache", "cnn", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return  # no writable home: compile every time
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def process_start_time() -> float:
    """When this process started (wall clock), so logged times include imports and start-up."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def check_workdir(workdir: str) -> None:
    """Fails before any work if `workdir` cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir={workdir!r} is not writable ({e.strerror}); choose a folder you can write to") \
            from None


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the same command resumes."""


class Diverged(ConfigError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


@contextlib.contextmanager
def _sigterm_flag():
    """Turns SIGTERM (how clusters pre-empt jobs) into a flag the loop checks after each step."""
    flag = types.SimpleNamespace(raised=False)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(flag, "raised", True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_json(path: str, content: dict) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(f"{path}.tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       on_epoch_end: Callable[[dict], None] | None = None) -> TrainResult:
    """Trains the configured model, evaluating on the test split after every epoch.

    Writes to `workdir`: summary.txt, config.json, metrics.jsonl (one record
    per epoch), TensorBoard event files, checkpoints/ and results.json. If
    `workdir` holds checkpoints of this model, training continues from the
    newest one, mid-epoch included, and ends exactly as an uninterrupted run.
    In a multi-process run every process calls this; only the first writes.
    `on_epoch_end` (a sweep's reporter) gets each epoch's record once its
    checkpoint is saved; raising config.Pruned there stops training cleanly.
    """
    start = process_start_time()
    config_lib.validate(config)
    sharding.set_cpu_devices(config.train.num_devices)  # before anything starts JAX's backend
    use_compilation_cache()
    lead = jax.process_index() == 0
    if lead:
        check_workdir(workdir)
    train_cfg = config.train

    dataset = data_lib.load(config.data)
    model = models.build_model(config.model, dataset.num_classes)
    loss = models.check_head(model, dataset.input_shape, dataset.num_classes, config.loss)
    if train_cfg.batch_size > len(dataset.train):
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} is larger than the {config.data.name} training "
                          f"split ({len(dataset.train)} examples); use at most {len(dataset.train)}")
    mesh = sharding.make_mesh(train_cfg.num_devices)
    sharding.check_batch("train.batch_size", train_cfg.batch_size, mesh)
    # One fixed eval shape, no larger than the test split needs.
    eval_batch_size = min(train_cfg.eval_batch_size, -(-len(dataset.test) // mesh.size) * mesh.size)
    sharding.check_batch("train.eval_batch_size", eval_batch_size, mesh)

    steps_per_epoch = len(dataset.train) // train_cfg.batch_size
    tx = make_optimizer(config.optimizer, steps_per_epoch, train_cfg.num_epochs)
    state = create_state(model, tx, dataset.input_shape, config.seed, loss, config.data, train_cfg.compute_dtype)
    zeros = {"loss": np.zeros((), np.float32), "accuracy": np.zeros((), np.float32)}  # host: device copies are donated
    checkpoints = checkpoint.Checkpoints(workdir, keep=train_cfg.keep_checkpoints)
    restored = checkpoints.restore(state)
    state, sums = restored if restored else (state, zeros)
    step = int(state.step)

    replicated = sharding.replicated(mesh)
    batch_sharding, chunk_sharding = sharding.batch_sharding(mesh), sharding.chunk_sharding(mesh)
    state, sums = sharding.put_replicated((state, sums), mesh)
    micro_batch_size = train_cfg.micro_batch_size or sharding.micro_batch_size(train_cfg.batch_size, mesh)
    sharding.check_batch("train.micro_batch_size", micro_batch_size, mesh)
    parts = train_cfg.batch_size // micro_batch_size
    run_step = compile_train_step(mesh, parts)
    steps_per_chunk = chunk_steps(dataset.train, train_cfg.batch_size, steps_per_epoch)
    run_eval = jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated)

    table = summary(model, dataset.input_shape)
    say = print if lead else (lambda *a, **k: None)
    say(table)
    say(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images of {dataset.input_shape}, "
        f"{dataset.num_classes} classes; {steps_per_epoch} steps/epoch on {mesh.size} {mesh.devices.flat[0].platform}"
        f" device(s){f' in {jax.process_count()} processes' if jax.process_count() > 1 else ''}"
        f"{f', each step in {parts} parts of {micro_batch_size}' if parts > 1 else ''}; loss {loss}"
        f"{'; ' + train_cfg.compute_dtype + ' compute' if train_cfg.compute_dtype != 'float32' else ''}", flush=True)
    if restored:
        say(f"resuming from the checkpoint at step {step} (epoch {step // steps_per_epoch + 1}, batch "
            f"{step % steps_per_epoch})", flush=True)
    if lead:
        with open(os.path.join(workdir, "summary.txt"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2) + "\n")

    def save_checkpoint(recent_losses: list[jax.Array], epoch: int) -> None:
        """Saves unless a loss since the last save is NaN or infinite; then stops naming the step."""
        if recent_losses:
            values = sharding.to_host(jnp.stack(recent_losses))
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                latest = checkpoints.latest_step()
                kept = f"the last good checkpoint (step {latest}) is kept" if latest is not None else \
                    "no checkpoint had been saved yet"
                raise Diverged(
                    f"the training loss became {values[bad[0]]} at step {step - len(values) + bad[0] + 1} "
                    f"(epoch {epoch}); stopped without saving: {kept}; lower optimizer.learning_rate (now "
                    f"{config.optimizer.learning_rate})")
        checkpoints.save(state, sums)

    every = train_cfg.checkpoint_every_steps
    startup_seconds = None
    with MetricWriter(workdir, step, enabled=lead) as writer, _sigterm_flag() as sigterm:
        for epoch in range(step // steps_per_epoch + 1, train_cfg.num_epochs + 1):
            epoch_start = time.time()
            first = step - (epoch - 1) * steps_per_epoch  # batches of this epoch done before a resume
            index = data_lib.epoch_index(len(dataset.train), train_cfg.batch_size, config.seed, epoch)
            recent, input_seconds = [], 0.0
            bar = Progress(steps_per_epoch - first, f"epoch {epoch}/{train_cfg.num_epochs}") if lead else None
            for i in range(first, steps_per_epoch):
                if (i - first) % steps_per_chunk == 0:
                    t = time.time()
                    chunk = None  # the previous chunk can go before the next one is made
                    chunk = stage_chunk(dataset.train, index[i:i + steps_per_chunk], steps_per_chunk, chunk_sharding)
                    chunk_start = sharding.put_replicated(np.int32(step), mesh)
                    input_seconds += time.time() - t
                state, sums, loss_value = run_step(state, sums, chunk, chunk_start)
                if startup_seconds is None:  # process start to the end of the first step, compilation included
                    jax.block_until_ready(loss_value)
                    startup_seconds = time.time() - start
                recent.append(loss_value)
                step += 1
                bar and bar.update()
                if sigterm.raised or (every and step % every == 0 and step % steps_per_epoch):
                    save_checkpoint(recent, epoch)
                    recent = []
                    if sigterm.raised:
                        checkpoints.close()
                        raise Preempted(f"SIGTERM: saved a checkpoint at step {step} in {checkpoints.directory}; "
                                        "run the same command to resume")
            bar and bar.close()
            epoch_sums = sharding.to_host(sums)
            if not np.isfinite(epoch_sums["loss"]):
                save_checkpoint(recent, epoch)  # raises Diverged naming the step
            train_time = time.time() - epoch_start
            test = evaluate(state, dataset.test, eval_batch_size, run_eval, batch_sharding)
            record = {
                "epoch": epoch, "step": step,
                "train_loss": float(epoch_sums["loss"]) / steps_per_epoch,
                "train_accuracy": float(epoch_sums["accuracy"]) / steps_per_epoch,
                "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                "epoch_seconds": time.time() - epoch_start,
                "images_per_second": (steps_per_epoch - first) * train_cfg.batch_size / train_time,
                "input_seconds": input_seconds,
                "elapsed_seconds": time.time() - start,  # since the process started, imports included
            }
            writer.write(record)
            sums = sharding.put_replicated(zeros, mesh)
            save_checkpoint(recent, epoch)  # after the record: a resume never redoes a logged epoch
            say(f"epoch {epoch:>3}/{train_cfg.num_epochs}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.2%}  test loss {record['test_loss']:.4f} "
                f"acc {record['test_accuracy']:.2%}  {record['epoch_seconds']:.1f}s "
                f"({record['images_per_second']:,.0f} img/s) at {record['elapsed_seconds']:.1f}s", flush=True)
            if on_epoch_end is not None:  # sweep: report the epoch; Pruned stops here, the checkpoint saved
                on_epoch_end(record)
        history = writer.history
    checkpoints.close()

    from cnn.plots import write_plots  # here: plots and predict import this module
    from cnn.prediction import dataset_info

    last = history[-1]
    results = {
        "dataset": dataset.name, "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "epochs": train_cfg.num_epochs, "steps": step,
        "train_seconds": sum(r["epoch_seconds"] for r in history), "total_seconds": time.time() - start,
        "seed": config.seed, "parameters": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
        "startup_seconds": startup_seconds, "devices": mesh.size, "processes": jax.process_count(),
        **dataset_info(dataset),  # class names, input shape: cnn.predict then needs no dataset
    }
    run = TrainResult(state=state, model=model, history=history, results=results, class_names=dataset.class_names)
    if lead:
        _write_json(os.path.join(workdir, "results.json"), results)
        print(f"test accuracy {results['test_accuracy']:.2%} after {results['epochs']} epochs "
              f"({results['train_seconds']:.1f}s training); results in {os.path.join(workdir, 'results.json')}",
              flush=True)
        # Pictures on this process alone, from a host copy of the (replicated) state.
        local = run if jax.process_count() == 1 else dataclasses.replace(run, state=sharding.to_host(state))
        write_plots(workdir, local, dataset, warn_only=True)
    return run
