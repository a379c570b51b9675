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


_BIG_TEMPORARY = """
import resource
from cnn import runtime
runtime.set_cpu_devices(1)  # as training sets up XLA
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.tanh(x @ w).sum(0))  # the 128 MB product is the program's temporary buffer
x, w = jnp.ones((16384, 16)), jnp.ones((16, 2048))
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    f(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def test_huge_pages_environment_adds_glibcs_tunable_once():
    """The restart's environment keeps the user's tunables and adds huge pages only where the kernel hands them out
    on request; where nothing would change there is no restart (None)."""
    from cnn import runtime

    on_request = "always [madvise] never"
    assert runtime.huge_pages_environment({"A": "1"}, on_request) == {"A": "1", "GLIBC_TUNABLES": runtime.HUGE_PAGES}
    assert runtime.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, on_request)[
        "GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{runtime.HUGE_PAGES}"
    assert runtime.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, on_request) is None
    assert runtime.huge_pages_environment({}, "[always] madvise never") is None
    assert runtime.huge_pages_environment({}, "always madvise [never]") is None


def test_a_step_with_a_large_temporary_buffer_faults_in_huge_pages(tmp_path):
    """XLA:CPU allocates a program's temporary buffer at each call; in the environment `python -m cnn.main`
    restarts itself with, the kernel maps it in 2 MB pages: a 128 MB buffer costs well under 1,000 page faults a
    call instead of 32,000. And `python -m cnn.main` does restart itself with it."""
    from cnn import runtime

    environ = runtime.huge_pages_environment()
    if environ is None:
        pytest.skip("this kernel gives huge pages to every mapping or to none, or the C library is not glibc")
    plain = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    faults = [int(subprocess.run([sys.executable, "-c", _BIG_TEMPORARY], env=env, capture_output=True, text=True,
                                 check=True).stdout) for env in (plain, environ)]
    assert faults[0] > 20_000 and faults[1] < 1_000, faults
    probe = tmp_path / "probe.py"  # a config file read by the restarted process: it sees the tunable, then stops
    probe.write_text("import os, sys\nprint(os.environ.get('GLIBC_TUNABLES', ''))\nsys.exit(7)\n")
    out = subprocess.run([sys.executable, "-m", "cnn.main", f"--config={probe}", f"--workdir={tmp_path}"],
                         env=plain, cwd=REPO, capture_output=True, text=True)
    assert runtime.HUGE_PAGES in out.stdout, out.stdout + out.stderr[-2000:]
