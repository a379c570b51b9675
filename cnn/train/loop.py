"""The training loop: set-up, epochs, evaluation, finish.

`train_and_evaluate` is the whole path from a config to a trained state; a
notebook calls it directly, `python -m cnn.main` through the command line.
Pictures and prediction are not drawn here: the caller asks for them
(cnn.plots.write_plots), so the loop depends only on the pieces it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn import data as data_lib
from cnn import models, runtime, sharding
from cnn import workdir as workdir_lib
from cnn.errors import Diverged, Preempted
from cnn.progress import Progress
import cnn.train.evaluation as evaluation
from cnn.train.metrics import MetricWriter, StepLog
from cnn.train.monitor import Monitor
from cnn.train.setup import Training, announce, prepare
from cnn.train.state import EpochSums, TrainState
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
    training, state, sums = prepare(config, workdir, dataset, model)
    with training.lock:  # the workdir's lock, released however the run ends
        announce(training, state)
        step = int(jax.device_get(state.step))
        with MetricWriter(workdir, step, enabled=training.writes_files) as writer, \
                runtime.stop_requests() as stop, contextlib.closing(Monitor(training.config, workdir)) as monitor:
            steps = StepLog(writer, config.train.log_every_steps, training.steps_per_epoch, training.learning_rate,
                            training.start, step)
            startup_seconds = None  # process start to the end of the first step, compilation included
            for epoch in range(step // training.steps_per_epoch + 1, config.train.num_epochs + 1):
                if monitor.should_stop(writer.history):  # after the last epoch, or in a rerun of a stopped run
                    report_stop(training, monitor, writer.history)
                    break
                epoch_start = time.time()
                trained = train_epoch(training, state, sums, epoch, stop, steps)
                state, step = trained.state, epoch * training.steps_per_epoch
                if startup_seconds is None:
                    startup_seconds = trained.first_step_end - training.start
                record = epoch_record(training, trained, epoch, epoch_start, steps)
                monitor.check(record)
                writer.write(record)
                sums = sharding.put_replicated(EpochSums.zeros(), training.mesh)
                monitor.keep(state, sums, writer.history)  # before the newest: a resume redoes the epoch if missing
                # After the record: a resume never redoes a logged epoch.
                save(training, state, sums, trained.recent_losses, epoch, step)
                report(training, record)
                if on_epoch_end is not None:
                    on_epoch_end(record)
                if stop.signal is not None and epoch < config.train.num_epochs:  # it came during the evaluation
                    raise stopped(training, stop, step)
            history, step_records = writer.history, writer.steps
            training.checkpoints.close()
            return finish(training, state, monitor, history, step_records, startup_seconds)


class EpochTrained(NamedTuple):
    """What `train_epoch` gives back: the loop's variables after the epoch, and what its record needs."""

    state: TrainState
    sums: EpochSums  # on the devices
    recent_losses: list[jax.Array]  # the steps' losses since the last checkpoint, on the devices
    steps_run: int  # the epoch's steps this process ran (fewer than an epoch when resumed mid-epoch)
    input_seconds: float  # staging batches on the devices
    first_step_end: float  # wall clock when the epoch's first step had finished


