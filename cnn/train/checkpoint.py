"""Checkpoints of the train state with orbax-checkpoint, and resuming from them.

Orbax writes each step to a temporary folder and renames it when complete,
so a process killed mid-save never leaves a checkpoint that looks valid.
A checkpoint holds every array a step depends on (parameters, optimizer
state, batch statistics, step, dropout key) plus the running sums of the
current epoch's metrics, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from cnn.errors import ConfigError


def _arrays(state, epoch_sums: dict[str, jax.Array]) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "dropout_rng": jax.random.key_data(state.dropout_rng),
            "epoch_sums": epoch_sums}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


class Checkpoints:
    """The checkpoints of one workdir: save, and restore the newest one that is intact."""

    def __init__(self, workdir: str, keep: int = 3):
        import orbax.checkpoint as ocp  # here: it adds about half a second to `import cnn`

        self._ocp = ocp
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        # Synchronous saves: the next train step donates the state's buffers.
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state, epoch_sums: dict[str, jax.Array]) -> None:
        step = int(state.step)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=self._ocp.args.StandardSave(_arrays(state, epoch_sums)))

    def restore(self, state) -> tuple[Any, dict[str, jax.Array]] | None:
        """Returns (state, epoch_sums) from the newest intact checkpoint, or None if there is none.

        `state` is a freshly created one; it gives the structure and the
        shapes the checkpoint must have. A damaged checkpoint is reported and
        moved to WORKDIR/damaged_checkpoints/, and the one before it is used.
        """
        zeros = {"loss": jnp.zeros((), jnp.float32), "accuracy": jnp.zeros((), jnp.float32)}
        target = _arrays(state, zeros)
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                saved = self._manager.item_metadata(step).tree
            except Exception as e:  # unreadable metadata: damaged
                self._set_aside(step, e)
                continue
            self._check_model(step, saved, target)
            try:
                abstract = jax.tree_util.tree_map(self._ocp.utils.to_shape_dtype_struct, target)
                arrays = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
            except Exception as e:  # truncated or corrupted files
                self._set_aside(step, e)
                continue
            restored = state.replace(step=arrays["step"], params=arrays["params"],
                                     batch_stats=arrays["batch_stats"], opt_state=arrays["opt_state"],
                                     dropout_rng=jax.random.wrap_key_data(arrays["dropout_rng"]))
            return restored, arrays["epoch_sums"]
        return None

    def _check_model(self, step: int, saved: dict, target: dict) -> None:
        """Refuses a checkpoint made by a different model, naming the shapes that differ."""
        saved_shapes = {**_shapes(saved.get("params", {})), **_shapes(saved.get("batch_stats", {}))}
        wanted = {**_shapes(target["params"]), **_shapes(target["batch_stats"])}
        if saved_shapes == wanted:
            saved_opt = sorted(map(str, _shapes(saved.get("opt_state", {})).values()))
            if saved_opt != sorted(map(str, _shapes(target["opt_state"]).values())):
                raise ConfigError(
                    f"optimizer: the checkpoint at step {step} in {self.directory} was made with a different "
                    "optimizer (its state has other arrays); use the optimizer.name that made it, or a new --workdir")
            return
        diffs = [f"{name}: checkpoint {saved_shapes.get(name, 'absent')}, config {wanted.get(name, 'absent')}"
                 for name in sorted(set(saved_shapes) | set(wanted)) if saved_shapes.get(name) != wanted.get(name)]
        raise ConfigError(
            f"model.layers: the checkpoint at step {step} in {self.directory} was made by a different model "
            f"({len(diffs)} parameter shapes differ: {'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''}); "
            "use the config that made it, or a new --workdir")

    def _set_aside(self, step: int, error: Exception) -> None:
        where = os.path.join(self.workdir, "damaged_checkpoints", f"{step}-{int(time.time())}")
        os.makedirs(os.path.dirname(where), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), where)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        print(f"warning: checkpoint at step {step} is damaged ({type(error).__name__}: {first_line}); "
              f"moved it to {where} and trying the one before", file=sys.stderr, flush=True)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()
