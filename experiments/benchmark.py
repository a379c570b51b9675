"""Benchmarks for the performance targets, each against a peer measured in the same run.

    python experiments/benchmark.py throughput --model M  # cnn's train step vs PyTorch's fast paths, same model
    python experiments/benchmark.py backbone             # the same for ResNet-50 and MobileNetV2 at 224x224, batch 32
    python experiments/benchmark.py step_time --model M   # cnn's step: host dispatch against device compute
    python experiments/benchmark.py time_to_accuracy  # configs/mnist.py vs the Flax recipe and PyTorch, process start
    python experiments/benchmark.py targets           # both of the above in one run, each ratio against its target
    python experiments/benchmark.py own_data          # MNIST as 70,000 PNGs in class folders vs the TFDS path
    python experiments/benchmark.py logging           # the training loop with step records vs without

`throughput --model M` trains one of `MODELS` in each of `VARIANTS`, each in
a fresh process one after another: `flax_cnn` (the classic Flax MNIST CNN,
configs/flax_cnn.py, batch 128), `resnet20` (configs/resnet20.py: 32x32x3,
batch 128, SGD with weight decay, crop and flip), `resnet50` and
`mobilenet_v2` (the backbone presets, 224x224x3, batch 32, SGD with
momentum). cnn runs its own compiled step as training runs it by default
(the kernels, host devices and micro-batches `train.kernels='auto'` and the
defaults choose; `--kernels`, `--num_devices` and `--micro_batch_size`
change those) in float32 and bfloat16; PyTorch runs the same architecture
(torchvision's for the backbones, small modules for the others; `pip install
-e '.[bench]'`, or `--torch_python` naming another environment's Python)
eager, channels_last, bf16 autocast, torch.compile, and torch.compile with
bf16 autocast. The bf16 variants run by default only on a CPU with bf16
instructions (AVX512-BF16 or AMX; elsewhere both frameworks emulate bf16).
It prints the CPU, the median block of each and the ratio of cnn's best to
PyTorch's best. `step_time --model M` splits cnn's step into the host's
dispatch and the device's compute (experiments/gpu_check.sh runs it on GPUs).
`time_to_accuracy` runs `python -m cnn.main` as a user would and reads
metrics.jsonl and results.json: when test accuracy first reached 99.0%, the
final accuracy, start-up time, data-loading share and peak memory. The peers
are the Flax example's recipe (configs/flax_cnn.py: constant SGD 0.1,
momentum 0.9, 10 epochs) and, given `--manual_dir`, configs/mnist.py's own
recipe in PyTorch (experiments/torch_mnist.py). MNIST is prepared and
cached before the timed runs, so none of them pays the one-time
preparation; `--rounds` runs each recipe that many times, in alternating
order, and reports the median. `targets` runs both in one go and prints
each ratio against the performance targets (docs/performance.md).
`own_data` exports MNIST as 70,000 PNGs into train/ and test/ class folders,
times their first decode (listing, decoding over every core, writing the
cache) in a fresh process, then, alternating with the cached TFDS set, the
cached `load_dataset` in fresh processes and the start-up of `python -m
cnn.main --config=configs/mnist.py` (process start to the end of the first
step), which on a busy machine varies by seconds. All three need MNIST prepared (`--data_dir`, or
`--manual_dir` pointing at the original archives).

`logging` runs `train_and_evaluate` on configs/flax_cnn.py in one process,
alternating train.log_every_steps=0 (records at epoch ends only) with the
values given, and compares the second epoch's training speed (the loop,
not the compiled step alone, since the loop fetches the sums). All need MNIST
prepared (`--data_dir`, or `--manual_dir` pointing at the original archives).

`--hold_isa avx2` (throughput, backbone, targets, time_to_accuracy) holds
both frameworks to AVX2 on a CPU with more, for the AVX2-only target on any
machine: oneDNN (cnn's and PyTorch's, ONEDNN_MAX_CPU_ISA), XLA's code
(--xla_cpu_max_isa) and ATen's kernels (ATEN_CPU_CAPABILITY); cnn's oneDNN
threads then wait as on an AVX2-only CPU, the bf16 variants stay out, and
the heading says "avx2 (held to it; ...)". It approximates such a CPU, not its caches
or clock: on a Zen 4 it read 1.16x for the Flax CNN, as a real AVX2-only
EPYC had (issue 31).

Every benchmark but the worker also appends what it printed, with the CPU,
its units and the package versions, to docs/benchmarks/<date>-<cpu>.md, a
page of the docs site per machine and day (`--no_record` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The models `throughput` trains: the config training would use (a file in configs/, or a backbone preset over
# the base config), the input shape, the default batch, and steps per timed block and blocks per process (the
# 224x224 backbones take seconds a step on 2 cores).
MODELS = {
    "flax_cnn": {"config": "configs/flax_cnn.py", "input_shape": (28, 28, 1), "num_classes": 10, "batch_size": 128,
                 "steps": 40, "blocks": 7},
    "resnet20": {"config": "configs/resnet20.py", "input_shape": (32, 32, 3), "num_classes": 10, "batch_size": 128,
                 "steps": 8, "blocks": 5},
    "resnet50": {"config": "resnet50", "input_shape": (224, 224, 3), "num_classes": 1000, "batch_size": 32,
                 "steps": 2, "blocks": 3},
    "mobilenet_v2": {"config": "mobilenet_v2", "input_shape": (224, 224, 3), "num_classes": 1000, "batch_size": 32,
                     "steps": 2, "blocks": 3},
}


def model_config(name: str):
    """The config cnn trains `name` with: configs/*.py as a user runs it, or a backbone preset with SGD."""
    from cnn import config as config_lib

    source = MODELS[name]["config"]
    if source.endswith(".py"):
        config = config_lib.load_config(os.path.join(REPO, source))
    else:
        config = config_lib.base_config()
        config.model.layers, config.model.preset = (), source
    config.model.num_classes = MODELS[name]["num_classes"]
    return config


def torch_recipe(name: str) -> dict:
    """What the PyTorch peer needs of cnn's config for `name` (its worker may run in a venv without cnn)."""
    config = model_config(name)
    o, d = config.optimizer, config.data
    return {"model": name, "input_shape": MODELS[name]["input_shape"], "num_classes": MODELS[name]["num_classes"],
            "lr": o.learning_rate, "momentum": o.momentum, "nesterov": o.nesterov, "weight_decay": o.weight_decay,
            "crop_padding": int(d.crop_padding), "flip": bool(d.flip),
            "mean": d.mean and list(d.mean), "std": d.std and list(d.std)}


def jax_trainer(model_name: str, batch_size: int, num_devices: int, compute_dtype: str, micro_batch_size: int = 0,
                kernels: str = "auto"):
    """A closure running `steps` of cnn's real training step for `model_name` (the step train_and_evaluate
    compiles: the config's optimizer, augmentation and normalisation, the kernels and micro-batches it chooses)."""
    from cnn import kernels as kernels_lib, runtime

    runtime.set_cpu_devices(num_devices or kernels_lib.cpu_devices(kernels, compute_dtype))  # as training does
    import jax

    from cnn import data as data_lib, models, sharding, train

    config = model_config(model_name)
    config.train.compute_dtype, config.train.kernels = compute_dtype, kernels
    spec = MODELS[model_name]
    mesh = sharding.make_mesh(num_devices)
    platform = mesh.devices.flat[0].platform
    model = models.build_model(config.model)
    tx = train.make_optimizer(config.optimizer, 100, config.train.num_epochs)
    state = train.create_state(model, tx, spec["input_shape"], 0, kernels, platform)
    replicated, chunk_sharding = sharding.replicated(mesh), sharding.chunk_sharding(mesh)
    micro_batch_size = micro_batch_size or sharding.micro_batch_size(  # as cnn/train/setup.py chooses it
        batch_size, mesh, kernels_lib.whole_batch(kernels, compute_dtype, platform))
    sharding.check_batch("--micro_batch_size", micro_batch_size, mesh)
    recipe = train.Recipe.from_config(config, "softmax_cross_entropy")
    step = train.compile_train_step(mesh, batch_size // micro_batch_size, recipe)
    rng = np.random.default_rng(0)
    count = max(4 * batch_size, 256)
    images = rng.integers(0, 256, (count, *spec["input_shape"]), dtype=np.uint8)
    split = data_lib.Split(images, rng.integers(0, spec["num_classes"], count).astype(np.int32))
    carry = {"state": jax.device_put(state, replicated),
             "sums": jax.device_put(train.EpochSums.zeros(), replicated)}

    def run(steps: int, wait_each: bool = False) -> float:
        """As in train_and_evaluate: the block's batches staged on the devices, then one dispatch per step; returns
        the seconds the host took to dispatch the steps (with `wait_each`, waiting for each one too)."""
        rows = rng.integers(0, len(split), (steps, batch_size))
        chunk = jax.block_until_ready(data_lib.stage_chunk(split, rows, steps, chunk_sharding))
        start = sharding.put_replicated(np.int32(carry["state"].step), mesh)
        began = time.perf_counter()
        for _ in range(steps):
            carry["state"], carry["sums"], loss = step(carry["state"], carry["sums"], chunk, start)
            if wait_each:
                jax.block_until_ready(loss)
        dispatched = time.perf_counter() - began
        jax.block_until_ready(loss)
        return dispatched

    onednn = " through oneDNN" if kernels_lib.onednn_in_force(kernels, compute_dtype, platform) else ""
    device = f"{mesh.size} x {jax.devices()[0].device_kind}{onednn}, kernels={kernels}" + (
        f", {batch_size // micro_batch_size} parts of {micro_batch_size}" if micro_batch_size < batch_size else "")
    return run, device


def torch_model(name: str, num_classes: int):
    """The PyTorch peer of cnn's model `name`: torchvision's backbones, small modules for the others."""
    import torch.nn.functional as F
    from torch import nn

    class FlaxCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
            self.dense1, self.dense2 = nn.Linear(64 * 7 * 7, 256), nn.Linear(256, num_classes)

        def forward(self, x):
            x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
            x = F.avg_pool2d(F.relu(self.conv2(x)), 2)
            return self.dense2(F.relu(self.dense1(x.flatten(1))))

    class Block(nn.Module):  # cnn.models.layers.ResidualBlock with shortcut='pad' (option A)
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn1, self.bn2, self.stride, self.extra = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout), stride, cout - cin

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.extra:
                shortcut = F.pad(shortcut, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + shortcut)

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            blocks, cin = [], 16
            for stage, width in enumerate((16, 32, 64)):
                for block in range(3):
                    blocks.append(Block(cin, width, 2 if stage and not block else 1))
                    cin = width
            self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(64, num_classes)

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    if name in ("resnet50", "mobilenet_v2"):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes)
    return {"flax_cnn": FlaxCNN, "resnet20": ResNet20}[name]()


def torch_trainer(recipe: dict, batch_size: int, device: str, channels_last: bool = False, bf16: bool = False,
                  compile: bool = False):
    """cnn's model, batch, optimizer and augmentation (`recipe`, from `torch_recipe`) in PyTorch, with one of its
    fast paths (`pip install torch torchvision`, or `--torch_python` naming another environment's Python)."""
    import torch
    import torch.nn.functional as F

    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = torch_model(recipe["model"], recipe["num_classes"]).to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                nesterov=recipe["nesterov"], weight_decay=recipe["weight_decay"])
    forward = torch.compile(model) if compile else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    rng = np.random.default_rng(0)
    height, width, channels = recipe["input_shape"]
    images = torch.tensor(rng.integers(0, 256, (4, batch_size, channels, height, width), dtype=np.uint8))
    labels = torch.tensor(rng.integers(0, recipe["num_classes"], (4, batch_size)))
    mean = torch.tensor(recipe["mean"] or [0.0], device=device).view(1, -1, 1, 1)
    std = torch.tensor(recipe["std"] or [1.0], device=device).view(1, -1, 1, 1)

    def inputs(batch):  # uint8 from the host; crop, flip and scaling on the device, as cnn's step does them
        x = batch.to(device)
        n, p = x.shape[0], recipe["crop_padding"]
        if p:
            x = F.pad(x, (p, p, p, p))
            dy, dx = (torch.randint(0, 2 * p + 1, (n, 1), device=device) for _ in range(2))
            rows = (dy + torch.arange(height, device=device))[:, None, :, None]
            cols = (dx + torch.arange(width, device=device))[:, None, None, :]
            x = x[torch.arange(n, device=device)[:, None, None, None], torch.arange(channels, device=device)[
                None, :, None, None], rows, cols]
        if recipe["flip"]:
            x = torch.where(torch.rand(n, 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        return ((x.float() / 255.0 - mean) / std).contiguous(memory_format=layout)

    def run(steps: int) -> None:
        for i in range(steps):
            x, y = inputs(images[i % 4]), labels[i % 4].to(device)
            optimizer.zero_grad()
            with autocast:
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
        loss.item()

    return run, f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads"


# --hold_isa: the environment that holds oneDNN, XLA's code generation and ATen's kernels to an instruction set.
HOLD_ISA = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}}


def hold_isa(isa: str) -> None:
    """Holds this process and every process it starts to `isa` (HOLD_ISA), XLA's own flags kept."""
    held = dict(HOLD_ISA[isa])
    held["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), held["XLA_FLAGS"])))
    os.environ.update(held)


def held_isa() -> str:
    """The instruction set --hold_isa holds this run to ('' when none)."""
    return next((isa for isa, env in HOLD_ISA.items() if os.environ.get("ONEDNN_MAX_CPU_ISA") ==
                 env["ONEDNN_MAX_CPU_ISA"] and env["XLA_FLAGS"] in os.environ.get("XLA_FLAGS", "")), "")


# Every run `throughput` compares, each in its own process: (trainer, its options).
VARIANTS = {
    "cnn float32": ("cnn", {"compute_dtype": "float32"}),
    "cnn bfloat16": ("cnn", {"compute_dtype": "bfloat16"}),
    "torch eager float32": ("torch", {}),
    "torch channels_last": ("torch", {"channels_last": True}),
    "torch bf16 autocast": ("torch", {"bf16": True}),
    "torch.compile": ("torch", {"compile": True}),
    "torch.compile + bf16": ("torch", {"compile": True, "bf16": True}),
    "torch.compile + bf16, channels_last": ("torch", {"compile": True, "bf16": True, "channels_last": True}),
}


def has_bf16_units() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16); without them both frameworks emulate bf16,
    slowly, so `throughput` leaves the bf16 variants out by default."""
    return not held_isa() and bool(set(cpu_info()["units"].split()) & {"avx512_bf16", "amx_bf16"})


def default_variants() -> list[str]:
    return [name for name in VARIANTS if has_bf16_units() or not ("bf16" in name or "bfloat16" in name)]


def throughput_worker(args) -> None:
    """One variant in this process: a warm-up block (compilation), then timed blocks; prints one JSON line."""
    kind, options = VARIANTS[args.variant]
    if kind == "cnn":
        run, device = jax_trainer(args.model, args.batch_size, args.num_devices, options["compute_dtype"],
                                  args.micro_batch_size, args.kernels)
    else:
        import torch

        run, device = torch_trainer(json.loads(args.recipe), args.batch_size,
                                    "cuda" if torch.cuda.is_available() else "cpu", **options)
    start = time.perf_counter()
    run(args.steps)
    first = time.perf_counter() - start
    rates = []
    for _ in range(args.blocks):
        start = time.perf_counter()
        run(args.steps)
        rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    print(json.dumps({"device": device, "blocks": rates, "first_block": first}))


def step_time(args) -> None:
    """cnn's step split into host dispatch and device compute: the seconds the host takes to dispatch a block of
    steps (the device runs them asynchronously), the block's seconds until its last step is done, and a step's
    seconds when the host waits for each one. Dispatch near the total means the host is the bottleneck (a small
    model on a GPU); on a CPU the two overlap on the same cores."""
    for dtype in args.dtypes:
        run, device = jax_trainer(args.model, args.batch_size, args.num_devices, dtype, args.micro_batch_size,
                                  args.kernels)
        run(args.steps)  # compiles
        dispatch, total, waited = [], [], []
        for _ in range(args.blocks):
            start = time.perf_counter()
            dispatch.append(run(args.steps) / args.steps)
            total.append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            run(args.steps, wait_each=True)
            waited.append((time.perf_counter() - start) / args.steps)
        median = lambda xs: statistics.median(xs) * 1e3
        print(f"{args.model} {dtype}, batch {args.batch_size} ({device}): a step {median(total):.2f} ms in a block "
              f"({args.batch_size / statistics.median(total):,.0f} images/s), of which the host dispatching "
              f"{median(dispatch):.2f} ms; {median(waited):.2f} ms waiting for each step")


def worker_command(args, name: str) -> list[str]:
    """The command running variant `name` in a fresh process: PyTorch's with `--torch_python`."""
    torch = VARIANTS[name][0] == "torch"
    extra = [f"--recipe={json.dumps(torch_recipe(args.model))}"] if torch else []
    return [args.torch_python if torch else sys.executable, os.path.abspath(__file__), "throughput_worker",
            f"--variant={name}", f"--model={args.model}", f"--batch_size={args.batch_size}",
            f"--num_devices={args.num_devices}", f"--micro_batch_size={args.micro_batch_size}",
            f"--kernels={args.kernels}", f"--steps={args.steps}", f"--blocks={args.blocks}", *extra]


def throughput(args) -> float | None:
    """Each variant in a fresh process, one after another, `--rounds` times; the median block of each."""
    from cnn import runtime

    variants = args.variants or default_variants()
    # Both frameworks' workers start as `python -m cnn.main` restarts itself: large freed blocks kept for the next
    # request, in glibc's huge pages (runtime.allocator_environment), where that changes anything.
    environ = runtime.allocator_environment()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    devices, firsts, failed = {}, {}, {}
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else variants[::-1]:  # no variant always runs first
            out = subprocess.run(worker_command(args, name), cwd=REPO, capture_output=True, text=True,
                                 env=environ)
            if out.returncode != 0:  # e.g. torch.compile failing on a model: the others still run and compare
                failed[name] = (out.stderr.strip().splitlines() or ["no output"])[-1][:160]
                print(f"  {name:<36} failed: {failed[name]}", file=sys.stderr, flush=True)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            devices[name], firsts[name] = result["device"], result["first_block"]
            rates[name] += result["blocks"]
            print(f"  {name:<36} {statistics.median(result['blocks']):9,.1f} images/s", file=sys.stderr, flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items() if r}
    print(f"{args.model}, batch {args.batch_size}, as {MODELS[args.model]['config']} trains it; each run in its own "
          f"process, median of {args.rounds} x {args.blocks} blocks of {args.steps} steps; {cpu_model()}")
    for name in variants:
        if name not in medians:
            print(f"  {name:<36}    failed   ({failed[name]})")
            continue
        print(f"  {name:<36} {medians[name]:9,.1f} images/s   ({devices[name]}; blocks {min(rates[name]):,.1f}-"
              f"{max(rates[name]):,.1f}; first block, compiling, {firsts[name]:.1f}s)")
    ours = {n: r for n, r in medians.items() if VARIANTS[n][0] == "cnn"}
    peers = {n: r for n, r in medians.items() if VARIANTS[n][0] == "torch"}
    if ours and peers:
        best, peer = max(ours, key=ours.get), max(peers, key=peers.get)
        print(f"  ratio cnn's best / PyTorch's best: {ours[best] / peers[peer]:.2f}x ({best} against {peer})")
        return ours[best] / peers[peer]
    return None


def cpu_info() -> dict[str, str]:
    """The CPU's name, the cores this process may use, and the vector and matrix units its flags report, which
    decide which paths are fast; under --hold_isa, the units it is held to."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "CPU unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    if held_isa():
        return {"name": name, "cores": str(cores), "units": f"{held_isa()} (held to it; the CPU has {' '.join(units)})"}
    return {"name": name, "cores": str(cores), "units": " ".join(units) or "no AVX2"}


def cpu_model() -> str:
    """One line for the benchmarks' headings: the CPU, its cores and units."""
    cpu = cpu_info()
    return f"{cpu['name']}, {cpu['cores']} cores, {cpu['units']}"


RECORD_DIR = os.path.join(REPO, "docs", "benchmarks")
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


class _Tee(io.TextIOBase):
    """Writes to the console and keeps a copy, so a benchmark's printed figures can be recorded as they print."""

    def __init__(self, console):
        self.console, self.copy = console, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.console.flush()


def _public(text: str) -> str:
    """`text` without this machine's paths: the checkout, the temporary folder and the home folder."""
    for path, name in ((REPO, "."), (tempfile.gettempdir(), "$TMPDIR"), (os.path.expanduser("~"), "~")):
        text = text.replace(path, name)
    return text


def _public_command(argv: list[str]) -> str:
    """The command as run, each path given to a flag written DIR (paths differ per machine, figures do not)."""
    words = [re.sub(r"^(--[\w-]+=).*/.*$", r"\1DIR", a) if a.startswith("--") else ("DIR" if "/" in a and i else a)
             for i, a in enumerate(argv)]
    return "python experiments/" + " ".join([os.path.basename(argv[0]), *words[1:]])


