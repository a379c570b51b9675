"""`cnn sweep FILE --workdir=DIR`: run (or join) the study a sweep file declares; see cnn/sweep/.

Extra --config.FIELD=VALUE flags go to every trial this worker runs, for
settings of this machine such as data.manual_dir. Exit status: 0, 1 when a
trial failed, 2 for a mistake in the flags or the sweep file, 130 or 143
when stopped (the trials then stay RUNNING and resume on the next run).
"""

from __future__ import annotations

import shlex
import sys

from absl import flags

from cnn import workdir as workdir_lib
from cnn.cli import Usage, wants_help
from cnn.config import check_fields
from cnn.errors import ConfigError, UserError

FLAGS = flags.FlagValues()  # its own: tests call main() in a process that may hold cnn.main's flags
flags.DEFINE_string("workdir", None, "Folder for the trial folders, results.csv and the plots.", flag_values=FLAGS)
flags.DEFINE_string("storage", None, "The study: a postgresql:// or sqlite:/// URL, or a journal file (on a "
                    "shared filesystem for many machines); default WORKDIR/journal.log.", flag_values=FLAGS)
flags.DEFINE_integer("n_trials", None, "Trials in the study, across every worker; default: the sweep file's "
                     "n_trials, or the size of its grid.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("workers", 1, "Trial processes this worker runs at once.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("sampler", None, ["grid", "random", "tpe"], "Default: grid for lists, tpe for ranges.",
                  flag_values=FLAGS)
flags.DEFINE_enum("pruner", "none", ["none", "median", "hyperband"], "Stops hopeless trials at an epoch end.",
                  flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the commands (one cnn.main per grid trial, or the worker command for "
                  "a search) and run nothing.", flag_values=FLAGS)

USAGE = Usage(__name__, "FILE --workdir=DIR [--storage=URL_OR_FILE] [--n_trials=N] [--workers=K] "
              "[--sampler=grid|random|tpe] [--pruner=none|median|hyperband] [--dry_run] [--config.FIELD=VALUE ...]",
              overrides="Sets one field in every trial this worker runs, e.g. --config.data.manual_dir=DIR",
              flag_values=FLAGS)


def _parse(argv: list[str]) -> tuple[str, list[str]]:
    """The sweep file and the --config flags; a usage mistake raises flags.Error."""
    extra = [a for a in argv[1:] if a.startswith("--config.")]
    FLAGS.unparse_flags()
    rest = FLAGS([argv[0], *(a for a in argv[1:] if not a.startswith("--config."))])[1:]
    if len(rest) != 1:
        raise flags.Error(f"expected one sweep file, got {len(rest)}: {' '.join(rest) or 'none'}")
    if FLAGS.workdir is None:
        raise flags.Error("--workdir is required: the folder for the trials and the results")
    bad = next((a for a in extra if "=" not in a), None)
    if bad:
        raise flags.Error(f"{bad} has no value; write {bad}=VALUE")
    return rest[0], extra


def dry_run(sweep, sampler: str, n_trials: int, spec: str, extra: list[str]) -> list[str]:
    """Grids: one cnn.main command per trial, for a job array. Searches: the command every node runs."""
    import os

    from cnn.sweep.space import command, trial_dir

    workdir = os.path.abspath(FLAGS.workdir)
    if sampler == "grid":
        return [shlex.join(command(sweep, trial_dir(sweep, workdir, i, p, True), p, extra))
                for i, p in enumerate(sweep.grid_points()[:n_trials])]
    flags_ = [f"--workdir={workdir}", f"--storage={spec}", f"--n_trials={n_trials}",
              f"--sampler={sampler}", f"--pruner={FLAGS.pruner}", f"--workers={FLAGS.workers}"]
    return [shlex.join([sys.executable, "-m", "cnn.sweep", sweep.path, *flags_, *extra])]


def main(argv: list[str]) -> int:
    """Runs one worker of the sweep (or prints its commands); returns the exit status."""
    if wants_help(argv) or "--helpfull" in argv[1:]:
        print(USAGE.help(argv[0]))
        return 0
    try:
        path, extra = _parse(argv)
    except flags.Error as e:
        print(f"error: {e}\n{USAGE.line(argv[0])}", file=sys.stderr)
        return 2
    try:
        return _sweep(path, extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _sweep(path: str, extra: list[str]) -> int:
    from cnn.sweep import report, storage, study
    from cnn.sweep.space import load_sweep

    sweep = load_sweep(path)
    keys = [a[len("--config."):].split("=", 1)[0] for a in extra]
    check_fields(sweep.base, keys, "--config.")
    swept = next((k for k in keys if k in sweep.space), None)
    if swept:
        raise ConfigError(f"--config.{swept} is swept by {path}; drop the flag or change the sweep file")
    sampler, _ = study.make_sampler(sweep, FLAGS.sampler)
    n_trials = study.trial_count(sweep, sampler == "grid", FLAGS.n_trials)
    spec = storage.resolve(FLAGS.storage, FLAGS.workdir)
    if FLAGS.dry_run:
        print("\n".join(dry_run(sweep, sampler, n_trials, spec, extra)))
        return 0
    workdir_lib.check_writable(FLAGS.workdir, "--workdir")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = study.open_worker(sweep, spec, FLAGS.workdir, FLAGS.sampler, FLAGS.n_trials, FLAGS.pruner,
                               FLAGS.workers, extra)
    trials = worker.study.get_trials(deepcopy=False)
    print(f"sweep {sweep.name}: {len(trials)} of {n_trials} trials in {storage.shown(spec)}; {sampler} sampler, pruner "
          f"{FLAGS.pruner}, up to {FLAGS.workers} trial(s) at a time here, in {worker.workdir}", flush=True)
    csv_path = f"{worker.workdir}/results.csv"

    def write_csv() -> None:
        with worker.lock():  # the last writer has seen every trial told before it
            report.write_csv(report.rows(worker.study, sweep), csv_path)

    stopped_by = study.run_trials(worker, on_change=write_csv)
    write_csv()
    table = report.rows(worker.study, sweep)
    print(report.format_table(table, sweep))
    paths, skipped = report.write_plots(worker.study, worker.workdir)
    plots = f"; plots {', '.join(p.rsplit('/', 1)[1] for p in paths)}" if paths else ""
    print(f"sweep: results in {csv_path}{plots}" + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
    if worker.fatal:
        raise ConfigError(worker.fatal)
    if stopped_by is not None:
        return 128 + stopped_by  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    return 1 if worker.failures else 0


def command(argv: list[str]) -> None:
    """`argv[0]` names the command as the user typed it, for the usage line."""
    sys.exit(main(argv))
