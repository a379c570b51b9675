"""`python -m cnn.sweep` on Optuna: real digits trials, several workers on one study, pruning, crashes and stops.

The trial tests use a one-layer model where the model does not matter: a
trial then costs its process start-up (seconds), not training.
"""

import csv
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

import cnn.cli.sweep as cli
from cnn import sweep as sweep_lib
from cnn.workdir import LOCK
from cnn.config import ConfigError
from conftest import REPO

MLP = "'model.layers': ('Flatten()', 'Dense(10)'), 'train.pictures': False"  # a trial of this costs its start-up, not its training


def write_sweep(tmp_path, body, name="s"):
    path = tmp_path / f"{name}.py"
    path.write_text("from cnn.sweep import *\n\n\ndef get_sweep():\n    return dict(config='configs/digits.py', "
                    + textwrap.dedent(body).strip() + ")\n")
    return str(path)


def sweep_command(*args):
    return [sys.executable, "-m", "cnn.sweep", *map(str, args)]


def start_sweep(*args):
    return subprocess.Popen(sweep_command(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def journal_study(path, name):
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def wait_for(predicate, what, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def logged(path, text):
    return lambda: path.exists() and text in path.read_text()


def starts(log):
    """How many times a process was started in a trial folder (each start adds one header line)."""
    return sum(line.startswith("=== ") for line in log.read_text().splitlines())


def lock_is_held(folder):
    with open(folder / LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def trial_pid(folder):
    """The live `cnn.main` process training in `folder`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except OSError:
            continue
        if "cnn.main" in argv and f"--workdir={folder}" in argv:
            return int(pid)
    return None


# ---------------------------------------------------------------------------
# Sweep files, flags and dry runs: in this process, nothing trained.


def test_product_and_zipped_build_trial_lists():
    grid = sweep_lib.product({"a": [1, 2], "b": ["x", "y"]})
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    assert sweep_lib.product(sweep_lib.zipped({"a": [1, 2], "b": ["x", "y"]}), {"seed": [0, 1]}) == [
        {"a": 1, "b": "x", "seed": 0}, {"a": 1, "b": "x", "seed": 1},
        {"a": 2, "b": "y", "seed": 0}, {"a": 2, "b": "y", "seed": 1}]
    with pytest.raises(ConfigError, match="one length"):
        sweep_lib.zipped({"a": [1, 2], "b": [1]})
    with pytest.raises(ConfigError, match="appears in two parts"):
        sweep_lib.product({"a": [1]}, {"a": [2]})


def test_sweep_files_become_optuna_spaces():
    from cnn.sweep.space import load_sweep

    search = load_sweep(str(REPO / "experiments" / "digits_search.py"))
    assert search.name == "digits_search" and search.n_trials == 12 and not search.is_grid_space
    rate = search.space["optimizer.learning_rate"]
    assert (rate.low, rate.high, rate.log) == (1e-4, 3e-2, True)
    assert search.space["train.batch_size"].choices == (16, 32, 64) and search.fixed == {"train.num_epochs": 3}
    grid = load_sweep(str(REPO / "experiments" / "mnist_lr_batch.py"))
    assert grid.is_grid_space and len(grid.grid_points()) == 12
    layers = load_sweep(str(REPO / "experiments" / "fashion_architectures.py"))
    assert layers.fixed["model.layers"] == "()"  # a tuple travels as the text --config.model.layers=... reads


@pytest.mark.parametrize("body, flags, message", [
    (None, [], "sweep file '{tmp}/missing.py' does not exist"),
    ("space={'seed': [0]}, n_trials=1 // 0", [], "{tmp}/s.py, line 5: ZeroDivisionError: integer division or modulo"),
    ("space={'optimizer.lr': [0.1]}", [], "override optimizer.lr: optimizer has no field 'lr'; its fields: args, b1, b2"),
    ("fixed={'train.epochs': 1}, space={'seed': [0]}", [], "override train.epochs: train has no field 'epochs'"),
    ("space={'seed': [0]}, trials=[{'seed': 1}]", [], "one of 'space' (to search) or 'trials' (to run each)"),
    ("space={'seed': 3}", [], "space['seed']=3 is not a list of values or a range"),
    ("space={'optimizer.learning_rate': log_uniform(1, 0.1)}", [], "log_uniform(1, 0.1): `low <= high` must hold"),
    ("space={'optimizer.learning_rate': log_uniform(1e-4, 1e-1)}", ["--sampler=grid"],
     "--sampler=grid needs lists of values, but optimizer.learning_rate is a range"),
    ("space={'optimizer.learning_rate': uniform(1e-4, 1e-1)}", [], "--n_trials is needed"),
    ("trials=[{'seed': 0}, {'seed': 1}]", ["--sampler=tpe"], "lists its trials (trials=...), which run as a grid"),
    ("trials=[{'seed': 0}, {'seed': 0}]", [], "trial 'seed=0' is listed twice"),
    ("space={'seed': [0, 1]}", ["--n_trials=3"], "--n_trials=3 is more than the 2 trials of"),
    ("space={'seed': [0, 1]}", ["--config.train.nope=1"], "--config.train.nope: train has no field 'nope'"),
    ("space={'seed': [0, 1]}", ["--config.seed=3"], "--config.seed is swept by"),
    ("space={'seed': [0]}", ["--parallel=2"], "Unknown command line flag 'parallel'"),
    ("space={'seed': [0]}", ["--sampler=bayes"], "value should be one of <grid|random|tpe>"),
    ("space={'seed': [0]}", ["--workers=0"], "flag --workers=0: 0 is not a positive integer"),
    ("space={'seed': [0]}", ["--storage=mysql://db/x"], "use a postgresql:// or sqlite:/// URL, or the path of"),
    ("space={'seed': [0]}", ["--storage=sqlite:///:memory:"], "is in memory, which trial processes cannot share"),
])
def test_mistakes_are_one_line_before_anything_runs(tmp_path, capsys, body, flags, message):
    path = write_sweep(tmp_path, body) if body else str(tmp_path / "missing.py")
    assert cli.main(["cnn.sweep", path, f"--workdir={tmp_path / 'w'}", *flags]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "w").exists()


def test_storage_and_workdir_mistakes(tmp_path, capsys):
    path = write_sweep(tmp_path, "space={'seed': [0]}")
    (tmp_path / "file").write_text("")
    assert cli.main(["cnn.sweep", path, f"--workdir={tmp_path / 'file' / 'w'}"]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert cli.main(["cnn.sweep", path, f"--workdir={tmp_path / 'w'}",
                     "--storage=postgresql://nobody@127.0.0.1:9/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --storage='postgresql://nobody@127.0.0.1:9/nothing' could not be opened ("), err
    assert err.count("\n") == 1
    assert cli.main(["cnn.sweep", path]) == 2 and "error: --workdir is required" in capsys.readouterr().err


def test_dry_run_prints_a_job_array_for_grids_and_the_worker_command_for_searches(tmp_path, capsys):
    printed = {}
    for name, count in (("digits_lr", 3), ("mnist_lr_batch", 12), ("fashion_architectures", 4)):
        assert cli.main(["cnn.sweep", f"experiments/{name}.py", f"--workdir={tmp_path}/w", "--dry_run"]) == 0
        printed[name] = capsys.readouterr().out.splitlines()
        assert len(printed[name]) == count and all(" -m cnn.main --config=" in line for line in printed[name])
    first = printed["mnist_lr_batch"][0]  # the folder the study would give this grid point
    assert f"--workdir={tmp_path}/w/learning_rate=0.01,batch_size=32 " in first
    assert first.endswith("--config.optimizer.learning_rate=0.01 --config.train.batch_size=32")

    assert cli.main(["cnn.sweep", "experiments/digits_search.py", f"--workdir={tmp_path}/w", "--dry_run",
                     "--pruner=median", "--config.data.cache=False"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert f" -m cnn.sweep {REPO}/experiments/digits_search.py --workdir={tmp_path}/w " in line
    assert f"--storage={tmp_path}/w/journal.log --n_trials=12 --sampler=tpe --pruner=median" in line
    assert line.endswith("--config.data.cache=False") and not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# Real trials, each its own cnn.main process.


def test_two_workers_fill_one_journal_study_and_no_trial_runs_twice(tmp_path):
    """The issue's 'done when': two separately started workers, one journal file, exactly --n_trials trials.

    Each finishes its first trial while the other still runs one: a worker that counted only finished trials
    would start a third.
    """
    work = tmp_path / "w"
    args = ["experiments/digits_search.py", f"--workdir={work}", "--n_trials=2",
            "--config.model.layers=('Flatten()', 'Dense(10)')"]
    first, second = start_sweep(*args), start_sweep(*args)
    outputs = [p.communicate(timeout=240)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs

    study = journal_study(work / "journal.log", "digits_search")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran a trial
    assert len({(t.params["optimizer.learning_rate"], t.params["train.batch_size"]) for t in trials}) == 2
    for t in trials:
        folder = work / f"trial_{t.number:04d}"
        assert t.user_attrs["workdir"] == str(folder) and starts(folder / "log.txt") == 1
        assert json.loads((folder / "results.json").read_text())["test_accuracy"] == t.value
        assert 1e-4 <= t.params["optimizer.learning_rate"] <= 3e-2 and t.params["train.batch_size"] in (16, 32, 64)
    rows = read_csv(work / "results.csv")
    assert [(r["number"], r["state"], float(r["test_accuracy"]), r["workdir"]) for r in rows] == [
        (str(t.number), "COMPLETE", t.value, t.user_attrs["workdir"]) for t in trials]
    assert {"optimizer.learning_rate", "train.batch_size", "test_loss", "train_seconds"} <= set(rows[0])
    assert all((work / f"{name}.png").stat().st_size > 10_000 for name in
               ("optimization_history", "param_importances", "slice"))


def test_hopeless_trial_is_pruned_before_its_last_epoch_and_a_broken_one_fails(tmp_path, capsys):
    """A learning rate 100x too small falls behind the finished trial at epoch 1, and stops there."""
    path = write_sweep(tmp_path, f"""
        fixed={{'train.num_epochs': 3, {MLP}}}, startup_trials=1,
        trials=[{{'optimizer.learning_rate': 1e-2}}, {{'optimizer.learning_rate': 1e-4}},
                {{'train.batch_size': 'lots'}}]""")
    work = tmp_path / "w"
    assert cli.main(["cnn.sweep", path, f"--workdir={work}", "--pruner=median"]) == 1  # a worker in this process
    out = capsys.readouterr().out
    good, hopeless, broken = journal_study(work / "journal.log", "s").get_trials()
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2, 3]
    assert hopeless.state == TrialState.PRUNED and list(hopeless.intermediate_values) == [1]
    assert hopeless.intermediate_values[1] < good.intermediate_values[1]
    folder = work / "learning_rate=0.0001"
    assert len((folder / "metrics.jsonl").read_text().splitlines()) == 1 and not (folder / "results.json").exists()
    assert "pruned by the sweep at epoch 1" in (folder / "log.txt").read_text()
    assert os.listdir(folder / "checkpoints")  # kept, with the epoch's checkpoint
    assert "trial 1 PRUNED (at epoch 1" in out
    assert broken.state == TrialState.FAIL and "trial 2 FAIL (exit 2)" in out
    assert "error: flag --config.train.batch_size=lots: invalid literal for int()" in out  # the end of its log
    assert [r["state"] for r in read_csv(work / "results.csv")] == ["COMPLETE", "PRUNED", "FAIL"]


def test_a_killed_workers_trial_is_never_started_twice_and_resumes_from_its_checkpoint(tmp_path, capsys):
    path = write_sweep(tmp_path, f"fixed={{'train.num_epochs': 40, {MLP}}}, trials=[{{'seed': 0}}]")
    work, folder = tmp_path / "w", tmp_path / "w" / "seed=0"
    first = start_sweep(path, f"--workdir={work}")
    wait_for(logged(folder / "log.txt", "epoch   3/40"), "epoch 3")
    first.kill()  # SIGKILL: no handler runs; its trial process lives on, holding the folder's lock
    first.communicate()
    os.kill(trial_pid(folder), signal.SIGSTOP)  # ...paused here, so it cannot finish its 40 epochs meanwhile
    assert lock_is_held(folder) and trial_pid(folder)
    by_hand = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={folder}"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert by_hand.returncode == 2  # the trial process took its worker's lock over as its own, and says so
    assert f"is in use by another run: PID {trial_pid(folder)} on " in by_hand.stderr, by_hand.stderr

    assert cli.main(["cnn.sweep", path, f"--workdir={work}"]) == 0  # a second worker, in this process
    assert "no trial to run here: the study has 1 of 1 trials, 1 running" in capsys.readouterr().out
    assert starts(folder / "log.txt") == 1  # the folder is in use: nothing was started there

    os.kill(trial_pid(folder), signal.SIGKILL)  # now the trial is left RUNNING, its folder free
    wait_for(lambda: not lock_is_held(folder), "the lock to be released", timeout=30)
    # The same config (a changed one would be refused: config.json is the config of the checkpoints).
    assert cli.main(["cnn.sweep", path, f"--workdir={work}"]) == 0
    assert "trial 0 resumed" in capsys.readouterr().out and starts(folder / "log.txt") == 2
    assert "resuming from the checkpoint at step" in (folder / "log.txt").read_text()
    (trial,) = journal_study(work / "journal.log", "s").get_trials()
    assert trial.state == TrialState.COMPLETE and trial.number == 0
    epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 41))  # every epoch once: resumed, not restarted


def test_a_folder_a_run_started_by_hand_holds_is_not_given_a_trial(tmp_path, capsys):
    path = write_sweep(tmp_path, f"fixed={{{MLP}}}, trials=[{{'seed': 0}}]")
    work, folder = tmp_path / "w", tmp_path / "w" / "seed=0"
    by_hand = subprocess.Popen([sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={folder}",
                                "--config.train.num_epochs=1000", "--config.model.layers=('Flatten()', 'Dense(10)')"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (folder / "metrics.jsonl").exists(), "the run by hand to start training")
        assert cli.main(["cnn.sweep", path, f"--workdir={work}"]) == 2
        err = capsys.readouterr().err
        assert f"error: {folder} is in use by PID {by_hand.pid} on " in err, err
        assert not (folder / "log.txt").exists() and by_hand.poll() is None  # nothing started there
    finally:
        by_hand.kill()
        by_hand.wait()


def test_sigterm_stops_the_workers_trials_with_checkpoints(tmp_path):
    path = write_sweep(tmp_path, f"fixed={{'train.num_epochs': 1000, {MLP}}}, trials=[{{'seed': 0}}, {{'seed': 1}}]")
    work = tmp_path / "w"
    proc = start_sweep(path, f"--workdir={work}", "--workers=2")
    logs = [work / f"seed={s}" / "log.txt" for s in (0, 1)]
    wait_for(lambda: all(logged(log, "epoch   1/1000")() for log in logs), "both trials' first epoch")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert out.count("stays RUNNING, its checkpoint saved") == 2
    for log in logs:
        assert "SIGTERM: saved a checkpoint" in log.read_text() and not lock_is_held(log.parent)
        assert trial_pid(log.parent) is None
    assert [t.state for t in journal_study(work / "journal.log", "s").get_trials()] == [TrialState.RUNNING] * 2
    assert [r["state"] for r in read_csv(work / "results.csv")] == ["RUNNING", "RUNNING"]


@pytest.fixture
def postgres_url():
    """A fresh database on the server CNN_TEST_POSTGRES_URL names (.ci/run starts one and sets it)."""
    url = os.environ.get("CNN_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CNN_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against (.ci/run starts one)")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    name = f"cnn_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:  # unreachable when CI set the variable is a failure, not a skip
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield str(sqlalchemy.engine.make_url(url).set(database=name).render_as_string(hide_password=False))
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.mark.slow
def test_two_workers_on_postgresql(tmp_path, postgres_url):
    """Two machines, as it were: one database, a workdir each; every trial once, each worker reporting all."""
    path = write_sweep(tmp_path, f"fixed={{'train.num_epochs': 2, {MLP}}}, "
                                 "space={'optimizer.learning_rate': [3e-3, 1e-2]}", name="pg")
    procs = [start_sweep(path, f"--workdir={tmp_path / w}", f"--storage={postgres_url}") for w in ("a", "b")]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = optuna.load_study(study_name="pg", storage=postgres_url).get_trials()
    assert sorted(t.params["optimizer.learning_rate"] for t in trials) == [3e-3, 1e-2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    folders = sorted(os.path.relpath(t.user_attrs["workdir"], tmp_path) for t in trials)
    assert folders == ["a/learning_rate=0.003", "b/learning_rate=0.01"] or folders == [
        "a/learning_rate=0.01", "b/learning_rate=0.003"]
    tables = [read_csv(tmp_path / w / "results.csv") for w in ("a", "b")]
    assert all([r["number"] for r in table] == ["0", "1"] for table in tables)  # each lists the whole study
    assert ["COMPLETE", "COMPLETE"] in ([r["state"] for r in table] for table in tables)  # the last to finish