def _versions() -> str:
    from importlib import metadata

    found = [f"Python {sys.version.split()[0]}"]
    for package in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{package} {metadata.version(package)}")
    return ", ".join(found)


def _accelerator() -> str:
    """The GPU's name as nvidia-smi reports it, or 'none' (the benchmarks' peers then run on the CPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "none"
    return ", ".join(line.strip() for line in out.splitlines() if line.strip()) or "none"


def write_record(output: str, argv: list[str], folder: str | None = None, now: time.struct_time | None = None) -> str:
    """Appends one run's printed figures to FOLDER/<date>-<cpu>.md, a page per machine and day of the docs site
    (docs/performance.md links them), and relists the pages in FOLDER/index.md; returns the page's path."""
    folder, now = folder or RECORD_DIR, now or time.localtime()
    cpu, date = cpu_info(), time.strftime("%Y-%m-%d", now)
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(\w+\)|cpu|processor|@.*", "", cpu["name"].lower())).strip("-")
    path = os.path.join(folder, f"{date}-{slug or 'cpu'}.md")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(f"# {date}: {cpu['name']}\n\nWritten by the benchmarks in `experiments/` as they ran; each "
                    f"section is one run, as measured then.\n\n| machine | |\n|---|---|\n| CPU | {cpu['name']} |\n"
                    f"| cores | {cpu['cores']} |\n| flags | {cpu['units']} |\n| accelerator | {_accelerator()} |\n")
    with open(path, "a") as f:
        f.write(f"\n## {time.strftime('%H:%M', now)}: `{_public_command(argv)}`\n\n{_versions()}\n\n"
                f"```text\n{_public(output).strip()}\n```\n")
    pages = sorted((p for p in os.listdir(folder) if p.endswith(".md") and p != "index.md"), reverse=True)
    with open(os.path.join(folder, "index.md"), "w") as f:
        f.write("# Benchmark records\n\nOne page per machine and day, newest first, each written by "
                "`experiments/benchmark.py` (or `experiments/streaming.py`) as it ran.\n\n"
                + "".join(f"- [{p[:-3]}]({p})\n" for p in pages))
    return path


