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


LOSSES = [0, 2]  # trajectory()'s train and test loss columns; the others are accuracies, F1 and recalls


def assert_same_training(ours, theirs, rtol=1e-5):
    """The first epoch's metrics equal to `rtol`. Devices and processes sum some gradients in other orders, and
    rounding's differences can grow over later epochs by chance (Adam turns a near-zero gradient's rounding into a
    step): with cnn's Winograd convolutions taken everywhere, one device against two read losses 0.3% apart by the
    second epoch, and one test image went the other way. So the last epoch is held to that drift's size: losses
    within 2%, the rest within 0.03 (one of a class's 36 test images)."""
    np.testing.assert_allclose(ours[0], theirs[0], rtol=rtol)
    np.testing.assert_allclose(ours[-1][LOSSES], theirs[-1][LOSSES], rtol=2e-2)
    np.testing.assert_allclose(np.delete(ours[-1], LOSSES), np.delete(theirs[-1], LOSSES), atol=3e-2)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("devices") / "one"
    run(workdir, "--config.train.num_devices=1")
    return trajectory(workdir)


@pytest.mark.parametrize("devices", [2, 4])
def test_more_devices_same_trajectory(tmp_path, one_device, devices):
    output = run(tmp_path, f"--config.train.num_devices={devices}")
    assert f"on {devices} cpu device(s)" in output
    assert_same_training(trajectory(tmp_path), one_device)


def test_micro_batches_on_two_devices_same_trajectory(tmp_path, one_device):
    """Gradient accumulation over a sharded batch: 4 parts of 8 examples, 4 on each device, then one update."""
    output = run(tmp_path, "--config.train.num_devices=2", "--config.train.micro_batch_size=8")
    assert "on 2 cpu device(s)" in output and "4 parts of 8" in output
    assert_same_training(trajectory(tmp_path), one_device, rtol=1e-4)


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
    assert_same_training(trajectory(tmp_path), one_device)
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
faults = []
for _ in range(6):  # the fewest of any call: one may start before the last one's buffer is freed, and take another
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


def test_allocator_environment_adds_the_library_and_the_tunable_once():
    """The restart's environment keeps the user's tunables, preloads the block-keeping library unless LD_PRELOAD is
    set or CNN_REUSE_BLOCKS=0, and adds huge pages only where the kernel hands them out on request; where nothing
    would change there is no restart (None)."""
    from cnn import runtime

    on_request, lib = "always [madvise] never", "/x/_reuse_blocks.so"
    if runtime.allocator_environment({}, on_request, lib) is None:
        pytest.skip("not Linux with glibc")
    assert runtime.allocator_environment({"A": "1"}, on_request, lib) == {
        "A": "1", "GLIBC_TUNABLES": runtime.HUGE_PAGES, "LD_PRELOAD": lib}
    assert runtime.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, on_request, lib)[
        "GLIBC_TUNABLES"] == f"glibc.malloc.tcache_count=0:{runtime.HUGE_PAGES}"
    assert runtime.allocator_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, on_request, lib) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LD_PRELOAD": lib}
    assert runtime.allocator_environment({}, "[always] madvise never", lib) == {"LD_PRELOAD": lib}
    assert runtime.allocator_environment({"LD_PRELOAD": "/y.so"}, "always madvise [never]", lib) is None
    assert runtime.allocator_environment({"CNN_REUSE_BLOCKS": "0", "GLIBC_TUNABLES": runtime.HUGE_PAGES},
                                         on_request, lib) is None


def _reuse_blocks() -> str:
    from cnn import runtime

    library = runtime.reuse_blocks_library()
    if runtime.allocator_environment({}, "never", library) is None or library is None:
        pytest.skip("not Linux with glibc, or the install built no cnn/_reuse_blocks")
    return library


_BLOCKS = """
import ctypes
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
def alloc(size, align=64):
    p = ctypes.c_void_p()
    assert libc.posix_memalign(ctypes.byref(p), align, size) == 0 and p.value % align == 0
    kept = ctypes.string_at(p.value + size - 1, 1) == b"k"  # a fresh block from the kernel is zeros
    ctypes.memset(p.value, ord("k"), size)  # the whole block is usable
    return p.value, kept
MB = 1 << 20
a, _ = alloc(100 * MB); libc.free(a)
b, b_kept = alloc(100 * MB)            # the block freed, kept
c, c_kept = alloc(95 * MB)             # none kept fits (b is live): a fresh one
libc.free(b); d, d_kept = alloc(95 * MB)   # within 1/8 of b's size: b again
e, _ = alloc(40 * MB, 4096)
libc.free(e); f, f_kept = alloc(40 * MB, 1 << 22)  # e's alignment is not enough: fresh
small, _ = alloc(1000); libc.free(small)      # small blocks pass through
g = libc.realloc(c, 120 * MB); libc.free(g)   # a realloc'd block is no longer the one recorded
print(b_kept and b == a, not c_kept, d_kept and d == b, not f_kept)
"""


def test_the_preloaded_library_reuses_a_freed_large_block_of_the_same_size(tmp_path):
    """reuse_blocks.c, loaded as the restart preloads it: a large block freed comes back for the next request of its
    size and alignment, and only then; memory stays usable, realloc and small blocks work as before."""
    env = {**os.environ, "LD_PRELOAD": _reuse_blocks()}
    out = subprocess.run([sys.executable, "-c", _BLOCKS], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"] * 4, out.stdout + out.stderr


def test_a_step_with_a_large_temporary_buffer_faults_it_in_once(tmp_path):
    """XLA:CPU allocates a program's temporary buffer at each call; in the environment `python -m cnn.main`
    restarts itself with, the freed buffer is kept for the next call: a 128 MB buffer costs 32,000 page faults a call
    without it (500 in huge pages), and with it only those of the call's small blocks, even in 4 KB pages. And
    `python -m cnn.main` does restart itself with it."""
    library = _reuse_blocks()
    plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    faults = [int(subprocess.run([sys.executable, "-c", _BIG_TEMPORARY], env=env, capture_output=True, text=True,
                                 check=True).stdout) for env in (plain, {**plain, "LD_PRELOAD": library})]
    assert faults[0] > 20_000 and faults[1] < 1_000, faults
    probe = tmp_path / "probe.py"  # a config file read by the restarted process: it shows its environment, then stops
    probe.write_text("import os, sys\nprint(os.environ.get('LD_PRELOAD', ''))\nsys.exit(7)\n")
    out = subprocess.run([sys.executable, "-m", "cnn.main", f"--config={probe}", f"--workdir={tmp_path}"],
                         env=plain, cwd=REPO, capture_output=True, text=True)
    assert library in out.stdout, out.stdout + out.stderr[-2000:]
