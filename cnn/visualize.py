"""Command line: `python -m cnn.visualize --workdir=DIR` redraws WORKDIR/plots/ from the newest checkpoint.

Training draws the same pictures when it ends; this is for a run stopped
early, a checkpoint from before the pictures existed, or after changing
them. The test split is loaded as the run's config.json says.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from cnn.config import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The workdir of a training run (it holds config.json and checkpoints/).")
flags.DEFINE_integer("num_images", 3, "How many test images to show the feature maps of.")
flags.mark_flag_as_required("workdir")


def visualize(workdir: str, num_images: int = 3) -> list[str]:
    """Loads the run in `workdir` and its test split, and writes every picture; returns the PNG paths."""
    from cnn import data as data_lib
    from cnn import plots
    from cnn.prediction import load, read_config

    run = load(workdir)
    dataset = data_lib.load(read_config(workdir).data)
    return plots.write_plots(workdir, run, dataset, num_images=num_images)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}; usage: python -m cnn.visualize --workdir=DIR",
              file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if FLAGS.num_images < 1:
        print(f"error: --num_images={FLAGS.num_images} must be at least 1", file=sys.stderr)
        sys.exit(2)
    try:
        visualize(FLAGS.workdir, FLAGS.num_images)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake reported as one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nusage: python -m cnn.visualize --workdir=DIR [--num_images=3]", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
