"""Crash, pre-emption and damage: a rerun of the same command ends exactly as an uninterrupted run."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import cnn
from cnn import train
from conftest import REPO

# 16x16 digits in batches of 16: 89 steps an epoch, slow enough to be killed mid-run; two epochs, so that a
# resume crosses an epoch's end.
ARGS = ["--config=configs/digits.py", "--config.train.num_epochs=2", "--config.train.batch_size=16",
        "--config.data.image_size=(16, 16)", "--config.train.checkpoint_every_steps=7",
        "--config.train.keep_checkpoints=2", "--config.train.log_every_steps=5",  # windows that cross checkpoints
        "--config.train.pictures=False",  # not what these tests are about, and ~5 s of matplotlib a run
        "--config.model.layers=('Conv2D(16, 3, activation=\"relu\")', "
        "'MaxPooling2D(2)', 'Dropout(0.2)', 'Flatten()', 'Dense(64, activation=\"relu\")', 'Dense(10)')"]
TIMING = {"epoch_seconds", "images_per_second", "input_seconds", "elapsed_seconds", "time"}


def start(workdir, *extra, fault=None):
    """`fault`: $CNN_FAULT for the run (cnn/workdir.py), e.g. 'enospc:checkpoints:3'."""
    env = {**os.environ, "CNN_FAULT": fault} if fault else None
    return subprocess.Popen([sys.executable, "-m", "cnn.main", *ARGS, f"--workdir={workdir}", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(workdir, *extra):
    proc = start(workdir, *extra)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, err


def fails(workdir, fault=None):
    """Runs to an error; returns its one `error:` line."""
    proc = start(workdir, fault=fault)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    return line


def metrics(workdir, name="metrics.jsonl"):
    with open(workdir / name) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def final_params(workdir):
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.data.image_size = (16, 16)
    config.model.layers = ("Conv2D(16, 3, activation='relu')", "MaxPooling2D(2)", "Dropout(0.2)", "Flatten()",
                           "Dense(64, activation='relu')", "Dense(10)")
    model = cnn.build_model(config.model)
    fresh = train.create_state(model, train.make_optimizer(config.optimizer, 89, 2), (16, 16, 1), 0)
    state, _ = cnn.checkpoint.Checkpoints(str(workdir)).restore(fresh)
    return int(state.step), state.params, state.opt_state


def saved_steps(workdir):
    """Finished checkpoints only (orbax writes into NAME.orbax-checkpoint-tmp first)."""
    folder = workdir / "checkpoints"
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if folder.exists() else []


def wait_for_checkpoint(workdir, after_step, proc):
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(s >= after_step for s in saved_steps(workdir)):
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    finish(workdir)
    return workdir


def assert_same_run(workdir, reference):
    assert metrics(workdir) == metrics(reference)
    assert metrics(workdir, "steps.jsonl") == metrics(reference, "steps.jsonl")
    step, params, opt_state = final_params(workdir)
    ref_step, ref_params, ref_opt_state = final_params(reference)
    assert step == ref_step == 2 * 89
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, opt_state, ref_opt_state)
    assert json.loads((workdir / "results.json").read_text())["test_accuracy"] == \
        json.loads((reference / "results.json").read_text())["test_accuracy"]


# Two draws of the kill point (each a full run and a resume): test_killed_mid_save covers a kill inside a save.
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, reference, seed):
    kill_after = random.Random(seed).choice([7, 50, 89, 120, 150, 170])
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, kill_after, proc)
    time.sleep(random.Random(seed).random() * 0.05)  # anywhere, mid-save included
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "results.json").exists(), "the run finished before it could be killed"
    out, _ = finish(tmp_path)
    assert "resuming from the checkpoint at step" in out
    assert_same_run(tmp_path, reference)


def test_micro_batched_run_killed_then_resumed_is_bitwise_identical(tmp_path):
    """Gradient accumulation keeps nothing between steps: a resumed run equals an uninterrupted one (dropout too)."""
    micro = "--config.train.micro_batch_size=8"
    reference = tmp_path / "reference"
    out, _ = finish(reference, micro)
    assert "each step in 2 parts of 8" in out
    proc = start(tmp_path / "killed", micro)
    wait_for_checkpoint(tmp_path / "killed", 120, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "killed" / "results.json").exists(), "the run finished before it could be killed"
    out, _ = finish(tmp_path / "killed", micro)
    assert "resuming from the checkpoint at step" in out
    assert_same_run(tmp_path / "killed", reference)


def test_sigterm_saves_and_exits_cleanly(tmp_path, reference):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, 30, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err
    assert "SIGTERM: saved a checkpoint at step" in err and "run the same command to resume" in err
    finish(tmp_path)
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_and_the_same_command_resumes_bitwise(tmp_path, reference, presses):
    """Ctrl-C is a clean stop, as SIGTERM is; a second Ctrl-C while it saves still leaves a whole checkpoint."""
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, 30, proc)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Ctrl-C: saved a checkpoint at step" in err and "run the same command to resume" in err
    finish(tmp_path)
    assert_same_run(tmp_path, reference)


def files_of(folder):
    """Every file under `folder` with its bytes."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_rerun_with_a_changed_config_is_refused_and_touches_nothing(tmp_path, reference):
    """A workdir's config.json is the config of its checkpoints: a field that changes the computation is refused,
    naming both values, and every file stays byte-identical; a field that does not is taken and recorded."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    assert not (workdir / ".lock").exists()  # a clean end leaves no lock file
    before = files_of(workdir)
    proc = start(workdir, "--config.optimizer.learning_rate=0.01", "--config.train.batch_size=32")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err
    (line,) = [l for l in err.splitlines() if l.startswith("error: ")]
    assert "optimizer.learning_rate=0.01 (config.json: 0.003)" in line and \
        "train.batch_size=32 (config.json: 16)" in line and "new --workdir" in line, line
    assert files_of(workdir) == before
    out, _ = finish(workdir, "--config.train.log_every_steps=0", "--config.train.eval_batch_size=100")
    assert "resuming from the checkpoint at step 178" in out
    saved = json.loads((workdir / "config.json").read_text())["train"]
    assert (saved["log_every_steps"], saved["eval_batch_size"]) == (0, 100)


def test_finished_run_rerun_changes_nothing(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)  # a finished run
    before = metrics(tmp_path)
    out, _ = finish(tmp_path)
    assert "resuming from the checkpoint at step 178" in out and "\nepoch " not in out
    assert metrics(tmp_path) == before


def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    latest = max(saved_steps(tmp_path))
    for root, _, files in os.walk(tmp_path / "checkpoints" / str(latest)):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    os.remove(tmp_path / "results.json")
    out, err = finish(tmp_path)
    assert f"checkpoint at step {latest} is damaged" in err
    assert "resuming from the checkpoint at step" in out and "\nepoch   2/2" in out  # the epoch's end again
    assert len(os.listdir(tmp_path / "damaged_checkpoints")) == 1  # set aside, not deleted
    assert_same_run(tmp_path, reference)


def test_checkpoint_of_another_model_is_refused(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    args = [a for a in ARGS if not a.startswith("--config.model.layers")]
    proc = subprocess.run([sys.executable, "-m", "cnn.main", *args, f"--workdir={tmp_path}",
                           "--config.model.layers=('Conv2D(8, 3)', 'Flatten()', 'Dense(10)')"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err
    assert "holds checkpoints of another config: model.layers=" in err
    os.remove(tmp_path / "config.json")  # without it, the checkpoint's own shapes still refuse the model
    proc = subprocess.run(proc.args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "was made by a different model" in proc.stderr
    assert "conv2d/kernel: checkpoint (3, 3, 1, 16), config (3, 3, 1, 8)" in proc.stderr
    proc = start(tmp_path, "--config.optimizer.name=sgd")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "was made with a different optimizer" in err
    assert not (tmp_path / "damaged_checkpoints").exists()  # refused, not mistaken for damage


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "config.json")  # as in a workdir from before config.json: the rerun is not compared
    proc = start(tmp_path, "--config.optimizer.learning_rate=1e30", "--config.train.num_epochs=3")  # one epoch more
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("error: ")][0]
    assert "the training loss became nan at step" in line and "the last good checkpoint (step 178) is kept" in line
    assert int(line.split(" at step ")[1].split()[0]) > 178
    assert max(saved_steps(tmp_path)) == 178
    step, params, _ = final_params(tmp_path)  # still restores, and is finite
    assert step == 178 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------
# One run per workdir, full disks, and a kill in the middle of a save.


def test_killed_mid_save_the_lock_is_taken_over_a_second_run_refused_and_the_rerun_resumes(tmp_path, reference):
    """SIGKILL once the third checkpoint's files are written but before orbax renames them into place; then,
    while the rerun trains, another run on the same workdir is refused and the rerun goes on unharmed."""
    killed = start(tmp_path, fault="kill:checkpoints:3")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert saved_steps(tmp_path) == [7, 14] and (tmp_path / "checkpoints" / "21.orbax-checkpoint-tmp").is_dir()
    rerun = start(tmp_path)
    wait_for_checkpoint(tmp_path, 21, rerun)
    second = subprocess.run([sys.executable, "-m", "cnn.main", *ARGS, f"--workdir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: workdir='{tmp_path}' is in use by another run: PID {rerun.pid} on "
                                    f"{socket.gethostname()} (since ")
    assert "\nepoch " not in second.stdout and rerun.poll() is None
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "resuming from the checkpoint at step 14 " in out
    assert f"note: taking over {tmp_path / '.lock'} from PID {killed.pid} on {socket.gethostname()}" in err
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if "tmp" in d]  # the unfinished save cleared
    assert_same_run(tmp_path, reference)


def test_full_disk_at_each_write_stops_in_one_line_and_the_rerun_ends_as_if_nothing_happened(tmp_path, reference):
    """ENOSPC injected at a checkpoint (files written, rename refused), a metrics record and results.json."""
    line = fails(tmp_path, "enospc:checkpoints:3")
    assert line.startswith(f"error: could not write {tmp_path}/checkpoints/21: No space left on device [errno 28]")
    assert "run the same command to resume" in line
    assert saved_steps(tmp_path) == [7, 14]  # keep_checkpoints=2: the failed save dropped neither
    # The metrics file's first write is its rewrite at start; the second, the resumed run's first record.
    line = fails(tmp_path, "enospc:metrics.jsonl:2")
    assert line.startswith(f"error: could not write {tmp_path}/metrics.jsonl: No space left on device")
    assert saved_steps(tmp_path) == [77, 84] and metrics(tmp_path) == []
    line = fails(tmp_path, "enospc:results.json:1")
    assert line.startswith(f"error: could not write {tmp_path}/results.json: No space left on device")
    assert not (tmp_path / "results.json").exists() and max(saved_steps(tmp_path)) == 2 * 89
    finish(tmp_path)
    assert_same_run(tmp_path, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.8 MB tmpfs: room for two checkpoints of this model (~0.6 MB each) but not for the third, which orbax
    writes before it rotates the oldest out. Needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1856k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"could not mount a tmpfs: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_stops_in_one_line_and_keeps_the_checkpoints_before(small_disk):
    """A resumed run ending as an uninterrupted one is the test above's; here the disk is really full."""
    workdir = small_disk / "w"
    line = fails(workdir)
    failed = int(line.split(f"could not write {workdir}/checkpoints/")[1].split(":")[0])
    assert "No space left on device" in line and "run the same command to resume" in line, line
    assert saved_steps(workdir) == [failed - 14, failed - 7]
    step, params, _ = final_params(workdir)  # the newest restores, intact
    assert step == failed - 7 and all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
