"""Saving and restoring the train state with orbax-checkpoint.

Orbax writes each step to a temporary folder and renames it when complete,
so an interrupted save never looks like a valid checkpoint.
"""

from __future__ import annotations

import os

import jax


def _manager(workdir: str, create: bool = True):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3, create=create))


def _arrays(state) -> dict:
    """The arrays of a TrainState (its functions and static fields are rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "dropout_rng": jax.random.key_data(state.dropout_rng)}


def save(workdir: str, state) -> None:
    import orbax.checkpoint as ocp

    with _manager(workdir) as manager:
        manager.save(int(state.step), args=ocp.args.StandardSave(_arrays(state)))
        manager.wait_until_finished()


def restore(workdir: str, state):
    """Returns `state` (a freshly created one, giving structure) with the latest checkpoint's arrays."""
    import orbax.checkpoint as ocp

    with _manager(workdir, create=False) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _arrays(state))
        arrays = manager.restore(step, args=ocp.args.StandardRestore(target))
    return state.replace(step=arrays["step"], params=arrays["params"], batch_stats=arrays["batch_stats"],
                         opt_state=arrays["opt_state"], dropout_rng=jax.random.wrap_key_data(arrays["dropout_rng"]))
