"""Data parallelism gives the same training run on 1, 2 or 4 devices, and in two processes.

Each run is a real `python -m cnn.main` on the digits set: the CPU is split
into host devices (train.num_devices), or two processes join over loopback
with jax.distributed (gloo collectives), one device each, with the same
global batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

ARGS = ["--config=configs/digits.py", "--config.train.num_epochs=2", "--config.train.pictures=False"]


def run(workdir, *extra, wait=True, expect=0):
    """Runs cnn.main; returns its output once it exits with `expect` (or the process, if not `wait`)."""
    command = [sys.executable, "-m", "cnn.main", f"--workdir={workdir}", *ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output = process.communicate(timeout=300)[0]
    assert process.returncode == expect, f"exit {process.returncode}:\n{output[-3000:]}"
    return output


def trajectory(workdir):
    with open(workdir / "metrics.jsonl") as f:
        # The per-class metrics too: each device's (and process's) predictions must meet their own labels.
        return np.array([[r["train_loss"], r["train_accuracy"], r["test_loss"], r["test_accuracy"], r["macro_f1"],
                          r["balanced_accuracy"], r["top5_accuracy"], *(c["recall"] for c in r["per_class"].values())]
                         for r in map(json.loads, f)])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("devices") / "one"
    run(workdir, "--config.train.num_devices=1")
    return trajectory(workdir)


@pytest.mark.parametrize("devices", [2, 4])
def test_more_devices_same_trajectory(tmp_path, one_device, devices):
    output = run(tmp_path, f"--config.train.num_devices={devices}")
    assert f"on {devices} cpu device(s)" in output
    np.testing.assert_allclose(trajectory(tmp_path), one_device, rtol=1e-5)


def test_micro_batches_on_two_devices_same_trajectory(tmp_path, one_device):
    """Gradient accumulation over a sharded batch: 4 parts of 8 examples, 4 on each device, then one update."""
    output = run(tmp_path, "--config.train.num_devices=2", "--config.train.micro_batch_size=8")
    assert "on 2 cpu device(s)" in output and "4 parts of 8" in output
    np.testing.assert_allclose(trajectory(tmp_path), one_device, rtol=1e-4)


def test_two_processes_match_one(tmp_path, one_device):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [run(tmp_path, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                     "--config.train.num_devices=1", wait=False) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert "on 2 cpu device(s) in 2 processes" in outputs[0]
    assert "test accuracy" not in outputs[1]  # only process 0 reports and writes
    np.testing.assert_allclose(trajectory(tmp_path), one_device, rtol=1e-5)
    assert json.loads((tmp_path / "results.json").read_text())["processes"] == 2
    assert (tmp_path / "checkpoints").is_dir()


def test_batch_that_does_not_divide_is_refused(tmp_path):
    output = run(tmp_path, "--config.train.num_devices=4", "--config.train.batch_size=30", expect=2)
    assert "error: train.batch_size=30 does not divide over 4 devices" in output


def test_micro_batch_that_does_not_divide_is_refused(tmp_path):
    output = run(tmp_path, "--config.train.micro_batch_size=12", expect=2)
    assert "error: train.micro_batch_size=12 is not valid: expected 0 (automatic) or a divisor of train.batch_size" \
        in output
    output = run(tmp_path, "--config.train.num_devices=4", "--config.train.micro_batch_size=2", expect=2)
    assert "error: train.micro_batch_size=2 does not divide over 4 devices" in output


def test_xla_flags_follow_the_jaxlib_release(monkeypatch):
    """XLA aborts on a flag it does not know, so a release the flags were not measured on gets none of them."""
    import jaxlib

    from cnn import runtime

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
    runtime.set_cpu_devices(1)
    assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=1 "
                                       "--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(jaxlib, "__version__", "0.11.0")
    runtime.set_cpu_devices(1)
    assert os.environ["XLA_FLAGS"] == ""
