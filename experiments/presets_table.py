"""Trains each preset's shipped config on a dataset and prints a markdown results table.

    python experiments/presets_table.py --dataset=mnist --presets=lenet5,flax_cnn --epochs=2 \
        --data_dir=/tmp/tfds_data

Each preset runs its own config file (its optimizer and schedule), switched
to `--dataset` (class count, splits and normalisation of that set; vgg gets
32x32 inputs, which its five pooling stages need). `--epochs` shortens a run
for a quick look; without it the config's own epoch count is used, which is
what the table in docs/presets.md reports. Rows print as each run ends, so a long
sweep can be read while it goes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cnn  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The config file that ships each preset's recipe.
PRESET_CONFIGS = {"flax_cnn": "flax_cnn.py", "lenet5": "lenet5.py", "keras_seed": "keras_seed.py",
                  "vgg": "vgg.py", "resnet20": "resnet20.py"}
# name: (classes, train split, test split, mean, std)
DATASETS = {
    "mnist": (10, "train", "test", None, None),
    "fashion_mnist": (10, "train", "test", None, None),
    "cifar10": (10, "train", "test", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Published test accuracy for (preset, dataset), with its source.
PUBLISHED = {
    ("flax_cnn", "mnist"): "99.07% (Flax examples/mnist README, 10 epochs)",
    ("lenet5", "mnist"): "99.05% (LeCun et al. 1998: 0.95% error, no distortions)",
    ("resnet20", "cifar10"): "91.25% (He et al. 2016, table 6)",
    ("vgg", "cifar10"): "92.64% (kuangliu/pytorch-cifar, VGG-16)",
}


def preset_config(preset: str, dataset: str, epochs: int | None, data_dir: str | None, manual_dir: str | None):
    """The preset's shipped config, moved to `dataset`."""
    config = cnn.load_config(os.path.join(CONFIGS, PRESET_CONFIGS[preset]))
    classes, train, test, mean, std = DATASETS[dataset]
    config.data.name, config.data.train_split, config.data.test_split = dataset, train, test
    config.data.mean, config.data.std = mean, std
    config.data.image_size = (32, 32) if preset == "vgg" and dataset != "cifar10" else None
    if config.model.preset is None:
        config.model.preset, config.model.layers = preset, ()
    config.model.num_classes = classes
    config.data.data_dir, config.data.manual_dir = data_dir, manual_dir
    if epochs:
        config.train.num_epochs = epochs
        config.optimizer.warmup_epochs = min(config.optimizer.warmup_epochs, epochs)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    parser.add_argument("--presets", default=",".join(PRESET_CONFIGS),
                        help=f"comma-separated, from {', '.join(PRESET_CONFIGS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epoch counts")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--manual_dir", default=None)
    parser.add_argument("--workdir", default=None, help="keep each run's workdir under here (default: temporary)")
    args = parser.parse_args()

    print("| preset | dataset | epochs | test accuracy | train seconds | params | published |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        if preset not in PRESET_CONFIGS:
            sys.exit(f"error: --presets: unknown preset {preset!r}; known: {', '.join(PRESET_CONFIGS)}")
        config = preset_config(preset, args.dataset, args.epochs, args.data_dir, args.manual_dir)
        root = args.workdir or tempfile.mkdtemp(prefix="presets-table-")
        workdir = os.path.join(root, f"{preset}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        stdout, sys.stdout = sys.stdout, sys.stderr  # keep the table alone on stdout
        try:
            results = cnn.train_and_evaluate(config, workdir).results
        finally:
            sys.stdout = stdout
        published = PUBLISHED.get((preset, args.dataset), "—")
        print(f"| {preset} | {args.dataset} | {results['epochs']} | {results['test_accuracy']:.2%} | "
              f"{results['train_seconds']:.0f} | {results['parameters']:,} | {published} |", flush=True)


if __name__ == "__main__":
    main()
