"""Per-epoch metrics to a JSON-lines file and to TensorBoard event files."""

from __future__ import annotations

import json
import os
import time


class MetricWriter:
    """Writes each record as one line of `metrics.jsonl` and as TensorBoard scalars.

    tensorboardX writes the event files without TensorFlow, so
    `tensorboard --logdir=WORKDIR` reads them and training never imports TF.
    """

    def __init__(self, workdir: str):
        from tensorboardX import SummaryWriter

        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "w")
        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, record: dict) -> None:
        self._jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key not in ("epoch", "step"):
                self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "test_")) else key,
                                    value, step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
