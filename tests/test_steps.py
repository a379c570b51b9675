"""Step records: steps.jsonl and TensorBoard's train/loss, train/accuracy and learning_rate every few steps, and a
TensorBoard server that shows them."""

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import optax
import pytest

import cnn
from cnn.errors import ConfigError
from test_plots import _events

EPOCHS, BATCH, LR = 2, 64, 0.003
STEPS_PER_EPOCH = 1437 // BATCH  # 22


def _digits_run(workdir, log_every_steps):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs, config.train.batch_size = EPOCHS, BATCH
    config.optimizer.learning_rate, config.optimizer.schedule, config.optimizer.warmup_epochs = LR, "warmup_cosine", 0.5
    config.train.log_every_steps = log_every_steps
    return cnn.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    return _digits_run(tmp_path_factory.mktemp("every-step"), 1)


def _scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    series = collections.defaultdict(list)
    for event in _events(str(workdir)):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                series[value.tag].append((event.step, value.simple_value))
    return series


def test_windows_are_the_means_of_their_steps(tmp_path, every_step):
    run = _digits_run(tmp_path, 5)
    # Every 5 steps, and at each epoch's end, where the windows start again.
    assert [r["step"] for r in run.steps] == [5, 10, 15, 20, 22, 25, 30, 35, 40, 44]
    assert [r["step"] for r in every_step.steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    per_step = {r["step"]: r for r in every_step.steps}  # the same training, step for step
    start = 0
    for record in run.steps:
        window = [per_step[s] for s in range(start + 1, record["step"] + 1)]
        for key in ("train_loss", "train_accuracy"):
            assert record[key] == pytest.approx(sum(r[key] for r in window) / len(window), rel=1e-5, abs=1e-7)
        assert record["learning_rate"] == per_step[record["step"]]["learning_rate"]
        start = record["step"]
    # At an epoch's end the running epoch mean is exactly metrics.jsonl's train figures.
    ends = [r for r in run.steps if r["step"] % STEPS_PER_EPOCH == 0]
    assert [(r["epoch_train_loss"], r["epoch_train_accuracy"]) for r in ends] == \
        [(r["train_loss"], r["train_accuracy"]) for r in run.history]
    on_disk = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert on_disk == run.steps


def test_learning_rate_is_the_rate_of_the_windows_last_update(every_step):
    total = EPOCHS * STEPS_PER_EPOCH
    schedule = optax.warmup_cosine_decay_schedule(0.0, LR, STEPS_PER_EPOCH // 2, total, 0.0)
    rates = [r["learning_rate"] for r in every_step.steps]
    assert rates == pytest.approx([float(schedule(step - 1)) for step in range(1, total + 1)], rel=1e-6, abs=1e-12)
    assert rates[0] == 0.0 and max(rates) == pytest.approx(LR)


def test_event_files_hold_a_point_per_step_record(digits_run):
    workdir, run, _ = digits_run  # configs/digits.py for 2 epochs of 44 steps, the default log_every_steps=50
    series = _scalars(workdir)
    assert [step for step, _ in series["train/loss"]] == [r["step"] for r in run.steps] == [44, 50, 88]
    assert len(series["train/loss"]) > len(run.history)
    assert [step for step, _ in series["learning_rate"]] == [44, 50, 88]
    assert [value for _, value in series["train/loss"]] == pytest.approx([r["train_loss"] for r in run.steps])
    assert [step for step, _ in series["train/epoch_loss"]] == [44, 88]  # the epochs' means
    assert [step for step, _ in series["test/accuracy"]] == [44, 88]


def test_log_every_steps_must_be_zero_or_positive():
    config = cnn.load_config("configs/digits.py")
    config.train.log_every_steps = -1
    with pytest.raises(ConfigError, match=r"train.log_every_steps=-1.*0 \(epoch ends only\) or a positive integer"):
        cnn.config.validate(config)
    config.train.log_every_steps = 0
    cnn.config.validate(config)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_run(digits_run, tmp_path):
    """`tensorboard --logdir=WORKDIR`, as the README says, shows the run's step-level curves."""
    workdir, run, _ = digits_run
    beside = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    command = beside if os.path.exists(beside) else shutil.which("tensorboard")
    if command is None:
        pytest.skip("tensorboard is not installed (pip install -e '.[dev]' installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "tensorboard.log", "w+")
    server = subprocess.Popen([command, f"--logdir={workdir}", f"--port={port}", "--host=127.0.0.1"],
                              stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, runs = time.time() + 90, None
        while time.time() < deadline and server.poll() is None:
            try:
                runs = _get(f"{base}/data/runs")
                if runs:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        log.seek(0)
        assert runs == ["."], log.read()[-2000:]
        tags = _get(f"{base}/data/plugin/scalars/tags")["."]
        assert {"train/loss", "train/accuracy", "learning_rate", "test/loss", "test/accuracy"} <= tags.keys()
        points = _get(f"{base}/data/plugin/scalars/scalars?run=.&tag=train/loss")
        assert [step for _, step, _ in points] == [r["step"] for r in run.steps]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
