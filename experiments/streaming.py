"""Benchmark for the streamed input path (data.max_memory_gb): peak memory and speed against in-memory peers.

    python experiments/streaming.py [--root DIR] [--images 120000] [--small 12000] [--budget 0.25]

Writes `--images` synthetic 64x64 RGB PNGs (10 classes, each a colour and a
stripe direction plus noise) into class folders under --root (a temporary
folder if not given; reused when already there), and hard-links the first
`--small` of them into a second folder. Each cache is built once in its own
process (its peak RSS is printed: the build writes the decoded images in
pieces, so it stays far below the decoded size). Then, each in its own
process, from the cache:
  small   the small set in memory (the memory peer: a tenth of the data);
  stream  the large set with data.max_memory_gb=--budget (streamed);
  memory  the large set in memory (the speed peer: the same steps).
stream and memory alternate `--repeats` times. It prints each run's peak
RSS (ru_maxrss of the process) and the last epoch's images/s, and the
ratios against the targets: stream RSS (the largest) <= 1.15x small, stream
images/s >= 0.85x memory (medians). `--read-speed` also times random
row reads of the decoded cache three ways: pread gathers (cnn's DiskArray),
np.memmap fancy indexing, and array_record (`ArrayRecordDataSource`, the
format Grain reads), each over the same rows. What it prints is also
recorded in docs/benchmarks/, as experiments/benchmark.py records its runs
(`--no_record` skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool

import numpy as np

import benchmark  # experiments/benchmark.py, beside this file: its `recording` writes docs/benchmarks/

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ("Conv2D(16, 3, strides=2, activation='relu')", "MaxPooling2D(2)", "Flatten()", "Dense(10)")
CLASSES = 10


def _write_class(job: tuple[str, int, int, int]) -> None:
    """Writes images `first`..`first+count` of class `label`: a class colour and stripe angle, plus noise."""
    from PIL import Image

    folder, label, first, count = job
    rng = np.random.default_rng([label, first])
    yy, xx = np.mgrid[0:64, 0:64]
    angle = np.pi * label / CLASSES
    stripes = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / 3.0) > 0)[..., None]
    colour = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256])
    for i in range(first, first + count):
        noise = rng.integers(-40, 40, (64, 64, 3))
        image = np.clip(colour * (0.6 + 0.4 * stripes) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"), compress_level=1)


def write_folder(root: str, count: int) -> float:
    """`count` images in ROOT/<class>/, written over every core; seconds taken (0 if they were there)."""
    per_class = count // CLASSES
    if all(len(os.listdir(os.path.join(root, f"c{c}"))) == per_class for c in range(CLASSES)
           if os.path.isdir(os.path.join(root, f"c{c}"))) and os.path.isdir(os.path.join(root, "c0")):
        return 0.0
    start = time.time()
    jobs = []
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
        jobs += [(os.path.join(root, f"c{c}"), c, first, min(1000, per_class - first))
                 for first in range(0, per_class, 1000)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_class, jobs)
    return time.time() - start


def link_subset(big: str, small: str, count: int) -> None:
    """The first `count / 10` images of each class of `big`, hard-linked into `small` (no extra disk)."""
    for c in range(CLASSES):
        os.makedirs(os.path.join(small, f"c{c}"), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(big, f"c{c}")))[:count // CLASSES]:
            target = os.path.join(small, f"c{c}", name)
            if not os.path.exists(target):
                os.link(os.path.join(big, f"c{c}", name), target)


def measured(command: list[str], env: dict) -> tuple[float, str]:
    """Runs `command`; its peak RSS in MB (from wait4, this child alone) and its output."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        sys.exit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return usage.ru_maxrss / 1024, output


def build_cache(folder: str, env: dict) -> float:
    """Decodes `folder` into the cache in a fresh process (streamed, so it is written in pieces); its peak RSS."""
    code = ("import cnn; c = cnn.load_config('configs/digits.py'); c.data.name = 'image_folder'; "
            f"c.data.path = {folder!r}; c.data.max_memory_gb = 1e-6; cnn.load_dataset(c.data)")
    rss, _ = measured([sys.executable, "-c", code], env)
    return rss


def train(folder: str, workdir: str, budget: float, args, env: dict) -> dict:
    """One `python -m cnn.main` run from the cache, in a fresh workdir: peak RSS, the last epoch's images/s and
    results.json."""
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={workdir}",
               "--config.data.name=image_folder", f"--config.data.path={folder}",
               f"--config.data.max_memory_gb={budget}", f"--config.train.num_epochs={args.epochs}",
               f"--config.train.batch_size={args.batch_size}", f"--config.model.layers={MODEL!r}",
               "--config.train.checkpoint_every_steps=0"]
    rss, output = measured(command, env)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    line = next(l for l in output.splitlines() if l.startswith("data: "))
    return {"rss_mb": rss, "images_per_second": last["images_per_second"], "input_path": results["input_path"],
            "input_share": results["input_share"], "test_accuracy": results["test_accuracy"], "line": line}


