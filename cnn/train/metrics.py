"""Metrics to WORKDIR/metrics.jsonl (per epoch), WORKDIR/steps.jsonl (every few steps) and TensorBoard event files."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from cnn import workdir as workdir_lib
from cnn.train.evaluation import SCALARS
from cnn.train.state import EpochSums

def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


# TensorBoard tags of the step records' fields; the epoch records' train means go to train/epoch_*.
STEP_TAGS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy", "learning_rate": "learning_rate"}


def _kept_records(path: str, step: int) -> list[dict]:
    """The records of a JSONL file up to `step`; a torn last line (a process killed mid-write) is dropped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if record["step"] > step:
                    break
                records.append(record)
    return records


class MetricWriter:
    """Writes epoch records to `metrics.jsonl`, step records to `steps.jsonl`, and both as TensorBoard scalars.

    tensorboardX writes the event files without TensorFlow, so
    `tensorboard --logdir=WORKDIR` reads them and training never imports TF.
    """

    def __init__(self, workdir: str, step: int = 0, enabled: bool = True):
        """Keeps the records up to `step` (where a resumed run continues) and drops later ones.

        `self.history` holds the kept epoch records, `self.steps` the step
        records. With `enabled` False (every process but the first of a
        multi-process run) it only keeps them.
        """
        paths = [os.path.join(workdir, name) for name in (workdir_lib.METRICS, workdir_lib.STEPS)]
        self.history, self.steps = (_kept_records(path, step) for path in paths)
        self.enabled = enabled
        if not enabled:
            return
        self._paths, self._files = paths, []
        for path, records in zip(paths, (self.history, self.steps)):
            workdir_lib.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
            with workdir_lib.writing(path):
                self._files.append(open(path, "a"))
        # tensorboardX takes ~1 s to import: done beside start-up's compilation, not before it.
        self._tb = None
        self._opening = threading.Thread(target=self._open_tensorboard, args=(workdir,), daemon=True)
        self._opening.start()

    def _open_tensorboard(self, workdir: str) -> None:
        from tensorboardX import SummaryWriter  # here, in a thread: it takes about a second to import

        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, record: dict) -> None:
        """An epoch record: `train_loss` goes to TensorBoard as train/epoch_loss, `test_loss` as test/loss, the test
        split's metrics as test/macro_f1 and so on; `per_class` (nested) and undefined (None) values stay out of it."""
        self._write(record, self.history, 0, {
            key: key.replace("_", "/epoch_" if key.startswith("train_") else "/", 1)
            if key.startswith(("train_", "test_")) else f"test/{key}" if key in SCALARS else key
            for key, value in record.items() if key not in ("epoch", "step") and _is_scalar(value)})

    def write_steps(self, record: dict) -> None:
        """A step record: its window's means and learning rate go to TensorBoard (STEP_TAGS)."""
        self._write(record, self.steps, 1, STEP_TAGS)

    def _write(self, record: dict, records: list, file: int, tags: dict[str, str]) -> None:
        record = {**record, "time": time.time()}
        records.append(record)
        if not self.enabled:
            return
        path = self._paths[file]
        with workdir_lib.writing(path):  # a full disk: one line; a torn last line is dropped on resume
            workdir_lib.fault(os.path.basename(path))
            self._files[file].write(json.dumps(record) + "\n")
            self._files[file].flush()  # before the checkpoint that may follow: a resume relies on the record
        self._opening.join()
        for key, tag in tags.items():
            self._tb.add_scalar(tag, record[key], record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        for path, f in zip(self._paths, self._files):
            with workdir_lib.writing(path):
                f.close()
        self._opening.join()
        self._tb.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error that ends the run is the one to report, not the next
            self.close()


class StepLog:
    """Step records: the mean training loss and accuracy of each window of `every` steps, and the learning rate.

    The windows end every `every` steps and at each epoch's end (`every` 0:
    epoch ends only). Their means are differences of the epoch's running sums,
    which the step keeps on the devices; the loop fetches those once per
    window. Each record also holds the epoch's running means, from which a
    resumed run recovers the sums at its last record exactly, so its records
    equal an uninterrupted run's.
    """

    def __init__(self, writer: MetricWriter, every: int, steps_per_epoch: int, learning_rate: Callable[[int], float],
                 start: float, step: int):
        self.writer, self.every, self.steps_per_epoch = writer, every, steps_per_epoch
        self.learning_rate, self.start = learning_rate, start
        self.epoch_start = step // steps_per_epoch * steps_per_epoch
        self.last_step, self.last_sums = self.epoch_start, EpochSums.zeros()
        last = writer.steps[-1] if writer.steps else None
        if last is not None and self.epoch_start < last["step"] <= step:  # resumed mid-epoch
            count = last["step"] - self.epoch_start
            self.last_step = last["step"]
            # A float32 sum divided by a count in float64, times the count, rounds back to the same float32.
            self.last_sums = EpochSums(*(np.float32(last[f"epoch_train_{key}"] * count) for key in EpochSums._fields))

    def due(self, step: int) -> bool:
        """Whether a window ends after `step` inside an epoch (the loop writes the epoch's last one itself)."""
        return self.writer.enabled and self.every > 0 and step % self.every == 0 and step % self.steps_per_epoch != 0

    def write(self, step: int, epoch: int, sums: EpochSums) -> None:
        """The window that ends at `step`, from the epoch's running `sums` (on the host) after it."""
        if not self.writer.enabled:
            return
        count, since_epoch = step - self.last_step, step - self.epoch_start
        self.writer.write_steps({
            "epoch": epoch, "step": step,
            "train_loss": (float(sums.loss) - float(self.last_sums.loss)) / count,
            "train_accuracy": (float(sums.accuracy) - float(self.last_sums.accuracy)) / count,
            "learning_rate": self.learning_rate(step - 1),  # the rate of the window's last update
            "epoch_train_loss": float(sums.loss) / since_epoch,
            "epoch_train_accuracy": float(sums.accuracy) / since_epoch,
            "elapsed_seconds": time.time() - self.start})
        self.last_step, self.last_sums = step, EpochSums(np.float32(sums.loss), np.float32(sums.accuracy))
        if step % self.steps_per_epoch == 0:  # the next epoch's sums start from zero
            self.epoch_start, self.last_sums = step, EpochSums.zeros()
