"""Per-epoch metrics to WORKDIR/metrics.jsonl and to TensorBoard event files."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from cnn import workdir as workdir_lib


class MetricWriter:
    """Writes each record as one line of `metrics.jsonl` and as TensorBoard scalars.

    tensorboardX writes the event files without TensorFlow, so
    `tensorboard --logdir=WORKDIR` reads them and training never imports TF.
    """

    def __init__(self, workdir: str, step: int = 0, enabled: bool = True):
        """Keeps the records up to `step` (where a resumed run continues) and drops later ones.

        `self.history` holds the kept records. A torn last line, from a
        process killed mid-write, is dropped too. With `enabled` False (every
        process but the first of a multi-process run) it only keeps history.
        """
        self.path = path = os.path.join(workdir, workdir_lib.METRICS)
        self.history = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    if record["step"] > step:
                        break
                    self.history.append(record)
        self.enabled = enabled
        if not enabled:
            return
        workdir_lib.write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.history))
        with workdir_lib.writing(path):
            self._jsonl = open(path, "a")
        # tensorboardX takes ~1 s to import: done beside start-up's compilation, not before it.
        self._tb = None
        self._opening = threading.Thread(target=self._open_tensorboard, args=(workdir,), daemon=True)
        self._opening.start()

    def _open_tensorboard(self, workdir: str) -> None:
        from tensorboardX import SummaryWriter  # here, in a thread: it takes about a second to import

        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, record: dict) -> None:
        record = {**record, "time": time.time()}
        self.history.append(record)
        if not self.enabled:
            return
        with workdir_lib.writing(self.path):  # a full disk: one line; a torn last line is dropped on resume
            workdir_lib.fault(workdir_lib.METRICS)
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        self._opening.join()
        step = record["step"]
        for key, value in record.items():
            if key not in ("epoch", "step"):
                self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "test_")) else key,
                                    value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        with workdir_lib.writing(self.path):
            self._jsonl.close()
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
