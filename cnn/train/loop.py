"""The training loop: set-up, epochs, evaluation, finish.

`train_and_evaluate` is the whole path from a config to a trained state; a
notebook calls it directly, `python -m cnn.main` through the command line.
Pictures and prediction are not drawn here: the caller asks for them
(cnn.plots.write_plots), so the loop depends only on the pieces it runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import data as data_lib
from cnn import models, runtime, sharding
from cnn import workdir as workdir_lib
from cnn.errors import Diverged, Preempted
from cnn.progress import Progress
from cnn.train.metrics import MetricWriter, StepLog
from cnn.train.setup import ZEROS, Training, announce, prepare
from cnn.train.state import TrainState
from cnn.train.steps import Recipe


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` gives back to a notebook."""

    state: TrainState
    model: models.Sequential
    history: list[dict[str, float]]  # one record per epoch, as in metrics.jsonl
    results: dict[str, Any]  # as in results.json
    class_names: list[str]
    recipe: Recipe = Recipe()  # how the state's model reads inputs (scaling, compute dtype, loss)
    dataset: data_lib.Dataset | None = None  # what it trained on (None when loaded back from a workdir)
    steps: list[dict[str, float]] = dataclasses.field(default_factory=list)  # as in steps.jsonl


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset: data_lib.Dataset | None = None,
                       on_epoch_end: Callable[[dict], None] | None = None, model: Any = None) -> TrainResult:
    """Trains the configured model, evaluating on the test split after every epoch.

    Writes to `workdir`: summary.txt, config.json, metrics.jsonl (one record
    per epoch), steps.jsonl (one every `train.log_every_steps`), TensorBoard
    event files, checkpoints/ and results.json. If
    `workdir` holds checkpoints of this model, training continues from the
    newest one, mid-epoch included, and ends exactly as an uninterrupted run.
    `dataset` replaces the one `config.data` names, `model` (a Flax module,
    cnn/models/module.py) the one `config.model` names; `on_epoch_end(record)`
    runs after each epoch's checkpoint (it may raise to stop the run there).
    In a multi-process run every process calls this; only the first writes.
    """
    run = prepare(config, workdir, dataset, model)
    with run.lock:  # the workdir's lock, released however the run ends
        announce(run)
        with MetricWriter(workdir, run.step, enabled=run.lead) as writer, runtime.stop_requests() as stop:
            steps = StepLog(writer, config.train.log_every_steps, run.steps_per_epoch, run.learning_rate, run.start,
                            run.step)
            for epoch in range(run.step // run.steps_per_epoch + 1, config.train.num_epochs + 1):
                record, recent = train_and_test(run, epoch, stop, steps)
                writer.write(record)
                run.sums = sharding.put_replicated(ZEROS, run.mesh)
                save(run, recent, epoch)  # after the record: a resume never redoes a logged epoch
                report(run, record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
                if stop.signal is not None and epoch < config.train.num_epochs:  # it came during the evaluation
                    raise stopped(run, stop, run.step)
            history, step_records = writer.history, writer.steps
        run.checkpoints.close()
        return finish(run, history, step_records)


def train_and_test(run: Training, epoch: int, stop, steps: StepLog) -> tuple[dict, list[jax.Array]]:
    """One epoch's training and test: its record for metrics.jsonl, and the losses since the last checkpoint."""
    epoch_start, first = time.time(), run.step - (epoch - 1) * run.steps_per_epoch
    recent, input_seconds = train_epoch(run, epoch, stop, steps)
    epoch_sums = sharding.to_host(run.sums)
    if not np.isfinite(epoch_sums["loss"]):
        check_finite(run, recent, epoch)  # raises Diverged naming the step
    train_seconds = time.time() - epoch_start
    steps.write(run.step, epoch, epoch_sums)  # the epoch's last window
    test = evaluate(run.state, run.dataset.test, run.eval_batch_size, run.run_eval, sharding.batch_sharding(run.mesh))
    record = {"epoch": epoch, "step": run.step,
              "train_loss": float(epoch_sums["loss"]) / run.steps_per_epoch,
              "train_accuracy": float(epoch_sums["accuracy"]) / run.steps_per_epoch,
              "test_loss": test["loss"], "test_accuracy": test["accuracy"],
              "epoch_seconds": time.time() - epoch_start,
              "images_per_second": (run.steps_per_epoch - first) * run.config.train.batch_size / train_seconds,
              "input_seconds": input_seconds,
              "elapsed_seconds": time.time() - run.start}  # since the process started, imports included
    return record, recent


def train_epoch(run: Training, epoch: int, stop, steps: StepLog) -> tuple[list[jax.Array], float]:
    """Runs the rest of `epoch`'s steps; returns the losses since the last checkpoint and the input time.

    Batches are staged on the devices a chunk at a time, so each step only
    dispatches; the running sums are fetched only where a step record is due.
    A checkpoint is saved every `train.checkpoint_every_steps`, and at once
    when SIGTERM or Ctrl-C arrives, which then ends the run (Preempted).
    """
    t = run.config.train
    first = run.step - (epoch - 1) * run.steps_per_epoch  # batches of this epoch done before a resume
    index = data_lib.epoch_index(len(run.dataset.train), t.batch_size, run.config.seed, epoch)
    bar = Progress(run.steps_per_epoch - first, f"epoch {epoch}/{t.num_epochs}") if run.lead else None
    recent, input_seconds, chunk, chunk_start = [], 0.0, None, None
    chunks = data_lib.staged_chunks(run.dataset.train, index, first, run.steps_per_chunk,
                                    sharding.chunk_sharding(run.mesh))
    for i in range(first, run.steps_per_epoch):
        if (i - first) % run.steps_per_chunk == 0:
            began, chunk = time.time(), None  # the previous chunk can go before the next one is made
            chunk = next(chunks)
            chunk_start = sharding.put_replicated(np.int32((epoch - 1) * run.steps_per_epoch + i), run.mesh)
            input_seconds += time.time() - began
        run.state, run.sums, loss = run.run_step(run.state, run.sums, chunk, chunk_start)
        if run.startup_seconds is None:
            jax.block_until_ready(loss)
            run.startup_seconds = time.time() - run.start
        recent.append(loss)
        bar and bar.update()
        step = i + 1 + (epoch - 1) * run.steps_per_epoch
        if steps.due(step):  # before a checkpoint at this step: a resume from it relies on the record
            steps.write(step, epoch, sharding.to_host(run.sums))
        if stop.signal is not None or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0
                                       and step % run.steps_per_epoch):
            save(run, recent, epoch)
            recent = []
            if stop.signal is not None:
                chunks.close()  # stops a streamed split's read-ahead thread
                raise stopped(run, stop, step)
    bar and bar.close()
    chunks.close()
    return recent, input_seconds


def stopped(run: Training, stop, step: int) -> Preempted:
    """The end of a run stopped by SIGTERM or Ctrl-C, once its checkpoint at `step` is saved."""
    run.checkpoints.close()
    return Preempted(f"{runtime.STOP_SIGNALS[stop.signal]}: saved a checkpoint at step {step} in "
                     f"{run.checkpoints.directory}; run the same command to resume", 128 + stop.signal)


def check_finite(run: Training, losses: list[jax.Array], epoch: int) -> None:
    """Stops the run, naming the step, if a loss since the last checkpoint is NaN or infinite."""
    if not losses:
        return
    values = sharding.to_host(jnp.stack(losses))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        latest = run.checkpoints.latest_step()
        kept = f"the last good checkpoint (step {latest}) is kept" if latest is not None else \
            "no checkpoint had been saved yet"
        raise Diverged(f"the training loss became {values[bad[0]]} at step {run.step - len(values) + bad[0] + 1} "
                       f"(epoch {epoch}); stopped without saving: {kept}; lower optimizer.learning_rate (now "
                       f"{run.config.optimizer.learning_rate}) and train in a new --workdir")


def save(run: Training, recent_losses: list[jax.Array], epoch: int) -> None:
    """A checkpoint of the state and the epoch's sums, unless a loss since the last one is not finite."""
    check_finite(run, recent_losses, epoch)
    run.checkpoints.save(run.state, run.sums)


def evaluate(state: TrainState, split: data_lib.Split, batch_size: int, eval_fn, batch_sharding
             ) -> dict[str, float]:
    """Loss and accuracy over every example of `split`, in padded batches of one shape."""
    index, mask = data_lib.eval_index(len(split), batch_size)
    totals = None
    for i in range(len(index)):
        out = eval_fn(state, sharding.put_batch(data_lib.host_batch(split, index[i], mask[i]), batch_sharding))
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = sharding.to_host(totals)
    return {"loss": float(totals["loss"] / totals["count"]), "accuracy": float(totals["correct"] / totals["count"])}


def report(run: Training, record: dict) -> None:
    run.say(f"epoch {record['epoch']:>3}/{run.config.train.num_epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.2%}  test loss {record['test_loss']:.4f} "
            f"acc {record['test_accuracy']:.2%}  {record['epoch_seconds']:.1f}s "
            f"({record['images_per_second']:,.0f} img/s) at {record['elapsed_seconds']:.1f}s")


def finish(run: Training, history: list[dict], step_records: list[dict]) -> TrainResult:
    """Writes results.json (the last epoch's figures, and what prediction needs) and returns the TrainResult."""
    last, t = history[-1], run.config.train
    results = {
        "dataset": run.dataset.name, "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "epochs": t.num_epochs, "steps": run.step,
        "train_seconds": sum(r["epoch_seconds"] for r in history), "total_seconds": time.time() - run.start,
        "seed": run.config.seed, "parameters": models.layers.parameter_count(run.state.params),
        "startup_seconds": run.startup_seconds, "devices": run.mesh.size, "processes": jax.process_count(),
        "input_path": run.dataset.input_path,  # 'memory', or 'streamed' from disk (larger than data.max_memory_gb)
        "input_share": sum(r["input_seconds"] for r in history) / max(sum(r["epoch_seconds"] for r in history), 1e-9),
        **data_lib.describe(run.dataset),  # class names, input shape: cnn.predict then needs no dataset
    }
    state = run.state if jax.process_count() == 1 else sharding.to_host(run.state)  # a host copy to draw from
    result = TrainResult(state=state, model=run.model, history=history, results=results,
                         class_names=run.dataset.class_names, recipe=run.recipe, dataset=run.dataset,
                         steps=step_records)
    if run.lead:
        workdir_lib.write_json(os.path.join(run.workdir, workdir_lib.RESULTS), results)
        run.say(f"test accuracy {results['test_accuracy']:.2%} after {results['epochs']} epochs "
                f"({results['train_seconds']:.1f}s training); results in "
                f"{os.path.join(run.workdir, workdir_lib.RESULTS)}")
    return result