def train_epoch(training: Training, state: TrainState, sums: EpochSums, epoch: int, stop, steps: StepLog
                ) -> EpochTrained:
    """Runs the rest of `epoch`'s steps from `state` and `sums`.

    Batches are staged on the devices a chunk at a time (an explicit
    device_put), so each step only dispatches: nothing goes between host and
    devices implicitly (tests/test_train.py runs this under
    jax.transfer_guard('disallow')). The running sums are fetched only where a
    step record is due. A checkpoint is saved every
    `train.checkpoint_every_steps`, and at once when SIGTERM or Ctrl-C
    arrives, which then ends the run (Preempted).
    """
    settings, steps_per_epoch = training.config.train, training.steps_per_epoch
    steps_before = (epoch - 1) * steps_per_epoch  # the step count when the epoch began
    start_batch = int(jax.device_get(state.step)) - steps_before  # > 0 when resumed mid-epoch
    order = data_lib.epoch_index(len(training.dataset.train), settings.batch_size, training.config.seed, epoch)
    bar = Progress(steps_per_epoch - start_batch, f"epoch {epoch}/{settings.num_epochs}") \
        if training.writes_files else None
    chunks = data_lib.staged_chunks(training.dataset.train, order, start_batch, training.steps_per_chunk,
                                    sharding.chunk_sharding(training.mesh))
    recent, input_seconds, first_step_end, chunk, chunk_start = [], 0.0, None, None, None
    for batch in range(start_batch, steps_per_epoch):
        if (batch - start_batch) % training.steps_per_chunk == 0:
            began, chunk = time.time(), None  # the previous chunk can go before the next one is made
            chunk = next(chunks)
            chunk_start = sharding.put_replicated(np.int32(steps_before + batch), training.mesh)
            input_seconds += time.time() - began
        state, sums, loss = training.step_fn(epoch)(state, sums, chunk, chunk_start)
        if first_step_end is None:
            jax.block_until_ready(loss)
            first_step_end = time.time()
        recent.append(loss)
        bar and bar.update()
        step = steps_before + batch + 1
        if steps.due(step):  # before a checkpoint at this step: a resume from it relies on the record
            steps.write(step, epoch, sharding.to_host(sums))
        if stop.signal is not None or (settings.checkpoint_every_steps and step % settings.checkpoint_every_steps == 0
                                       and step % steps_per_epoch):
            save(training, state, sums, recent, epoch, step)
            recent = []
            if stop.signal is not None:
                chunks.close()  # stops a streamed split's read-ahead thread
                raise stopped(training, stop, step)
    bar and bar.close()
    chunks.close()
    return EpochTrained(state, sums, recent, steps_per_epoch - start_batch, input_seconds, first_step_end)


def epoch_record(training: Training, trained: EpochTrained, epoch: int, epoch_start: float, steps: StepLog) -> dict:
    """The epoch's record for metrics.jsonl, with the test split's loss and accuracy; also writes its last step
    record. Stops the run (Diverged) if the epoch's loss is not finite."""
    step = epoch * training.steps_per_epoch
    sums = sharding.to_host(trained.sums)
    if not np.isfinite(sums.loss):
        check_finite(training, trained.recent_losses, epoch, step)  # raises Diverged naming the step
    train_seconds = time.time() - epoch_start
    steps.write(step, epoch, sums)  # the epoch's last window
    test = evaluation.evaluate(trained.state, training.dataset.test, training.eval_batch_size, training.eval_fn,
                               sharding.batch_sharding(training.mesh), training.dataset.class_names)
    return {"epoch": epoch, "step": step,
            "train_loss": float(sums.loss) / training.steps_per_epoch,
            "train_accuracy": float(sums.accuracy) / training.steps_per_epoch,
            "test_loss": test["loss"], "test_accuracy": test["accuracy"], **test["metrics"],
            "epoch_seconds": time.time() - epoch_start,
            "images_per_second": trained.steps_run * training.config.train.batch_size / train_seconds,
            "input_seconds": trained.input_seconds,
            "elapsed_seconds": time.time() - training.start}  # since the process started, imports included


def stopped(training: Training, stop, step: int) -> Preempted:
    """The end of a run stopped by SIGTERM or Ctrl-C, once its checkpoint at `step` is saved."""
    training.checkpoints.close()
    return Preempted(f"{runtime.STOP_SIGNALS[stop.signal]}: saved a checkpoint at step {step} in "
                     f"{training.checkpoints.directory}; run the same command to resume", 128 + stop.signal)