@contextlib.contextmanager
def recording(enabled: bool = True):
    """Prints as usual and, when the benchmark finishes, records what it printed (`--no_record` skips it)."""
    if not enabled:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    print(f"recorded in {os.path.relpath(write_record(tee.copy.getvalue(), sys.argv), REPO)}", file=sys.stderr)


def run_child(command: list[str]) -> tuple[str, float, float]:
    """Runs `command` from the repository; returns its stdout, wall seconds and its own peak memory in MB."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.time()
        child = subprocess.Popen(command, cwd=REPO, stdout=out)
        _, status, usage = os.wait4(child.pid, 0)  # this child's rusage alone, not the largest child so far
        wall = time.time() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise subprocess.CalledProcessError(child.returncode, command)
        out.seek(0)
        return out.read(), wall, usage.ru_maxrss / 1024


def run_main(config: str, workdir: str, overrides: list[str]) -> dict:
    """Runs `python -m cnn.main` in a fresh process; returns its figures."""
    command = [sys.executable, "-m", "cnn.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    _, wall, peak_mb = run_child(command)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    reached = next((r for r in history if r["test_accuracy"] >= 0.99), None)
    return {
        "wall": wall, "final": results["test_accuracy"], "epochs": results["epochs"],
        "reached_at": reached and reached["elapsed_seconds"], "reached_epoch": reached and reached["epoch"],
        "startup": results["startup_seconds"], "epoch1": history[0]["test_accuracy"],
        "input_share": sum(r["input_seconds"] for r in history) / results["train_seconds"],
        "peak_mb": peak_mb, "images_per_second": statistics.median(
            r["images_per_second"] for r in history),
    }


def run_torch_mnist(manual_dir: str, variant: str) -> dict:
    """experiments/torch_mnist.py (configs/mnist.py's recipe in PyTorch) in a fresh process; returns its figures."""
    command = [sys.executable, os.path.join(REPO, "experiments", "torch_mnist.py"), f"--manual_dir={manual_dir}",
               f"--variant={variant}"]
    out, wall, peak_mb = run_child(command)
    history = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    reached = next((r for r in history if r["test_accuracy"] >= 0.99), None)
    return {"wall": wall, "final": history[-1]["test_accuracy"], "epochs": len(history),
            "reached_at": reached and reached["elapsed_seconds"], "reached_epoch": reached and reached["epoch"],
            "epoch1": history[0]["test_accuracy"], "peak_mb": peak_mb}


def time_to_accuracy(args) -> tuple[float | None, float, float]:
    """configs/mnist.py against the Flax example's recipe (and PyTorch's): seconds from process start to 99.0% test
    accuracy. Returns the ratio to the Flax recipe, configs/mnist.py's final accuracy and its start-up seconds."""
    data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
    data += [f"--config.data.manual_dir={args.manual_dir}"] if args.manual_dir else []
    recipes = {"configs/mnist.py": "configs/mnist.py"}
    if not args.skip_peer:
        recipes["Flax example recipe"] = "configs/flax_cnn.py"
    prepared = load_seconds(data)  # TFDS's one-time preparation and cnn's cache: neither recipe's run pays them
    runners = {name: functools.partial(run_main, config, overrides=data) for name, config in recipes.items()}
    if args.manual_dir and args.torch_variant != "none":  # its script writes no workdir
        runners[f"PyTorch ({args.torch_variant})"] = lambda _: run_torch_mnist(args.manual_dir, args.torch_variant)
    runs = {name: [] for name in runners}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternating order, so no recipe always runs first
            for i, name in enumerate(list(runners) if round_ % 2 == 0 else list(runners)[::-1]):
                runs[name].append(runners[name](os.path.join(tmp, f"{round_}-{i}")))
    # Each recipe's run with the median time to 99.0% (never reaching it counts as slowest).
    rows = {name: sorted(rs, key=lambda r: r["reached_at"] or float("inf"))[(len(rs) - 1) // 2]
            for name, rs in runs.items()}
    times = lambda rs: ", ".join(f"{r['reached_at']:.1f}" if r["reached_at"] else "never" for r in rs)
    print(f"MNIST, from process start; {cpu_model()}; data prepared and cached beforehand ({prepared:.1f}s); "
          f"median of {args.rounds} run(s) each" + ("; times to 99.0%: " + "; ".join(
              f"{name} {times(rs)}" for name, rs in runs.items()) if args.rounds > 1 else ""))
    for name, r in rows.items():
        reached = (f"99.0% at {r['reached_at']:.1f}s (epoch {r['reached_epoch']})" if r["reached_at"]
                   else "never reached 99.0%")
        extra = (f"; start-up {r['startup']:.1f}s; data loading {r['input_share']:.1%} of training; "
                 f"{r['images_per_second']:,.0f} img/s" if "startup" in r else "")
        print(f"{name:>22}: {reached}; epoch 1 {r['epoch1']:.2%}; final {r['final']:.2%} after {r['epochs']} epochs "
              f"({r['wall']:.0f}s){extra}; peak memory {r['peak_mb']:,.0f} MB")
    ours = rows["configs/mnist.py"]["reached_at"]
    ratios = {}
    for name, r in rows.items():
        if name != "configs/mnist.py" and ours and r["reached_at"]:
            ratios[name] = ratio = r["reached_at"] / ours
            print(f"time to 99.0%: configs/mnist.py " + (f"{ratio:.2f}x sooner than {name}" if ratio >= 1
                                                          else f"{1 / ratio:.2f}x later than {name}"))
    mine = rows["configs/mnist.py"]
    return ratios.get("Flax example recipe"), mine["final"], mine.get("startup", float("nan"))


TARGET_MODELS = ("flax_cnn", "resnet20")  # issue 31: cnn's best >= 1.25x PyTorch's best on each


def targets(args) -> None:
    """Issue 31's targets from one run: `throughput` for each of TARGET_MODELS (each at its own batch size), then
    `time_to_accuracy` with configs/mnist.py's start-up, each against its target."""
    speeds = {name: throughput(with_model_defaults(argparse.Namespace(
        **{**vars(args), "model": name, "batch_size": 0, "steps": 0, "blocks": 0}))) for name in TARGET_MODELS}
    sooner, final, startup = time_to_accuracy(args)
    met = lambda ok: "met" if ok else "NOT met"
    print(f"targets on {cpu_model()}, {time.strftime('%Y-%m-%d')}:")
    for name, speed in speeds.items():
        print(f"  throughput, {name}, cnn's best / PyTorch's best: {speed or 0:.2f}x (target >= 1.25x: "
              f"{met(speed and speed >= 1.25)})")
    print(f"  time to 99.0%, Flax example recipe / configs/mnist.py: {sooner or 0:.2f}x (target >= 10x: "
          f"{met(sooner and sooner >= 10)}); configs/mnist.py final {final:.2%} (target >= 99.4%: {met(final >= 0.994)})")
    print(f"  configs/mnist.py start-up (process start to the end of its first step): {startup:.2f}s "
          f"(target <= 2s with the compilation cache warm: {met(startup <= 2)})")


def export_mnist(data_args: list[str], root: str) -> int:
    """MNIST's train and test splits as PNGs in ROOT/{train,test}/<digit>/<index>.png; the TFDS cache is warmed."""
    from PIL import Image

    code = ("import sys, numpy as np, cnn; c = cnn.load_config('configs/mnist.py')\n"
            "for a in sys.argv[2:]:\n    k, v = a.split('=', 1); c.data[k.split('.')[-1]] = v\n"
            "d = cnn.load_dataset(c.data)\n"
            "np.savez(sys.argv[1], xtr=d.train.images, ytr=d.train.labels, xte=d.test.images, yte=d.test.labels)")
    arrays = os.path.join(root, "mnist.npz")
    subprocess.run([sys.executable, "-c", code, arrays, *(a[len("--config."):] for a in data_args)], check=True,
                   cwd=REPO, stderr=subprocess.DEVNULL)
    count = 0
    with np.load(arrays) as f:
        for split, x, y in (("train", f["xtr"], f["ytr"]), ("test", f["xte"], f["yte"])):
            for digit in range(10):
                os.makedirs(os.path.join(root, split, str(digit)))
            for i, (image, label) in enumerate(zip(x, y)):
                Image.fromarray(image[..., 0]).save(os.path.join(root, split, str(label), f"{i:05d}.png"))
            count += len(x)
    return count


def load_seconds(overrides: list[str]) -> float:
    """Seconds `cnn.load_dataset` takes for configs/mnist.py with `overrides`, in a fresh process (imports not
    counted)."""
    code = ("import sys, time, cnn; c = cnn.load_config('configs/mnist.py')\n"
            "for a in sys.argv[1:]:\n    k, v = a[len('--config.data.'):].split('=', 1); c.data[k] = v\n"
            "t = time.time(); cnn.load_dataset(c.data); print(time.time() - t)")
    out = subprocess.run([sys.executable, "-c", code, *overrides], check=True, cwd=REPO, capture_output=True,
                         text=True)
    return float(out.stdout.split()[-1])


def own_data(args) -> None:
    data = [f"--config.data.data_dir={args.data_dir}"] if args.data_dir else []
    data += [f"--config.data.manual_dir={args.manual_dir}"] if args.manual_dir else []
    loads, starts = {"folders": [], "tfds": []}, {"folders": [], "tfds": []}
    with tempfile.TemporaryDirectory() as tmp:
        count = export_mnist(data, tmp)
        folders = ["--config.data.name=image_folder", f"--config.data.path={os.path.join(tmp, 'train')}",
                   f"--config.data.test_path={os.path.join(tmp, 'test')}",
                   f"--config.data.cache_dir={os.path.join(tmp, 'cache')}"]
        decode = load_seconds(folders)  # the cache is empty: list, decode over every core, write the cache
        paths = (("folders", folders), ("tfds", data))
        for i in range(args.repeats):  # alternating, so both see the same machine state
            for name, overrides in paths:
                loads[name].append(load_seconds(overrides))
            for name, overrides in paths:
                starts[name].append(run_main("configs/mnist.py", os.path.join(tmp, f"{name}{i}"),
                                             overrides + ["--config.train.num_epochs=1"])["startup"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"first decode of {count:,} PNGs (28x28 grey) on {cores} cores: {decode:.1f}s "
          f"({count / decode:,.0f} images/s); target at most 20 s on 2 cores")
    for what, runs in (("cached load_dataset", loads), ("cached start-up to the first step", starts)):
        folder, tfds = statistics.median(runs["folders"]), statistics.median(runs["tfds"])
        print(f"{what} (median of {args.repeats}): folders {folder:.2f}s, TFDS {tfds:.2f}s: {folder - tfds:+.2f}s "
              f"({folder / tfds:.2f}x); target at most +2 s (runs: folders "
              f"{', '.join(f'{s:.2f}' for s in runs['folders'])}; TFDS {', '.join(f'{s:.2f}' for s in runs['tfds'])})")


def step_logging(args) -> None:
    import cnn

    config = cnn.load_config(os.path.join(REPO, "configs", "flax_cnn.py"))
    config.data.data_dir, config.data.manual_dir = args.data_dir, args.manual_dir
    config.data.train_split, config.data.test_split, config.train.num_epochs = args.train_split, args.test_split, 2
    dataset = cnn.load_dataset(config.data)
    settings = [0, *args.log_every_steps]
    rates = {n: [] for n in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds + 1):  # round 0 compiles (and fills the compilation cache)
            for n in settings if round_ % 2 else settings[::-1]:  # no setting always runs first
                config.train.log_every_steps = n
                with contextlib.redirect_stdout(io.StringIO()):  # each run's summary and epoch lines
                    run = cnn.train_and_evaluate(config, os.path.join(tmp, f"{round_}-{n}"), dataset)
                if round_:
                    rates[n].append(run.history[-1]["images_per_second"])  # epoch 2: no compilation in it
    steps = len(dataset.train) // config.train.batch_size
    print(f"configs/flax_cnn.py on {config.data.train_split}: {steps} steps an epoch, epoch 2 of each run, "
          f"{args.rounds} rounds")
    for n in settings:
        print(f"  log_every_steps={n:<3} {statistics.median(rates[n]):8,.0f} images/s   "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates[n])})")
    for n in args.log_every_steps:  # each run against the log_every_steps=0 run just before it, same machine state
        paired = statistics.median(r / base for r, base in zip(rates[n], rates[0]))
        print(f"  ratio log_every_steps={n} / 0: {paired:.3f}x (median of paired runs)")


BACKBONE_MODELS = ("resnet50", "mobilenet_v2")


def with_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the batch size, steps and blocks left at 0 set to the model's own (MODELS)."""
    for field in ("batch_size", "steps", "blocks"):
        setattr(args, field, getattr(args, field) or MODELS[args.model][field])
    return args


def backbone(args: argparse.Namespace) -> None:
    """The `backbone` benchmark: `throughput` for each ImageNet backbone in turn (training images/s at 224x224,
    batch 32), cnn against PyTorch's torchvision model, each with its ratio."""
    for name in BACKBONE_MODELS:
        throughput(with_model_defaults(argparse.Namespace(**{**vars(args), "model": name})))
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    both = sub.add_parser("targets", help="throughput and time_to_accuracy in one run, each ratio against its target")
    backbones = sub.add_parser("backbone", help="throughput of the ImageNet backbones at 224x224 (BACKBONE_MODELS), "
                               "each against PyTorch's best, in one run")
    for t in (sub.add_parser("throughput"), sub.add_parser("throughput_worker"), sub.add_parser("step_time"), both,
              backbones):
        t.add_argument("--model", choices=list(MODELS), default="flax_cnn",
                       help="the model trained, cnn's and PyTorch's (MODELS); flax_cnn is the Flax MNIST CNN")
        t.add_argument("--batch_size", type=int, default=0, help="0: the model's own (MODELS)")
        t.add_argument("--num_devices", type=int, default=0,
                       help="cnn's train.num_devices: 0 as training does (on a CPU one host device, or one per two "
                            "cores where oneDNN's paths are off)")
        t.add_argument("--micro_batch_size", type=int, default=0,
                       help="cnn's train.micro_batch_size: 0 as training does by default; the batch size for one "
                       "call per step")
        t.add_argument("--kernels", default="auto", choices=["auto", "onednn", "xla"],
                       help="cnn's train.kernels: 'auto' as training does by default")
        t.add_argument("--steps", type=int, default=0, help="steps per timed block; 0: the model's own (MODELS)")
        t.add_argument("--blocks", type=int, default=0, help="timed blocks per process; 0: the model's own")
        t.add_argument("--torch_python", default=sys.executable,
                       help="the Python that runs the PyTorch variants (an environment with torch and torchvision, "
                       "kept apart from cnn's); by default this one")
    sub.choices["throughput_worker"].add_argument("--variant", choices=list(VARIANTS), required=True)
    sub.choices["throughput_worker"].add_argument("--recipe", help="torch_recipe's JSON, for a PyTorch variant")
    both.add_argument("--rounds", type=int, default=1, help="processes per throughput variant, and runs per recipe")
    for t in (sub.choices["throughput"], backbones):
        t.add_argument("--rounds", type=int, default=1, help="processes per variant")
    sub.choices["step_time"].add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                                          help="cnn's train.compute_dtype, each in turn")
    a = sub.add_parser("time_to_accuracy")
    a.add_argument("--rounds", type=int, default=1, help="runs of each recipe, in alternating order; the median")
    for t in (sub.choices["throughput"], both, backbones):
        t.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                       help=f"which runs, of: {', '.join(VARIANTS)}; by default all, less the bf16 ones on a CPU "
                       "without bf16 instructions")
    for t in (sub.choices["throughput"], both, backbones, a):
        t.add_argument("--hold_isa", choices=list(HOLD_ISA),
                       help="hold both frameworks to this instruction set, as on a CPU with no more (module doc)")
    for t in (a, both):
        t.add_argument("--data_dir", help="where MNIST is prepared (TFDS data_dir)")
        t.add_argument("--manual_dir", help="MNIST's original archives, to prepare it offline")
        t.add_argument("--skip_peer", action="store_true",
                       help="skip the Flax example recipe (about 4 minutes on 2 cores)")
        t.add_argument("--torch_variant", default="bf16", choices=["fp32", "bf16", "compile", "compile_bf16", "none"],
                       help="the PyTorch peer (experiments/torch_mnist.py; needs --manual_dir): bf16 autocast, "
                       "eager, was its fastest to 99%% here; 'none' skips it")
    o = sub.add_parser("own_data")
    o.add_argument("--data_dir", help="where MNIST is prepared (TFDS data_dir)")
    o.add_argument("--manual_dir", help="MNIST's original archives, to prepare it offline")
    o.add_argument("--repeats", type=int, default=3, help="loads and start-ups of each path")
    g = sub.add_parser("logging")
    g.add_argument("--data_dir", help="where MNIST is prepared (TFDS data_dir)")
    g.add_argument("--manual_dir", help="MNIST's original archives, to prepare it offline")
    g.add_argument("--train_split", default="train[:25%]")
    g.add_argument("--test_split", default="test[:10%]", help="evaluated after each epoch, outside the timing")
    g.add_argument("--log_every_steps", type=int, nargs="+", default=[50, 1], help="compared with 0")
    g.add_argument("--rounds", type=int, default=8)
    for name, t in sub.choices.items():
        if name != "throughput_worker":  # a worker's output is one JSON line for its parent
            t.add_argument("--no_record", action="store_true",
                           help="print only; by default what is printed is also appended to "
                           "docs/benchmarks/<date>-<cpu>.md when the benchmark finishes")
    args = parser.parse_args()
    if args.benchmark in ("throughput", "throughput_worker", "step_time", "targets"):
        with_model_defaults(args)
        if args.micro_batch_size < 0 or (args.micro_batch_size and args.batch_size % args.micro_batch_size):
            parser.error(f"--micro_batch_size={args.micro_batch_size}: use 0 or a divisor of --batch_size")
    if args.benchmark == "throughput_worker":  # in --torch_python's environment cnn may not be importable
        return throughput_worker(args)
    if getattr(args, "hold_isa", None):
        hold_isa(args.hold_isa)
    from cnn.config import ConfigError

    try:
        with recording(not getattr(args, "no_record", True)):
            {"throughput": throughput, "throughput_worker": throughput_worker, "time_to_accuracy": time_to_accuracy,
             "targets": targets, "own_data": own_data, "logging": step_logging,
             "step_time": step_time, "backbone": backbone}[args.benchmark](args)
    except ConfigError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
