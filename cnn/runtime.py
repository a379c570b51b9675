"""The process around a run: its memory allocator, CPU host devices, the compilation cache, jax.distributed, start
time, SIGTERM.

These touch global state (environment variables, JAX's config, signal
handlers), so they live here, apart from the pure training code, and the
command line and `train_and_evaluate` call them before JAX starts. JAX is
imported only inside the functions that use it, so a command can restart its
process (`restart_with_allocator`) before paying for that import.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import platform
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping

# XLA_FLAGS that cnn adds, per jaxlib (major, minor) they were measured on: XLA stops at a flag it does not know,
# so another release gets none of them until they are measured there.
XLA_CPU_FLAGS = {(0, 10): {"xla_cpu_experimental_ynn_fusion_type": ""}}
_IMPORTED = time.time()


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


HUGE_PAGES = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def reuse_blocks_library() -> str | None:
    """The path of cnn/_reuse_blocks (reuse_blocks.c, built at install on Linux), or None where it was not built."""
    folder = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(path := os.path.join(folder, "_reuse_blocks" + suffix)):
            return path
    return None


def allocator_environment(environ: Mapping[str, str] = os.environ, thp: str | None = None,
                          library: str | None = None) -> dict[str, str] | None:
    """`environ` set up for XLA:CPU's large per-call buffers, or None where that would change nothing (the C library
    is not glibc, or the environment has both already):

    - `library` (`reuse_blocks_library()` when None) preloaded, unless
      LD_PRELOAD is set already or CNN_REUSE_BLOCKS=0;
    - glibc asked to back large blocks with transparent huge pages, where the
      kernel gives them on request (`thp`, its setting; read from /sys when
      None) and GLIBC_TUNABLES does not set it already.

    Why: XLA:CPU allocates a compiled step's temporary buffer at every call
    and frees it after (101 MB for ResNet-20's bf16 step at batch 128, 2.4 GB
    for ResNet-50's at batch 32), and glibc returns such blocks to the kernel
    at once. The kernel then faulted in and zeroed 30,000 fresh 4 KB pages a
    ResNet-20 step, 60 ms of system time against a 125 ms step on 2 cores; in
    2 MB pages, 300-600 faults and 15-30 ms. The preloaded library keeps the
    freed block for the next call: no faults, and ResNet-20 trained 1.1-1.2x
    faster again, for one more step's buffer of peak memory
    (docs/performance.md). The loader and glibc read these only when a
    process starts, hence the restart.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    changes = {}
    library = library or reuse_blocks_library()
    if library and not environ.get("LD_PRELOAD") and environ.get("CNN_REUSE_BLOCKS", "1") != "0":
        changes["LD_PRELOAD"] = library
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        if thp is None:
            try:
                with open(_THP_SETTING) as f:
                    thp = f.read()
            except OSError:
                thp = ""
        if "[madvise]" in thp:  # [always]: every mapping has them already; [never]: none can
            changes["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES)))
    return {**environ, **changes} if changes else None


def restart_with_allocator() -> None:
    """Restarts this process (same PID, arguments and streams) with `allocator_environment`, where it changes
    something; call it first thing in a command's __main__, before JAX is imported. A notebook's kernel cannot
    restart itself: start Jupyter with the environment instead (docs/notebook.md)."""
    environ = allocator_environment()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):  # cannot exec: go on without
            os.execve(sys.executable, sys.orig_argv, environ)


def set_cpu_devices(num_devices: int) -> None:
    """Splits the CPU into `num_devices` host devices; 0 means one per two cores (callers pass 1 where oneDNN
    computes the convolutions: cnn.kernels.cpu_devices).

    XLA runs much of a CNN's backward pass on one thread, so a step uses the
    cores through data parallelism over host devices, each with the threads
    of two cores for the rest (the split measured fastest;
    docs/devices.md). XLA's CPU collectives run on its intra-op thread pool:
    with as many devices as threads, a device blocked at an all-reduce can
    starve another of the thread it needs, so PJRT_NPROC is raised to at
    least two threads per device, never lowered (a smaller value inherited
    from a parent process would hang). On jaxlib 0.10 (XLA_CPU_FLAGS), XLA:CPU's
    YNNPACK fusions are turned off unless XLA_FLAGS sets them: they slow the pooling reductions and the
    weight-gradient convolution down.

    Must run before JAX first touches a device; afterwards the devices are
    fixed and this leaves them (a notebook that already used JAX).
    """
    count = num_devices if isinstance(num_devices, int) and num_devices > 0 else max(1, cpu_count() // 2)
    threads = int(os.environ.get("PJRT_NPROC", "0") or 0)
    os.environ["PJRT_NPROC"] = str(max(threads, 2 * count, cpu_count()))
    flags = os.environ.get("XLA_FLAGS", "")
    for name, value in xla_cpu_flags().items():
        if name not in flags:
            flags = f"{flags} --{name}={value}".strip()
    os.environ["XLA_FLAGS"] = flags
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass


def xla_cpu_flags() -> dict[str, str]:
    """The XLA flags cnn sets for this jaxlib release (none for a release they were not measured on)."""
    import jaxlib

    major, minor = (int(v) for v in jaxlib.__version__.split(".")[:2])
    return XLA_CPU_FLAGS.get((major, minor), {})


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins a multi-process (multi-host) run; a no-op when nothing asks for one.

    With a coordinator address the three values come from the caller (flags);
    without one, `jax.distributed.initialize()` reads a cluster's own
    environment (SLURM, Open MPI, TPU pods) when `JAX_DISTRIBUTED=1` or SLURM
    started several tasks. CPU processes talk over gloo (TCP).
    """
    cluster = os.environ.get("JAX_DISTRIBUTED") == "1" or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if coordinator_address is None and not cluster:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def use_compilation_cache() -> None:
    """Keeps compiled steps in ~/.cache/cnn/xla, so a rerun of a config skips XLA compilation.

    Leaves a cache the user chose (JAX_COMPILATION_CACHE_DIR) alone.
    """
    import jax

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


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


@contextlib.contextmanager
def stop_requests() -> Iterator[types.SimpleNamespace]:
    """Turns SIGTERM (how clusters pre-empt jobs) and SIGINT (Ctrl-C) into a flag the loop checks after each step.

    `flag.signal` is the first such signal (None until one arrives). The loop
    then saves a checkpoint at that step and stops; a second Ctrl-C while it
    saves changes nothing, so the save completes and the newest checkpoint is
    whole.
    """
    flag = types.SimpleNamespace(signal=None)
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, _frame):
        if flag.signal is None:
            flag.signal = signum
            os.write(2, f"\n{STOP_SIGNALS[signum]}: stopping after this step, with a checkpoint\n".encode())
        elif signum == signal.SIGINT:
            os.write(2, b"\nstill saving the checkpoint; it ends by itself in a moment\n")

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
