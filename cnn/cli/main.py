"""`cnn train --config=configs/mnist.py --workdir=DIR`: train, evaluate, then draw the pictures.

Any config field can be overridden, e.g. `--config.train.num_epochs=3`. The
work is `cnn.train_and_evaluate`, which a notebook can call too (with
`--folds=K`, `cnn.cross_validate`: a run per fold, see cnn/train/folds.py). Exit status:
0 done, 2 a mistake the message names, 3 pruned by a sweep (`cnn sweep`; the
checkpoint is kept), 143 stopped by SIGTERM and 130 by Ctrl-C, with a
checkpoint saved once training started (the same command resumes).
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cnn import config as config_lib
from cnn import kernels, runtime
from cnn.cli import FLAGS, Usage, fail, flags_parser, quiet_logging
from cnn.errors import ConfigError, Preempted, Pruned, UserError
from cnn.train import train_and_evaluate

USAGE = Usage(__name__, "--config=configs/mnist.py --workdir=DIR [--folds=K] [--config.section.field=value ...]",
              overrides="Sets one field of the config, e.g. --config.train.num_epochs=3")


class _ConfigFileParser(flags.ArgumentParser):
    """Replaces config_flags' --config parser: the file is read as `cnn.load_config` reads it, so a broken file
    is one line naming it, not a traceback through importlib."""

    def parse(self, argument: str):
        config = config_lib.load_config(argument)
        config.lock()  # as lock_config=True: an override must name a field the config has
        return config

    def flag_type(self) -> str:
        return "config object"


config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
FLAGS["config"].parser = _ConfigFileParser()
flags.DEFINE_string("workdir", None, "Folder for metrics, summaries and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process (multi-host) run; "
                    "without it, JAX_DISTRIBUTED=1 or a SLURM job with several tasks reads the cluster's environment.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1 (with --coordinator_address).")
flags.DEFINE_integer("folds", None, "Stratified K-fold cross-validation of the training split: one run per fold in "
                     "WORKDIR/fold_1 ... fold_K, then the mean and std of each figure in WORKDIR/cv_results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}\n{USAGE.line(argv[0])}")
    quiet_logging()
    config = FLAGS.config
    try:
        if FLAGS.coordinator_address and (FLAGS.num_processes is None or FLAGS.process_id is None):
            raise ConfigError("--coordinator_address needs --num_processes and --process_id too")
        runtime.set_cpu_devices(config.train.num_devices or kernels.cpu_devices(config.train.kernels,
                                                                                config.train.compute_dtype))
        runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if FLAGS.folds is not None:  # a sweep's trial then reports only the folds' mean, at the end
            from cnn.train.folds import cross_validate

            cross_validate(config, FLAGS.workdir, FLAGS.folds, on_fold_end=_draw)
        else:
            _draw(FLAGS.workdir, train_and_evaluate(config, FLAGS.workdir, on_epoch_end=_sweep_reporter()))
    except UserError as e:
        fail(str(e))
    except Pruned as e:  # a sweep's pruner stopped this trial at an epoch end
        print(str(e), file=sys.stderr)
        sys.exit(3)
    except Preempted as e:  # SIGTERM or Ctrl-C during training: a checkpoint was saved
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the process is ending: a second Ctrl-C changes nothing
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_status)  # 128 + the signal: stopped, not finished
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second one while a stop ends
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop = e.__context__ if isinstance(e.__context__, Preempted) else None
        print(str(stop) if stop else "interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)


def _draw(workdir: str, run) -> None:
    """The run's pictures in WORKDIR/plots, unless train.pictures is False."""
    if jax.process_index() == 0 and FLAGS.config.train.get("pictures", True):
        from cnn import plots  # matplotlib adds about a second: not before the first step

        plots.write_plots(workdir, run, run.dataset, warn_only=True)


def _sweep_reporter():
    """A trial of `python -m cnn.sweep` reports each epoch to its study (the sweep sets CNN_SWEEP_*)."""
    if not os.environ.get("CNN_SWEEP_STUDY"):
        return None
    from cnn.sweep.trial import reporter_from_env  # optuna, only in sweep trials

    return reporter_from_env()


def _explain_override(argv: list[str], error: Exception) -> str:
    """Names the first `--config.a.b=v` override whose field the config file lacks, or says what failed."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = config_lib.load_config(path)
    except ConfigError:  # the file itself is reported by its own parser
        config = None
    for arg in argv:
        if config is not None and arg.startswith("--config.") and "=" in arg:
            problem = config_lib.unknown_field(config, arg[len("--config."):].split("=", 1)[0])
            if problem:
                return f"{arg.split('=')[0]}: {problem}"
    return f"a --config override could not be applied ({error})"


def command(argv: list[str]) -> None:
    """`argv[0]` names the command as the user typed it, for the usage line."""
    app.run(main, argv=argv, flags_parser=flags_parser(USAGE, _explain_override))
