"""Checkpoints of the train state with orbax-checkpoint, and resuming from them.

Orbax writes each step to a temporary folder and renames it when complete,
so a process killed mid-save never leaves a checkpoint that looks valid; a
save that fails (a full disk) raises before the older checkpoints are
rotated out, so the newest good one stays.
A checkpoint holds every array a step depends on (parameters, optimizer
state, batch statistics, step, dropout key, the parameters' moving average
if one is kept) plus the running sums of the
current epoch's metrics, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax

from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
from cnn.train.state import EpochSums


def _arrays(state, epoch_sums: EpochSums) -> dict[str, Any]:
    arrays = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
              "opt_state": state.opt_state, "dropout_rng": jax.random.key_data(state.dropout_rng),
              "epoch_sums": epoch_sums._asdict()}
    if state.ema_params is not None:  # train.ema_decay > 0: the moving average resumes exactly too
        arrays["ema_params"] = state.ema_params
    return arrays


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


class Checkpoints:
    """The checkpoints of one workdir: save, and restore the newest one that is intact."""

    def __init__(self, workdir: str, keep: int = 3, owner: bool = False, folder: str = workdir_lib.CHECKPOINTS):
        """`owner`: the run holding the workdir's lock, which saves; it also clears what unfinished saves left.
        `folder`: WORKDIR/checkpoints, or WORKDIR/best_checkpoint for the best epoch's state."""
        self.workdir = os.path.abspath(workdir)
        self.folder = folder
        self.directory = os.path.join(self.workdir, folder)
        self._keep, self._owner, self._manager_made = keep, owner, None

    @property
    def _manager(self):
        """Orbax's manager, made at first use: a fresh run needs none before its first save, and importing orbax
        takes a tenth of a second or more of start-up."""
        if self._manager_made is None:
            import orbax.checkpoint as ocp

            self._ocp = ocp
            # Synchronous saves: the next train step donates the state's buffers.
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=False, cleanup_tmp_directories=self._owner,
                temporary_path_class=_faulty_rename() if self._owner and workdir_lib.faults_at(
                    workdir_lib.CHECKPOINTS) else None)
            self._manager_made = ocp.CheckpointManager(self.directory, item_handlers=ocp.StandardCheckpointHandler(),
                                                       options=options)
        return self._manager_made

    def latest_step(self) -> int | None:
        if self._manager_made is None and not workdir_lib.has_checkpoints(self.workdir, self.folder):
            return None
        return self._manager.latest_step()

    def save(self, state, epoch_sums: EpochSums) -> None:
        """Saves the step's checkpoint; a failed write (a full disk) is `WriteFailed`, the older ones kept."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        arrays = _arrays(state, epoch_sums)
        self._check_space(step, arrays)
        try:
            with _quiet_orbax():
                self._manager.save(step, args=self._ocp.args.StandardSave(arrays))
        except Exception as e:  # noqa: BLE001 - OSError from Python, ValueError from TensorStore: same failure
            cause = _write_error(e)
            if cause is None:
                raise
            raise workdir_lib.write_failed(os.path.join(self.directory, str(step)), cause) from None

    def _check_space(self, step: int, arrays: dict[str, Any]) -> None:
        """Refuses a save the disk has no room for before orbax starts it: orbax's own failure mid-write is
        raised cleanly but leaves its threads to print their tracebacks too."""
        need = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(arrays)) * 1.05 + _SAVE_OVERHEAD
        try:
            disk = os.statvfs(self.directory)
        except OSError:
            return  # not made yet, or not a local filesystem: orbax reports what goes wrong
        free = disk.f_bavail * disk.f_frsize
        if free < need:
            raise workdir_lib.write_failed(
                os.path.join(self.directory, str(step)),
                OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a checkpoint needs about {need / 2**20:.1f} "
                                      f"MB, {free / 2**20:.1f} MB are free)"))

    def restore(self, state, at: int | None = None) -> tuple[Any, EpochSums] | None:
        """Returns (state, epoch_sums) from the newest intact checkpoint (or the one of step `at`), or None if
        there is none.

        `state` is a freshly created one; it gives the structure and the
        shapes the checkpoint must have. A damaged checkpoint is reported and
        moved to WORKDIR/damaged_checkpoints/, and the one before it is used.
        """
        if not workdir_lib.has_checkpoints(self.workdir, self.folder):
            return None
        target = _arrays(state, jax.device_put(EpochSums.zeros()))
        for step in sorted((s for s in self._manager.all_steps() if at in (None, s)), reverse=True):
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
                                     dropout_rng=jax.random.wrap_key_data(arrays["dropout_rng"]),
                                     ema_params=arrays.get("ema_params"))
            return restored, EpochSums(**arrays["epoch_sums"])
        return None

    def newest_variables(self) -> dict | None:
        """The newest checkpoint's params and batch_stats as saved, with no model to give their structure (a warm
        start of another run: cnn.train.finetune); None if there is no checkpoint."""
        step = self.latest_step()
        if step is None:
            return None
        arrays = self._manager.restore(step)
        return {"params": arrays["params"], "batch_stats": arrays["batch_stats"]}

    def _check_model(self, step: int, saved: dict, target: dict) -> None:
        """Refuses a checkpoint made by a different model, naming the shapes that differ (or with or without a
        moving average of the parameters where the config asks otherwise)."""
        if ("ema_params" in saved) != ("ema_params" in target):
            raise ConfigError(f"train.ema_decay: the checkpoint at step {step} in {self.directory} was made "
                              f"{'with' if 'ema_params' in saved else 'without'} a moving average of the parameters; "
                              "use the train.ema_decay that made it, or a new --workdir")
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
        if self._manager_made is not None:
            self._manager.close()


_SAVE_OVERHEAD = 256 * 1024  # bytes of a checkpoint beyond its arrays: metadata files, each a block or more
# What a failed write says when TensorStore (C++) reports it as a ValueError instead of an OSError.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def _write_error(error: Exception) -> OSError | None:
    """The OSError behind a failed save: the error itself, or one rebuilt from TensorStore's message
    ('RESOURCE_EXHAUSTED: ... Failed to write ...: No space left on device'); None for any other failure."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    code = next((c for c in _WRITE_ERRNOS if os.strerror(c) in text), None)
    return OSError(code, os.strerror(code)) if code is not None else None


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax's threads log a failed write with a traceback each before save() raises it: the error is raised
    (and reported once) anyway, so their copies are dropped."""
    def from_orbax(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(from_orbax)
    try:
        yield
    finally:
        absl_logger.removeFilter(from_orbax)


def _faulty_rename():
    """Orbax's rename of a finished save into place, with workdir.fault('checkpoints') first: $CNN_FAULT can make a
    save fail, or kill the process, once every file of it is written but before it becomes a checkpoint."""
    from orbax.checkpoint.path import atomicity

    class FaultyRename(atomicity.AtomicRenameTemporaryPath):
        async def finalize(self, *args, **kwargs):
            if self.get_final().name.isdigit():  # the step's folder, not an item's inside it
                workdir_lib.fault(workdir_lib.CHECKPOINTS)
            return await super().finalize(*args, **kwargs)

    return FaultyRename
