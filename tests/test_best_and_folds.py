"""train.monitor, train.keep_best, train.early_stopping_patience, and k-fold cross-validation (cnn.cross_validate,
--folds=K), on digits with a small model: real training, a few epochs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import cnn
from cnn import train
from cnn.config import ConfigError
from cnn.train import folds as folds_lib
from cnn.train.monitor import Monitor
from conftest import REPO

LAYERS = ("Flatten()", "Dense(32, activation='relu')", "Dense(10)")
STEPS = 1437 // 64  # digits' training split in batches of 64: steps per epoch
FOLD_STEPS = (1437 - 1437 // 5) // 64  # the same for four fifths of it
TIMING = {"epoch_seconds", "images_per_second", "input_seconds", "elapsed_seconds", "time", "train_seconds",
          "total_seconds", "startup_seconds", "input_share"}
# The monitored test_accuracy the scripted runs record per epoch: best at 3, then 3 epochs without a (strict)
# improvement, so patience 3 stops after epoch 6; later epochs would have improved.
SCRIPT = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.65, 5: 0.7, 6: 0.6, 7: 0.9, 8: 0.95}


def digits_config(epochs=8, **train_fields):
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.model.layers = LAYERS
    config.train.update(num_epochs=epochs, batch_size=64, checkpoint_every_steps=0, log_every_steps=0,
                        pictures=False, keep_checkpoints=10, **train_fields)
    return config


@pytest.fixture
def scripted(monkeypatch):
    """The training and evaluation are real; the monitored metric each epoch records is SCRIPT's."""
    check = Monitor.check

    def scripted_check(self, record):
        record[self.name] = SCRIPT[record["epoch"]]
        check(self, record)

    monkeypatch.setattr(Monitor, "check", scripted_check)


