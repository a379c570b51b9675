"""The `recipes` benchmark: what each training trick of issue 33 pays on Fashion-MNIST, alone and all together.

Trains configs/fashion_mnist.py (its model and epochs) as it is ('base'),
with each trick alone, and with all of them, for three seeds each, in one
process, and prints a markdown table of the final test accuracy (mean ± std
over the seeds) and its difference from the base recipe, with the CPU and
the date; the table is also appended to docs/benchmarks/<date>-<cpu>.md
(`--no_record` skips that). About 45 minutes on two idle cores (27 runs of about 100 s).

    python experiments/recipes.py --manual_dir=DIR
    python experiments/recipes.py --manual_dir=DIR --epochs 1 --seeds 1 --tricks base,mixup --train_subset 2000

`--manual_dir` is a folder holding Fashion-MNIST's four IDX archives (read
without TensorFlow). 'tta_flip' needs eval.tta (averaging the probabilities
of each test image and its mirror); a checkout without that field skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "experiments"))

import cnn  # noqa: E402
from cnn import data as data_lib  # noqa: E402

# Each trick alone: the fields it sets on configs/fashion_mnist.py. 'all' sets every one of them.
TRICKS = {
    "base": {},
    "label_smoothing": {"loss_label_smoothing": 0.1},
    "mixup": {"data.mixup_alpha": 0.2},
    "cutmix": {"data.cutmix_alpha": 1.0},
    "ema": {"train.ema_decay": 0.999},
    "tta_flip": {"eval.tta": "flip"},
    "clip_norm": {"optimizer.clip_norm": 1.0},
    "one_cycle": {"optimizer.schedule": "one_cycle"},
}


def available(fields: dict) -> bool:
    """Whether this checkout's config has every field (eval.tta arrives with the per-class metrics work)."""
    return all(cnn.config.unknown_field(cnn.config.base_config(), key) is None for key in fields)


def recipes(names: list[str]) -> dict[str, dict]:
    """The recipes to run, by name: the tricks asked for whose fields exist, and 'all' as every available trick."""
    out = {}
    for name in names:
        fields = {k: v for trick in TRICKS.values() for k, v in trick.items() if available({k: v})} \
            if name == "all" else TRICKS[name]
        if available(fields):
            out[name] = fields
        else:
            print(f"skipped {name}: this checkout's config has no {', '.join(fields)}", file=sys.stderr)
    return out


def run_one(fields: dict, seed: int, epochs: int | None, manual_dir: str, dataset, workdir: str) -> float:
    """One training run's final test accuracy."""
    config = cnn.load_config(os.path.join(REPO, "configs", "fashion_mnist.py"))
    config.data.manual_dir, config.seed, config.train.pictures = manual_dir, seed, False
    if epochs:
        config.train.num_epochs = epochs
        config.optimizer.warmup_epochs = min(config.optimizer.warmup_epochs, epochs)
    for key, value in fields.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return cnn.train_and_evaluate(config, workdir, dataset=dataset).results["test_accuracy"]


def run_all(chosen: dict[str, dict], args: argparse.Namespace, dataset, workdir: str
            ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every recipe's accuracies over the seeds and its mean seconds per run. Each finished run is a line of
    WORKDIR/runs.jsonl, so a rerun with the same --workdir skips it (the whole benchmark is long on a CPU)."""
    path, done = os.path.join(workdir, "runs.jsonl"), {}
    if os.path.exists(path):
        with open(path) as f:
            done = {(r["recipe"], r["seed"]): r for r in map(json.loads, f)}
    accuracies, seconds = {}, {}
    for name, fields in chosen.items():
        for seed in range(args.seeds):
            if (name, seed) not in done:
                start = time.time()
                accuracy = run_one(fields, seed, args.epochs, args.manual_dir, dataset,
                                   os.path.join(workdir, f"{name}-{seed}"))
                done[name, seed] = {"recipe": name, "seed": seed, "accuracy": accuracy,
                                    "seconds": time.time() - start}
                with open(path, "a") as f:
                    f.write(json.dumps(done[name, seed]) + "\n")
            print(f"{name} seed {seed}: {done[name, seed]['accuracy']:.2%}", flush=True)
        accuracies[name] = [done[name, seed]["accuracy"] for seed in range(args.seeds)]
        seconds[name] = statistics.mean(done[name, seed]["seconds"] for seed in range(args.seeds))
    return accuracies, seconds


def table(accuracies: dict[str, list[float]], seconds: dict[str, float]) -> str:
    """The markdown table: test accuracy mean ± std (population std over the seeds), difference from 'base'."""
    base = statistics.mean(accuracies["base"]) if "base" in accuracies else None
    lines = ["| recipe | test accuracy | vs base | per seed | seconds per run |", "|---|---|---|---|---|"]
    for name, values in accuracies.items():
        mean = statistics.mean(values)
        delta = f"{100 * (mean - base):+.2f} pt" if base is not None and name != "base" else ""
        lines.append(f"| {name} | {mean:.2%} ± {100 * statistics.pstdev(values):.2f} | {delta} | "
                     f"{', '.join(f'{v:.2%}' for v in values)} | {seconds[name]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from benchmark import cpu_model, recording

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual_dir", required=True, help="folder holding Fashion-MNIST's four IDX archives")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: configs/fashion_mnist.py's")
    parser.add_argument("--tricks", default=",".join([*TRICKS, "all"]), help="comma-separated, from: "
                        + ", ".join([*TRICKS, "all"]))
    parser.add_argument("--train_subset", type=int, default=None, help="train on the first N examples (a quick try)")
    parser.add_argument("--no_record", action="store_true", help="print only; by default the table is also "
                        "appended to docs/benchmarks/<date>-<cpu>.md")
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder); a rerun "
                        "with the same folder skips the runs already finished")
    args = parser.parse_args()
    names = args.tricks.split(",")
    unknown = [n for n in names if n not in TRICKS and n != "all"]
    if unknown:
        parser.error(f"--tricks: unknown {', '.join(unknown)}; choose from {', '.join([*TRICKS, 'all'])}")
    config = cnn.load_config(os.path.join(REPO, "configs", "fashion_mnist.py"))
    config.data.manual_dir = args.manual_dir
    dataset = cnn.load_dataset(config.data)  # once, shared by every run
    if args.train_subset:
        dataset = dataclasses.replace(dataset, train=data_lib.Split(dataset.train.images[:args.train_subset],
                                                                    dataset.train.labels[:args.train_subset]))
    chosen = recipes(names)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        accuracies, seconds = run_all(chosen, args, dataset, workdir)
    with recording(not args.no_record):
        print(f"recipes: Fashion-MNIST ({len(dataset.train)} training examples), configs/fashion_mnist.py for "
              f"{args.epochs or config.train.num_epochs} epochs, {args.seeds} seed(s); {cpu_model()}; "
              f"{time.strftime('%Y-%m-%d')}\n")
        for name, fields in chosen.items():
            print(f"- {name}: {', '.join(f'{k}={v!r}' for k, v in fields.items()) or 'configs/fashion_mnist.py'}")
        print()
        print(table(accuracies, seconds))


if __name__ == "__main__":
    main()
