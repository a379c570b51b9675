"""configs/mnist.py's recipe in PyTorch: the time-to-accuracy peer in experiments/benchmark.py.

    python experiments/torch_mnist.py --manual_dir=../shared/datasets/mnist [--variant=bf16]

The same model (conv 16, conv 32 with batch norm, average pooling, dense
128), Adam at 1e-2 on a warmup-cosine schedule restarted after epoch 1, 6
epochs, batch 128, a one-pixel random shift, reading MNIST from its original
archives. Initialisers and batch-norm settings are set to Flax/Keras's
(LeCun normal kernels, zero biases, epsilon 1e-3, momentum 0.9), so the two
differ in framework only. After every epoch it evaluates the test set and
prints one JSON line with the accuracy and the seconds since the process
started, the figure benchmark.py compares.

`--variant`: 'fp32' (eager float32), 'bf16' (eager with bfloat16 autocast,
the faster one on CPUs with AVX512-BF16 or AMX), 'compile' or
'compile_bf16' (torch.compile, whose compilation counts in the time, as it
would for a user).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import os
import time

import numpy as np

START = time.time()


def process_start() -> float:
    """When this process started, so the time includes imports as cnn's own figure does."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            return time.time() - float(f.read().split()[0]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return START


def read_idx(path: str) -> np.ndarray:
    """An IDX archive (MNIST's own format) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(manual_dir: str) -> tuple[np.ndarray, ...]:
    files = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    return tuple(read_idx(os.path.join(manual_dir, f)) for f in files)


def build_model():
    import torch
    from torch import nn

    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1),
                nn.ReLU(), nn.AvgPool2d(2)]

    model = nn.Sequential(*conv(1, 16), *conv(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    for m in model.modules():  # Flax's defaults: LeCun normal (truncated) kernels, zero biases
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.trunc_normal_(m.weight, std=math.sqrt(1 / fan_in) / 0.8796, a=-2 * math.sqrt(1 / fan_in) / 0.8796,
                                  b=2 * math.sqrt(1 / fan_in) / 0.8796)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model.to(memory_format=torch.channels_last)


def schedule(step: int, steps_per_epoch: int, epochs: int, peak: float = 1e-2, warmup_epochs: float = 0.2,
             restarts: tuple[int, ...] = (1,)) -> float:
    """configs/mnist.py's rate: a warmup-cosine cycle per span between restarts (optax.sgdr_schedule)."""
    bounds = [round(e * steps_per_epoch) for e in (0, *restarts, epochs)]
    for begin, end in zip(bounds, bounds[1:]):
        if step < end or end == bounds[-1]:
            t, length = step - begin, end - begin
            warmup = min(int(warmup_epochs * steps_per_epoch), length - 1)
            if t < warmup:
                return peak * t / warmup
            return peak * 0.5 * (1 + math.cos(math.pi * min(t - warmup, length - warmup) / (length - warmup)))
    return 0.0


def shift(x, generator):
    """A one-pixel random shift per image: pad by one with zeros, crop back at a random offset."""
    import torch

    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (torch.arange(28)[None, :] + dy[:, None])[:, None, :, None].expand(n, 1, 28, 30)
    padded = padded.gather(2, rows)
    cols = (torch.arange(28)[None, :] + dx[:, None])[:, None, None, :].expand(n, 1, 28, 28)
    return padded.gather(3, cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual_dir", required=True, help="MNIST's four original .gz archives")
    parser.add_argument("--variant", default="bf16", choices=["fp32", "bf16", "compile", "compile_bf16"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    started = process_start()
    xtr, ytr, xte, yte = (torch.from_numpy(a.copy()) for a in load(args.manual_dir))
    xtr, xte = xtr[:, None], xte[:, None]  # N, 1, 28, 28 uint8
    model = build_model()
    step_fn = model if "compile" not in args.variant else torch.compile(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    bf16 = args.variant.endswith("bf16")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    generator = torch.Generator().manual_seed(0)
    steps_per_epoch, step = len(xtr) // args.batch_size, 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(xtr), generator=generator)
        for i in range(steps_per_epoch):
            rows = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = shift(xtr[rows], generator).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = schedule(step, steps_per_epoch, args.epochs)
            with autocast():
                loss = F.cross_entropy(step_fn(x), ytr[rows].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        correct = 0
        with torch.no_grad(), autocast():
            for i in range(0, len(xte), 1000):
                x = xte[i:i + 1000].float().div_(255.0).contiguous(memory_format=torch.channels_last)
                correct += int((model(x).argmax(1) == yte[i:i + 1000].long()).sum())
        print(json.dumps({"epoch": epoch, "test_accuracy": correct / len(xte),
                          "elapsed_seconds": time.time() - started}), flush=True)


if __name__ == "__main__":
    main()