def records(workdir, name="metrics.jsonl"):
    with open(os.path.join(workdir, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in TIMING}


def restore(workdir, folder="checkpoints", at=None):
    config = digits_config()
    fresh = train.create_state(cnn.build_model(config.model), train.make_optimizer(config.optimizer, STEPS, 8),
                               (8, 8, 1), 0)
    checkpoints = cnn.checkpoint.Checkpoints(str(workdir), folder=folder)
    try:
        return checkpoints.restore(fresh, at=at)[0]
    finally:
        checkpoints.close()


def assert_same_tree(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


class Stop(Exception):
    pass


def stop_at(epoch):
    def on_epoch_end(record):
        if record["epoch"] == epoch:
            raise Stop

    return on_epoch_end


def test_the_monitor_judges_epochs_by_their_records():
    """Strict improvements only, the first of equal values, NaN never best; losses lower, the rest higher."""
    history = [{"epoch": e, "test_accuracy": a, "test_loss": l}
               for e, a, l in [(1, 0.5, 1.0), (2, 0.7, float("nan")), (3, 0.7, 0.8), (4, 0.6, 0.9)]]
    by_accuracy = Monitor(digits_config(early_stopping_patience=2), "/nonexistent")
    assert by_accuracy.best(history)["epoch"] == 2
    assert [by_accuracy.should_stop(history[:n]) for n in range(1, 5)] == [False, False, False, True]
    by_loss = Monitor(digits_config(monitor="test_loss", early_stopping_patience=2), "/nonexistent")
    assert by_loss.best(history)["epoch"] == 3 and not by_loss.should_stop(history)
    assert by_loss.results(history[:2]) == {"monitor": "test_loss", "best_epoch": 1, "best_test_loss": 1.0,
                                            "stopped_early": True, "best_checkpoint": False}
    # Reaching num_epochs is the run's end, not an early stop.
    assert not Monitor(digits_config(epochs=4, early_stopping_patience=1), "/nonexistent").should_stop(history)
    assert not Monitor(digits_config(), "/nonexistent").should_stop(history)  # patience 0: off


def test_early_stopping_stops_at_the_right_epoch_and_a_resumed_run_ends_the_same(tmp_path, scripted, capsys):
    config = digits_config(early_stopping_patience=3, keep_best=True)
    run = cnn.train_and_evaluate(config, str(tmp_path / "whole"))
    assert "early stopping after epoch 6 of 8: test_accuracy has not improved for 3 epochs since epoch 3 " \
           "(test_accuracy 0.7)" in capsys.readouterr().out
    whole = records(tmp_path / "whole")
    assert [r["epoch"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert {k: results(tmp_path / "whole")[k] for k in ("epochs", "steps", "stopped_early", "best_epoch", "monitor",
                                                        "best_test_accuracy")} == {
        "epochs": 6, "steps": 6 * STEPS, "stopped_early": True, "best_epoch": 3, "monitor": "test_accuracy",
        "best_test_accuracy": 0.7}
    assert_same_tree(run.state.params, restore(tmp_path / "whole", at=3 * STEPS).params)  # the best epoch's state

    resumed = str(tmp_path / "resumed")
    with pytest.raises(Stop):  # killed after epoch 4's record and checkpoint
        cnn.train_and_evaluate(config, resumed, on_epoch_end=stop_at(4))
    cnn.train_and_evaluate(config, resumed)
    assert records(resumed) == whole and results(resumed) == results(tmp_path / "whole")
    assert_same_tree(restore(resumed).params, restore(tmp_path / "whole").params)
    assert int(restore(resumed).step) == 6 * STEPS

    capsys.readouterr()
    cnn.train_and_evaluate(config, resumed)  # a finished, stopped run: nothing more
    assert "early stopping after epoch 6 of 8" in capsys.readouterr().out
    assert records(resumed) == whole and int(restore(resumed).step) == 6 * STEPS

    cnn.train_and_evaluate(digits_config(), str(tmp_path / "off"))  # patience 0: every epoch
    assert [r["epoch"] for r in records(tmp_path / "off")] == list(range(1, 9))
    assert not results(tmp_path / "off")["stopped_early"] and results(tmp_path / "off")["best_epoch"] == 8


def test_keep_best_keeps_the_best_epochs_state_and_prediction_uses_it(tmp_path, capsys):
    """By the real test loss (lower is better): the best checkpoint is that epoch's checkpoint, and load_run and
    predict take it, saying so."""
    workdir = str(tmp_path)
    run = cnn.train_and_evaluate(digits_config(epochs=6, monitor="test_loss", keep_best=True), workdir)
    losses = [r["test_loss"] for r in records(workdir)]
    best = int(np.argmin(losses)) + 1
    assert results(workdir)["best_epoch"] == best and results(workdir)["best_test_loss"] == min(losses)
    assert os.listdir(tmp_path / "best_checkpoint") == [str(best * STEPS)]
    kept = restore(workdir, "best_checkpoint")
    assert int(kept.step) == best * STEPS
    assert_same_tree(kept.params, restore(workdir, at=best * STEPS).params)
    assert_same_tree(run.state.params, kept.params)

    capsys.readouterr()
    loaded = cnn.load_run(workdir)
    assert f"using the best checkpoint (epoch {best} of 6, test_loss" in capsys.readouterr().err
    assert_same_tree(loaded.state.params, kept.params)
    latest = cnn.load_run(workdir, checkpoint="latest")
    assert int(latest.state.step) == 6 * STEPS
    images = run.dataset.test.images[:50]
    predicted = cnn.predict(workdir, images, top_k=1)
    assert predicted == cnn.predict(loaded, images, top_k=1)
    from cnn.inference.predict import probabilities
    assert not np.array_equal(probabilities(loaded, images), probabilities(latest, images)) or best == 6


def test_monitor_mistakes_are_one_line_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"train.monitor='accuracy' is not valid: expected a metric of the epoch "
                                          r"records: one of test_accuracy, test_loss, macro_f1"):
        cnn.train_and_evaluate(digits_config(monitor="accuracy"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"train.monitor='roc_auc' is not recorded for 10 classes"):
        cnn.train_and_evaluate(digits_config(monitor="roc_auc", keep_best=True), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"train.early_stopping_patience=-1 is not valid"):
        cnn.train_and_evaluate(digits_config(early_stopping_patience=-1), str(tmp_path / "c"))
    assert not os.listdir(tmp_path)  # refused before a workdir was made


def test_folds_partition_the_training_data_and_are_stratified():
    labels = cnn.load_dataset(digits_config().data).train.labels
    splits = folds_lib.fold_indices(labels, 5, seed=0)
    validation = np.concatenate([v for _, v in splits])
    assert len(splits) == 5 and np.array_equal(np.sort(validation), np.arange(len(labels)))  # each index once
    for train_rows, val_rows in splits:
        assert np.array_equal(np.sort(np.concatenate([train_rows, val_rows])), np.arange(len(labels)))
        for value in np.unique(labels):
            share = np.mean(labels == value) * len(val_rows)  # the class's examples a fold of this size should hold
            assert abs(np.sum(labels[val_rows] == value) - share) <= 1
    again, other = folds_lib.fold_indices(labels, 5, seed=0), folds_lib.fold_indices(labels, 5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits, other))


def test_fold_count_mistakes():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError, match=r"--folds=1: cross-validation needs at least 2 folds"):
        folds_lib.fold_indices(labels, 1, 0)
    with pytest.raises(ConfigError, match=r"--folds=4 is more than the 3 training examples of class 'b', the "
                                          r"smallest class.*use at most --folds=3"):
        folds_lib.fold_indices(labels, 4, 0, ["a", "b"])


def test_cross_validate_from_a_notebook(tmp_path, capsys):
    """Fold datasets come from the loaded one; cv_results.json holds each fold and the mean and std."""
    config = digits_config(epochs=1)
    summary = cnn.cross_validate(config, str(tmp_path), folds=2)
    out = capsys.readouterr().out
    assert "fold 1/2: training on 718, validating on 719 examples" in out and "fold 2/2: test_accuracy" in out
    assert summary == json.loads((tmp_path / "cv_results.json").read_text())
    accuracy = [results(tmp_path / f"fold_{k}")["test_accuracy"] for k in (1, 2)]
    assert summary["complete"] and [r["test_accuracy"] for r in summary["fold_results"]] == accuracy
    assert summary["mean"]["test_accuracy"] == pytest.approx(np.mean(accuracy))
    assert summary["std"]["test_accuracy"] == pytest.approx(np.std(accuracy))
    assert sum(r["validation_examples"] for r in summary["fold_results"]) == 1437
    with pytest.raises(ConfigError, match=r"is a cross-validation with --folds=2 and seed=0, not --folds=3"):
        cnn.cross_validate(config, str(tmp_path), folds=3)


def run_cli(workdir, *extra, env=None):
    return subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={workdir}",
                           f"--config.model.layers={LAYERS!r}", "--config.train.pictures=False",
                           "--config.train.batch_size=64", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow
def test_five_folds_on_the_command_line_and_a_rerun_after_an_interrupted_fold_resumes(tmp_path):
    args = ("--folds=5", "--config.train.num_epochs=2", "--config.train.checkpoint_every_steps=0")
    # metrics.jsonl's 6th write: fold 2's second epoch record (each fold writes it at its start and each epoch).
    killed = run_cli(tmp_path, *args, env={**os.environ, "CNN_FAULT": "kill:metrics.jsonl:6"})
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "fold_1" / "results.json").exists() and not (tmp_path / "fold_2" / "results.json").exists()
    fold_1 = (tmp_path / "fold_1" / "metrics.jsonl").read_text()

    proc = run_cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from the checkpoint at step {FOLD_STEPS} " in proc.stdout.split("fold 2/5: training")[1]
    assert (tmp_path / "fold_1" / "metrics.jsonl").read_text() == fold_1  # finished: not trained again
    assert all(f"fold {k}/5: test_accuracy" in proc.stdout for k in range(1, 6))
    summary = json.loads((tmp_path / "cv_results.json").read_text())
    assert summary["folds"] == 5 and summary["complete"] and len(summary["fold_results"]) == 5
    accuracy = [results(tmp_path / f"fold_{k}")["test_accuracy"] for k in range(1, 6)]
    assert summary["mean"]["test_accuracy"] == pytest.approx(np.mean(accuracy)) and np.mean(accuracy) > 0.5
    assert summary["std"]["test_accuracy"] == pytest.approx(np.std(accuracy))
    assert [len(records(tmp_path / f"fold_{k}")) for k in range(1, 6)] == [2] * 5
    assert f"test_accuracy {np.mean(accuracy):.4f} ± {np.std(accuracy):.4f}" in proc.stdout


def test_fold_mistakes_on_the_command_line_are_one_line(tmp_path):
    proc = run_cli(tmp_path / "w", "--folds=1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --folds=1: cross-validation needs at least 2 folds (5 or 10 are usual)"]
    assert not (tmp_path / "w").exists()


def test_a_sweep_can_optimise_the_fold_mean(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from cnn.cli import sweep as sweep_cli
    from cnn.sweep.space import load_sweep

    def sweep_file(folds):
        path = tmp_path / f"cv{folds}.py"
        path.write_text(f"def get_sweep():\n    return dict(config='configs/digits.py', folds={folds}, fixed="
                        "{'train.num_epochs': 1, 'model.layers': ('Flatten()', 'Dense(10)'), 'train.pictures': False},"
                        " trials=[{'optimizer.learning_rate': 0.003}])\n")
        return str(path)

    with pytest.raises(ConfigError, match=r"cv1.py: folds=1 is not valid: expected an integer >= 2"):
        load_sweep(sweep_file(1))
    work = tmp_path / "w"
    assert sweep_cli.main(["cnn.sweep", sweep_file(2), f"--workdir={work}"]) == 0
    study = optuna.load_study(study_name="cv2", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(work / "journal.log"))))
    (trial,) = study.get_trials()
    summary = json.loads((work / "learning_rate=0.003" / "cv_results.json").read_text())
    assert summary["folds"] == 2 and summary["complete"]
    assert trial.value == summary["mean"]["test_accuracy"] != summary["fold_results"][0]["test_accuracy"]
    assert trial.user_attrs["results"]["test_loss"] == summary["mean"]["test_loss"]
