"""The orbax internals cnn/train/checkpoint.py relies on, pinned: if an orbax release changes them, this fails
loudly here instead of the fault-injection hook or the quiet log filter silently doing nothing."""

import inspect
import os

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_manager
from orbax.checkpoint.path import atomicity


def test_the_rename_hook_subclasses_a_class_orbax_still_uses():
    """checkpoint._faulty_rename subclasses AtomicRenameTemporaryPath and overrides its async finalize()."""
    cls = atomicity.AtomicRenameTemporaryPath
    assert inspect.iscoroutinefunction(cls.finalize), "orbax changed AtomicRenameTemporaryPath.finalize"
    assert callable(cls.get_final), "orbax removed AtomicRenameTemporaryPath.get_final"
    assert "temporary_path_class" in inspect.signature(ocp.CheckpointManagerOptions).parameters


def test_orbax_logs_through_absl_from_files_under_an_orbax_folder():
    """checkpoint._quiet_orbax drops ERROR records of the 'absl' logger whose file lies under an orbax folder."""
    assert f"{os.sep}orbax{os.sep}" in checkpoint_manager.__file__
    assert "from absl import logging" in inspect.getsource(checkpoint_manager)


def test_the_fault_hook_really_fires_inside_an_orbax_save(tmp_path, monkeypatch):
    """With CNN_FAULT naming checkpoints, a save fails at orbax's rename as a full disk would, and the newest
    checkpoint before it is kept: the hook is wired into orbax, not just defined."""
    import jax
    import numpy as np
    import pytest

    import cnn
    from cnn import train
    from cnn.errors import WriteFailed

    monkeypatch.setenv("CNN_FAULT", "enospc:checkpoints:2")
    model = cnn.build_model(["Flatten()", "Dense(3)"])
    state = train.create_state(model, train.make_optimizer(cnn.base_config().optimizer, 1, 1), (4, 4, 1), 0)
    state = jax.device_put(state.replace(step=np.int32(0)))  # on the devices, as a run saves it
    sums = train.EpochSums.zeros()
    checkpoints = cnn.checkpoint.Checkpoints(str(tmp_path), owner=True)
    checkpoints.save(state, sums)
    with pytest.raises(WriteFailed, match="No space left on device"):
        checkpoints.save(state.replace(step=jax.device_put(np.int32(1))), sums)
    assert checkpoints.latest_step() == 0
    checkpoints.close()
    restored, _ = cnn.checkpoint.Checkpoints(str(tmp_path)).restore(state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, state.params)