def check_finite(training: Training, losses: list[jax.Array], epoch: int, step: int) -> None:
    """Stops the run, naming the step, if a loss since the last checkpoint (the last at `step`) is NaN or infinite."""
    if not losses:
        return
    values = sharding.to_host(jnp.stack(losses))
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        latest = training.checkpoints.latest_step()
        kept = f"the last good checkpoint (step {latest}) is kept" if latest is not None else \
            "no checkpoint had been saved yet"
        raise Diverged(f"the training loss became {values[bad[0]]} at step {step - len(values) + bad[0] + 1} "
                       f"(epoch {epoch}); stopped without saving: {kept}; lower optimizer.learning_rate (now "
                       f"{training.config.optimizer.learning_rate}) and train in a new --workdir")


def save(training: Training, state: TrainState, sums: EpochSums, recent_losses: list[jax.Array], epoch: int,
         step: int) -> None:
    """A checkpoint of the state (at `step`) and the epoch's sums, unless a loss since the last one is not finite."""
    check_finite(training, recent_losses, epoch, step)
    training.checkpoints.save(state, sums)


def report(training: Training, record: dict) -> None:
    training.log(f"epoch {record['epoch']:>3}/{training.config.train.num_epochs}  train loss "
                 f"{record['train_loss']:.4f} acc {record['train_accuracy']:.2%}  test loss {record['test_loss']:.4f} "
                 f"acc {record['test_accuracy']:.2%}  {record['epoch_seconds']:.1f}s "
                 f"({record['images_per_second']:,.0f} {'img' if training.dataset.is_image else 'examples'}/s) "
                 f"at {record['elapsed_seconds']:.1f}s")


def report_stop(training: Training, monitor: Monitor, history: list[dict]) -> None:
    """The line that says why the run ends before train.num_epochs."""
    best, last = monitor.best(history), history[-1]["epoch"]
    since = f"since epoch {best['epoch']} ({monitor.name} {best[monitor.name]:.4g})" if best else "at all"
    training.log(f"early stopping after epoch {last} of {training.config.train.num_epochs}: {monitor.name} has not "
                 f"improved for {last - (best['epoch'] if best else 0)} epochs {since} "
                 f"(train.early_stopping_patience={monitor.patience})")


def finish(training: Training, state: TrainState, monitor: Monitor, history: list[dict], step_records: list[dict],
           startup_seconds: float | None) -> TrainResult:
    """Writes results.json (the last epoch's figures, the best epoch's, and what prediction needs) and returns the
    TrainResult: its state the best epoch's with train.keep_best (as cnn.load_run gives it), else the last one's."""
    last, dataset = history[-1], training.dataset
    results = {
        "dataset": dataset.name, "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
        "epochs": last["epoch"], "steps": int(jax.device_get(state.step)), **monitor.results(history),
        "train_seconds": sum(r["epoch_seconds"] for r in history), "total_seconds": time.time() - training.start,
        "seed": training.config.seed, "parameters": models.layers.parameter_count(state.params),
        "startup_seconds": startup_seconds, "devices": training.mesh.size, "processes": jax.process_count(),
        "input_path": dataset.input_path,  # 'memory', or 'streamed' from disk (larger than data.max_memory_gb)
        "input_share": sum(r["input_seconds"] for r in history) / max(sum(r["epoch_seconds"] for r in history), 1e-9),
        **data_lib.describe(dataset),  # class names, input shape: cnn.predict then needs no dataset
        **{key: last[key] for key in evaluation.METRICS if key in last},  # the test split's per-class metrics
    }
    state = monitor.best_state(state)
    state = state if jax.process_count() == 1 else sharding.to_host(state)  # a host copy to draw from
    result = TrainResult(state=state, model=training.model, history=history, results=results,
                         class_names=dataset.class_names, recipe=training.recipe, dataset=dataset, steps=step_records)
    if training.writes_files:
        path = os.path.join(training.workdir, workdir_lib.RESULTS)
        workdir_lib.write_json(path, results)
        if "per_class" in results:
            training.log(evaluation.per_class_table(results["per_class"]))
        training.log(f"test accuracy {results['test_accuracy']:.2%} after {results['epochs']} epochs "
                     f"({results['train_seconds']:.1f}s training); results in {path}")
    return result
