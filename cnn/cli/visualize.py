"""`python -m cnn.visualize --workdir=DIR` redraws WORKDIR/plots/ from the newest checkpoint.

Training draws the same pictures when it ends; this is for a run stopped
early, a checkpoint from before the pictures existed, or after changing
them. The test split is loaded as the run's config.json says.
"""

from __future__ import annotations

import sys

from absl import app, flags

from cnn import data as data_lib
from cnn import plots
from cnn.cli import FLAGS, fail, flags_parser, quiet_logging
from cnn.errors import ConfigError
from cnn.run import load_run, read_config

flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
flags.DEFINE_integer("num_images", 3, "How many test images to show the feature maps of.")
flags.mark_flag_as_required("workdir")
USAGE = "usage: python -m cnn.visualize --workdir=DIR [--num_images=3]"


def visualize(workdir: str, num_images: int = 3) -> list[str]:
    """Loads the run in `workdir` and its test split, and writes every picture; returns the PNG paths."""
    run = load_run(workdir)
    if run.results.get("dataset") == data_lib.ARRAYS:
        raise ConfigError(f"{workdir} was trained on arrays passed to cnn.train_and_evaluate, which the workdir does "
                          "not hold; draw its pictures in the notebook: cnn.plots.write_plots(workdir, "
                          "cnn.load_run(workdir), cnn.from_arrays(...))")
    config = read_config(workdir)
    dataset = data_lib.load_dataset(config.data, config.seed)
    return plots.write_plots(workdir, run, dataset, num_images=num_images)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}; {USAGE[len('usage: '):]}")
    quiet_logging()
    if FLAGS.num_images < 1:
        fail(f"--num_images={FLAGS.num_images} must be at least 1")
    try:
        visualize(FLAGS.workdir, FLAGS.num_images)
    except ConfigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def command_line() -> None:
    """The command: parses the flags (a mistake is one line plus the usage), then runs `main`."""
    app.run(main, flags_parser=flags_parser(USAGE))


if __name__ == "__main__":
    command_line()