def read_speed(cache_file: str, rows: int = 20000, reads: int = 8192) -> dict[str, float]:
    """Random rows per second from the decoded cache: DiskArray (pread), np.memmap, and array_record."""
    from array_record.python import array_record_data_source, array_record_module

    from cnn.data.stream import DiskArray

    disk = DiskArray(cache_file)
    rows = min(rows, len(disk))
    index = np.random.default_rng(0).integers(0, rows, reads)
    record = os.path.join(os.path.dirname(cache_file), "bench.array_record")
    writer = array_record_module.ArrayRecordWriter(record, "group_size:1")
    for start in range(0, rows, 2048):
        for row in disk[np.arange(start, min(rows, start + 2048))]:
            writer.write(row.tobytes())
    writer.close()
    source = array_record_data_source.ArrayRecordDataSource([record])
    shape = disk.shape[1:]
    timings = {}
    for name, read in (
            ("pread (DiskArray)", lambda: disk[index]),
            ("np.memmap", lambda: np.load(cache_file, mmap_mode="r")[np.sort(index)]),
            ("array_record", lambda: np.stack([np.frombuffer(b, np.uint8).reshape(shape)
                                               for b in source.__getitems__(index.tolist())]))):
        read()  # warm: every way reads from the page cache
        start = time.perf_counter()
        for _ in range(3):
            read()
        timings[name] = 3 * reads / (time.perf_counter() - start)
    os.remove(record)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="where the image folders go (default: a temporary folder)")
    parser.add_argument("--images", type=int, default=120_000)
    parser.add_argument("--small", type=int, default=12_000)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="streamed and in-memory runs of the large set, "
                        "alternating")
    parser.add_argument("--read-speed", action="store_true")
    parser.add_argument("--no_record", action="store_true", help="print only; by default what is printed is also "
                        "appended to docs/benchmarks/<date>-<cpu>.md, as experiments/benchmark.py does")
    args = parser.parse_args()
    with benchmark.recording(not args.no_record):
        measure(args)


def measure(args) -> None:
    """Writes the folders, builds their caches, trains from them and prints each run and the ratios."""
    root = args.root or tempfile.mkdtemp(prefix="cnn-streaming-")
    big, small = os.path.join(root, f"images{args.images}"), os.path.join(root, f"images{args.small}")
    seconds = write_folder(big, args.images)
    link_subset(big, small, args.small)
    print(f"{args.images:,} 64x64 RGB PNGs in {big} ({args.images * 64 * 64 * 3 / 1e9:.2f} GB decoded)"
          + (f", written in {seconds:.0f}s" if seconds else ", already there"), flush=True)
    env = {**os.environ, "PYTHONPATH": REPO, "CNN_CACHE_DIR": os.path.join(root, "cache")}
    for folder in (big, small):
        start = time.time()
        rss = build_cache(folder, env)
        print(f"cache of {folder}: ready in {time.time() - start:.0f}s, peak RSS {rss:,.0f} MB", flush=True)
    runs = {"small": [train(small, os.path.join(root, "w-small"), 1000.0, args, env)], "stream": [], "memory": []}
    for repeat in range(args.repeats):  # alternating, so both see the machine's load alike
        runs["stream"].append(train(big, os.path.join(root, f"w-stream{repeat}"), args.budget, args, env))
        runs["memory"].append(train(big, os.path.join(root, f"w-memory{repeat}"), 1000.0, args, env))
    for name, each in runs.items():
        for run in each:
            print(f"{name:>7}: peak RSS {run['rss_mb']:,.0f} MB, {run['images_per_second']:,.0f} images/s (last "
                  f"epoch), input {run['input_share']:.1%} of epoch time, test accuracy {run['test_accuracy']:.2%}; "
                  f"{run['line']}", flush=True)
    rss_ratio = max(r["rss_mb"] for r in runs["stream"]) / runs["small"][0]["rss_mb"]
    speed = {name: statistics.median(r["images_per_second"] for r in runs[name]) for name in ("stream", "memory")}
    speed_ratio = speed["stream"] / speed["memory"]
    print(f"peak RSS, streamed {args.images:,} / in-memory {args.small:,}: {rss_ratio:.2f}x (target <= 1.15x)")
    print(f"images/s, streamed / in-memory {args.images:,} (medians of {args.repeats}): {speed_ratio:.2f}x "
          "(target >= 0.85x)")
    if args.read_speed:
        cache = os.path.join(root, "cache", "image_folder")
        entry = next(os.path.join(cache, e) for e in sorted(os.listdir(cache)) if e.startswith(os.path.basename(big)))
        for name, rate in read_speed(os.path.join(entry, "train_images.npy")).items():
            print(f"random 64x64x3 rows, {name}: {rate:,.0f} rows/s")


if __name__ == "__main__":
    main()
