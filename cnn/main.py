"""Command line: `python -m cnn.main --config=configs/mnist.py --workdir=DIR`.

Only parses flags; the work happens in `cnn.train.train_and_evaluate`. Any
config field can be overridden, e.g. `--config.train.num_epochs=3`.

Exit status: 0 done, 2 a mistake in the config or flags (one `error:` line),
3 pruned by a sweep (`python -m cnn.sweep`; the checkpoint is kept), 130
interrupted, 143 stopped by SIGTERM after saving a checkpoint.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cnn.config import ConfigError, Pruned

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for metrics, summaries and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process (multi-host) run; "
                    "without it, JAX_DISTRIBUTED=1 or a SLURM job with several tasks reads the cluster's environment.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1 (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # JAX logs its backend probing at INFO
    from cnn import sharding, train

    try:
        config = FLAGS.config
        config.train  # config_flags defers a bad file's error to the first read
    except OSError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        print(f"error: --config could not be loaded ({detail}); pass a file such as configs/mnist.py",
              file=sys.stderr)
        sys.exit(2)
    try:
        if FLAGS.coordinator_address and (FLAGS.num_processes is None or FLAGS.process_id is None):
            raise ConfigError("--coordinator_address needs --num_processes and --process_id too")
        sharding.set_cpu_devices(config.train.num_devices)
        sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        on_epoch_end = None
        if os.environ.get("CNN_SWEEP_STUDY"):  # sweep: a trial of `python -m cnn.sweep` reports each epoch
            from cnn.sweep.trial import reporter_from_env

            on_epoch_end = reporter_from_env()
        train.train_and_evaluate(config, FLAGS.workdir, on_epoch_end=on_epoch_end)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Pruned as e:  # sweep: its pruner stopped this trial at an epoch end
        print(str(e), file=sys.stderr)
        sys.exit(3)
    except train.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM: stopped, not finished
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _unknown_field(argv: list[str]) -> str | None:
    """Names the first `--config.a.b=v` override whose field the config file lacks."""
    from cnn.config import check_fields, load

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = load(path)
    except Exception:
        return None
    keys = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.") and "=" in a]
    try:
        check_fields(config, keys, "--config.")
    except ConfigError as e:
        return str(e)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake reported as one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags applying an override
        message = _unknown_field(argv) or f"a --config override could not be applied ({e})"
    print(f"error: {message}\nusage: python -m cnn.main --config=configs/mnist.py --workdir=DIR "
          "[--config.section.field=value ...]", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
