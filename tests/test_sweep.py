"""`python -m cnn.sweep`: trial lists, dry runs pasted into a shell, a real sweep, failures, resuming after a kill."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cnn import sweep as sweep_lib
from cnn.config import ConfigError
from conftest import REPO


def test_product_zipped_and_sample():
    grid = sweep_lib.product({"a": [1, 2], "b": ["x", "y"]})
    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    paired = sweep_lib.zipped({"a": [1, 2], "b": ["x", "y"]})
    assert paired == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    assert sweep_lib.product(paired, {"seed": [0, 1]}) == [
        {"a": 1, "b": "x", "seed": 0}, {"a": 1, "b": "x", "seed": 1},
        {"a": 2, "b": "y", "seed": 0}, {"a": 2, "b": "y", "seed": 1}]
    assert sweep_lib.product({"layers": [("Flatten()", "Dense(10)")]}) == [{"layers": ("Flatten()", "Dense(10)")}]

    space = {"lr": sweep_lib.log_uniform(1e-4, 1e-1), "batch": [32, 64], "wd": sweep_lib.uniform(0, 1)}
    drawn = sweep_lib.sample(6, space, seed=1)
    assert drawn == sweep_lib.sample(6, space, seed=1) != sweep_lib.sample(6, space, seed=2)
    assert len(drawn) == 6 and len({repr(t) for t in drawn}) == 6
    assert all(1e-4 <= t["lr"] <= 1e-1 and t["batch"] in (32, 64) and 0 <= t["wd"] <= 1 for t in drawn)
    assert len(sweep_lib.sample(10, {"batch": [32, 64]})) == 2  # only two distinct trials exist

    with pytest.raises(ConfigError, match="one length"):
        sweep_lib.zipped({"a": [1, 2], "b": [1]})
    with pytest.raises(ConfigError, match="appears in two parts"):
        sweep_lib.product({"a": [1]}, {"a": [2]})
    with pytest.raises(ConfigError, match="not a non-empty list"):
        sweep_lib.product({"a": 0.1})


def test_trial_names_are_readable_and_distinct():
    assert sweep_lib.trial_name({"optimizer.learning_rate": 0.05, "train.batch_size": 64}) == \
        "learning_rate=0.05,batch_size=64"
    assert sweep_lib.trial_name({"a.seed": 1, "b.seed": 2}) == "a.seed=1,b.seed=2"
    assert sweep_lib.trial_name({}) == "base"
    odd = [sweep_lib.trial_name({"model.preset": v}) for v in ("a/b", "a b", "a:b")]
    assert len(set(odd)) == 3 and all(n.startswith("preset=a_b-") and "/" not in n for n in odd)


def write_sweep(path, trials, fixed="{'train.num_epochs': 1}", metric="test_accuracy"):
    path.write_text(textwrap.dedent(f"""\
        from cnn.sweep import product, zipped

        def get_sweep():
            return dict(config='configs/digits.py', fixed={fixed}, trials={trials}, metric={metric!r})
        """))
    return str(path)


def run_sweep(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "cnn.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing.py"), "does not exist"),
    (lambda tmp: (tmp / "s.py").write_text("x = 1\n") and str(tmp / "s.py"), "has no get_sweep() function"),
    (lambda tmp: write_sweep(tmp / "s.py", "product({'optimizer.lr': [0.1]})"),
     "override 'optimizer.lr': optimizer has no field 'lr'; its fields: b1, b2"),
    (lambda tmp: write_sweep(tmp / "s.py", "product({'seed': [0]})", fixed="{'train.epochs': 1}"),
     "override 'train.epochs': train has no field 'epochs'"),
])
def test_mistakes_are_one_line_before_anything_runs(tmp_path, capsys, make, message):
    assert sweep_lib.main([make(tmp_path), f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "w").exists()


def test_unwritable_workdir(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert sweep_lib.main([write_sweep(tmp_path / "s.py", "product({'seed': [0]})"),
                           f"--workdir={tmp_path / 'file' / 'w'}"]) == 2
    assert "is not writable" in capsys.readouterr().err


def read_csv(path):
    with open(path) as f:
        return {row["trial"]: row for row in csv.DictReader(f)}


def test_dry_run_in_a_shell_then_sweep_fails_one_trial_and_resumes(tmp_path):
    """The workflow end to end: commands for a cluster, collecting, a failing trial, a lost result rerun."""
    work = tmp_path / "sweep"
    sweep_file = write_sweep(tmp_path / "s.py",
                             "product({'optimizer.learning_rate': [0.003, 0.001]}) + [{'train.batch_size': 'lots'}]")
    names = ["learning_rate=0.003", "learning_rate=0.001", "batch_size=lots"]

    dry = run_sweep(sweep_file, f"--workdir={work}", "--dry_run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert len(lines) == 3 and not work.exists()
    for line, name in zip(lines, names):
        argv = shlex.split(line)
        assert argv[1:3] == ["-m", "cnn.main"] and f"--workdir={work / name}" in argv
    assert "--config.optimizer.learning_rate=0.003" in shlex.split(lines[0])

    # A cluster runs one of the printed commands; the sweep then counts that trial as done.
    pasted = subprocess.run(["bash", "-c", lines[0]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, pasted.stderr
    first = work / names[0] / "results.json"
    first_mtime = first.stat().st_mtime

    proc = run_sweep(sweep_file, f"--workdir={work}", "--parallel=2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "3 trials, 1 already done, 2 to run, 2 at a time" in proc.stdout
    assert "FAILED batch_size=lots (exit 2)" in proc.stdout
    assert "error: flag --config.train.batch_size=lots: invalid literal for int()" in proc.stdout
    rows = read_csv(work / "results.csv")
    assert list(rows) == names
    assert [rows[n]["status"] for n in names] == ["done", "done", "failed (exit 2)"]
    assert rows[names[1]]["optimizer.learning_rate"] == "0.001" and float(rows[names[1]]["test_accuracy"]) > 0.5
    assert rows[names[2]]["test_accuracy"] == ""
    assert (work / "sweep.png").stat().st_size > 10_000
    table = proc.stdout.split("rank", 1)[1].splitlines()
    assert table[0].split()[:2] == ["test_accuracy", "test_loss"] and table[3].split()[-3:] == ["failed", "(exit", "2)"]

    # Lose one result: only that trial (and the failed one) runs again; cnn.main resumes from its checkpoint.
    (work / names[1] / "results.json").unlink()
    again = run_sweep(sweep_file, f"--workdir={work}", "--parallel=2")
    assert again.returncode == 1
    assert "3 trials, 1 already done, 2 to run, 2 at a time" in again.stdout
    assert first.stat().st_mtime == first_mtime
    log = (work / names[1] / "log.txt").read_text()
    assert log.count("=== ") == 2 and "resuming from the checkpoint at step 44" in log
    assert read_csv(work / "results.csv")[names[1]]["status"] == "done"


def test_sigterm_stops_trials_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    work = tmp_path / "sweep"
    sweep_file = write_sweep(tmp_path / "s.py", "product({'seed': [0]})", fixed="{'train.num_epochs': 20}")
    log = work / "seed=0" / "log.txt"
    proc = subprocess.Popen([sys.executable, "-m", "cnn.sweep", sweep_file, f"--workdir={work}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (log.exists() and "epoch   1/20" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "interrupted; 1 running trial(s) stopped" in out and "SIGTERM: saved a checkpoint" in log.read_text()
    assert read_csv(work / "results.csv")["seed=0"]["status"] == "stopped"

    # Resume with fewer epochs (extra --config flags reach every trial) so the test stays short.
    again = run_sweep(sweep_file, f"--workdir={work}", "--config.train.num_epochs=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from the checkpoint" in log.read_text()
    assert read_csv(work / "results.csv")["seed=0"]["status"] == "done"


@pytest.mark.skipif(not os.path.exists(REPO / "configs" / "fashion_mnist.py"), reason="no Fashion-MNIST config")
@pytest.mark.parametrize("name, count", [("digits_lr", 3), ("mnist_lr_batch", 12), ("fashion_architectures", 4)])
def test_shipped_sweeps_dry_run(tmp_path, name, count):
    from cnn.config import load_config as load

    if name == "fashion_architectures" and "preset" not in load(str(REPO / "configs" / "fashion_mnist.py")).model:
        pytest.skip("model.preset is not in this branch's config yet")
    proc = run_sweep(f"experiments/{name}.py", f"--workdir={tmp_path}", "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == count


def test_trial_folders_from_other_settings_are_refused(tmp_path, capsys):
    sweep_file = write_sweep(tmp_path / "s.py", "product({'seed': [0]})")
    (tmp_path / "w" / "seed=0").mkdir(parents=True)
    (tmp_path / "w" / "seed=0" / "trial.json").write_text(json.dumps(
        {"config": "configs/digits.py", "overrides": {"train.num_epochs": "5", "seed": "0"}}))
    assert sweep_lib.main([sweep_file, f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert "seed=0 was run with other settings" in err and "use a new --workdir" in err


def test_plot_of_a_random_search_and_names(tmp_path):
    """Plotting needs only the rows: many distinct values become a scatter, names become labelled positions."""
    trials = sweep_lib.sample(12, {"optimizer.learning_rate": sweep_lib.log_uniform(1e-4, 1), "model.preset": [
        "flax_cnn", "lenet5", "vgg"]}, seed=3)
    rows = [{"trial": sweep_lib.trial_name(t), "status": "done", **t, "test_accuracy": 0.5 + i / 30}
            for i, t in enumerate(trials)] + [{"trial": "x", "status": "failed (exit 1)",
                                               "optimizer.learning_rate": 0.5, "model.preset": "vgg"}]
    sweep = sweep_lib.Sweep("s.py", "c.py", "c.py", trials, {}, "test_accuracy", "max")
    sweep_lib.plot(rows, sweep, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert sweep_lib.ranked(rows, "test_accuracy", "max")[-1]["trial"] == "x"
    assert "rank" in sweep_lib.format_table(rows, sweep).splitlines()[0]
