"""torchvision's ImageNet models against cnn's on the same random weights: cnn.models.pretrained's torchvision parity.

    python experiments/pretrained_parity.py [--size=224] [--batch=2] [--models=resnet18,resnet50,...]

Not run in CI: it needs torch and torchvision (`pip install -e '.[bench]'`). For each model, torchvision's
builder makes it with random weights, its batch-norm weights, biases and running statistics randomised too (a
fresh model's are 1, 0, 0, 1, which would hide a misplaced tensor), in eval mode, its head scaled so the logits
have a standard deviation of 4 (a near-uniform softmax would make the comparison weak). Its state dict is saved twice,
by `torch.save` and as `.safetensors`; each file is loaded through `cnn.models.pretrained` (which reads both
without torch); the same random batch goes through torchvision (NCHW) and cnn (NHWC). It prints, per model and
file, the largest absolute difference of the softmax outputs (and of the logits), as a markdown table with the
CPU and the date, for docs/pretrained.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

import cnn.models  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _torch_model(name: str, seed: int):
    """torchvision's `name` with random weights, batch-norm statistics included, in eval mode."""
    import torch  # noqa: PLC0415 - the bench extra
    import torchvision  # noqa: PLC0415

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.05)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def compare(name: str, size: int, batch: int, folder: str) -> list[tuple[str, float, float, float]]:
    """(file kind, max |softmax difference|, max |logit difference|, torchvision's largest probability) per file."""
    import torch  # noqa: PLC0415

    model = _torch_model(name, seed=0)
    x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():  # the head scaled to logits of standard deviation 4: a softmax far from uniform
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.weight.mul_(4.0 / model(torch.from_numpy(x)).std())
        logits = model(torch.from_numpy(x)).numpy()
    expected = jax.nn.softmax(logits)
    files = {"torch.save (.pth)": os.path.join(folder, f"{name}.pth"),
             "safetensors": os.path.join(folder, f"{name}.safetensors")}
    torch.save(model.state_dict(), files["torch.save (.pth)"])
    safetensors.numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()}, files["safetensors"])
    rows = []
    for kind, path in files.items():
        module, variables = cnn.models.pretrained(name, path, input_shape=(size, size, 3))
        ours = np.asarray(jax.jit(module.apply)(variables, x.transpose(0, 2, 3, 1)))
        rows.append((kind, float(np.abs(jax.nn.softmax(ours) - expected).max()), float(np.abs(ours - logits).max()),
                     float(expected.max())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    import torch  # noqa: PLC0415
    import torchvision  # noqa: PLC0415

    print(f"{datetime.date.today().isoformat()}, {_cpu()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, jax {jax.__version__}; {args.batch} random images of {args.size}x{args.size}")
    print("\n| model | file | max abs softmax difference | max abs logit difference | torchvision's top probability |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            for kind, softmax, logit, top in compare(name, args.size, args.batch, folder):
                print(f"| {name} | {kind} | {softmax:.1e} | {logit:.1e} | {top:.3f} |", flush=True)


if __name__ == "__main__":
    main()
