"""Setting up a training run: from a config to data, model, state and compiled steps, all checked.

Everything that can be wrong with a config is found here, before the first
step: a bad value, a model that does not fit the data, a batch that does not
split over the devices, a checkpoint of another model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections

from cnn import config as config_lib
from cnn import data as data_lib
from cnn import kernels, losses, models, runtime, sharding
from cnn import workdir as workdir_lib
from cnn.errors import ConfigError
import cnn.train.finetune as finetune
import cnn.train.tta as tta
from cnn.train.checkpoint import Checkpoints
from cnn.train.monitor import check_recorded
from cnn.train.optimizer import host_learning_rate, learning_rate_schedule, make_optimizer
from cnn.train.state import EpochSums, TrainState, create_state
from cnn.train.steps import Recipe, TrainStepFn, compile_eval_step, compile_train_step


@dataclasses.dataclass(frozen=True)
class Training:
    """The plan of one training run, fixed before its first step: what it trains on, the model, the compiled
    steps, the sizes, where it writes. The loop's variables, the state and the epoch's sums, travel beside it
    (`prepare` returns their first values; the loop passes them on)."""

    config: ml_collections.ConfigDict  # compute_dtype='auto' resolved
    workdir: str
    writes_files: bool  # the process that writes files and prints (the only one unless several processes share a run)
    dataset: data_lib.Dataset
    model: models.Sequential
    recipe: Recipe
    mesh: jax.sharding.Mesh
    checkpoints: Checkpoints
    resumed: bool  # the first state came from a checkpoint
    steps_per_epoch: int
    steps_per_chunk: int  # batches staged on the devices at once
    eval_batch_size: int
    parts: int  # compiled calls per training step (train.micro_batch_size)
    train_fn: TrainStepFn  # compile_train_step's: (state, sums, chunk, chunk_start) -> (state, sums, loss)
    frozen_fn: TrainStepFn | None  # the same while train.freeze_epochs keeps the backbone frozen; None if it never is
    eval_fn: Callable[[TrainState, dict], dict]  # compile_eval_step's: (state, batch) -> sums over the batch
    learning_rate: Callable[[int], float]  # the rate of update `count` (0: the first), computed on the host
    start: float  # when the process started (wall clock): logged times count from it
    lock: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)  # the workdir's, held
    pretrained: str = ""  # the start-up line of a run from model.pretrained (cnn/train/finetune.py)

    def step_fn(self, epoch: int) -> TrainStepFn:
        """The compiled step of `epoch`: the frozen one for the first train.freeze_epochs epochs. The epoch, and so
        the step count, decides, as it does in the optimizer: a run resumed mid-way switches at the same step."""
        return self.frozen_fn if epoch <= self.config.train.get("freeze_epochs", 0) else self.train_fn

    def log(self, *args, **kwargs) -> None:
        """print(), flushed, in the process that writes files; nothing in the others."""
        if self.writes_files:
            print(*args, **kwargs, flush=True)


def prepare(config: ml_collections.ConfigDict, workdir: str, dataset: data_lib.Dataset | None = None,
            model: nn.Module | None = None) -> tuple[Training, TrainState, EpochSums]:
    """Checks the config, loads the data, builds the model (or takes `model`) and the state, and only then takes
    the workdir's lock and resumes from its checkpoints (refusing a config other than theirs). Returns the plan and
    the loop's first state and sums, on the devices. The lock stays held until `Training.lock` is closed
    (train_and_evaluate does); a refused start leaves no folder it created."""
    start = runtime.process_start_time()
    config_lib.validate(config)
    if model is None:
        models.check_config(config.model)
    config = models.record(config, model)  # as config.json will say: a module's file absolute, or `model` named
    # Before anything starts JAX's backend.
    runtime.set_cpu_devices(config.train.num_devices or kernels.cpu_devices(config.train.kernels,
                                                                            config.train.compute_dtype))
    runtime.use_compilation_cache()
    writes_files = jax.process_index() == 0
    if writes_files:
        workdir_lib.refuse_if_in_use(workdir)  # before minutes of data loading
    config, dataset, model, recipe, mesh, eval_batch_size, state, pretrained = _plan(config, dataset, model)
    with workdir_lib.removed_if_refused(workdir) if writes_files else contextlib.nullcontext(), \
            contextlib.ExitStack() as lock:  # the lock is released here if setting up fails
        if writes_files:  # one lock per run, however many processes
            workdir_lib.check_writable(workdir)
            lock.enter_context(workdir_lib.hold(workdir))
            check_same_config(workdir, config)
        training, state, sums = _build(config, workdir, dataset, model, recipe, mesh, eval_batch_size, state,
                                       writes_files, start)
        training = dataclasses.replace(training, lock=lock.pop_all(), pretrained=pretrained)
    return training, state, sums


def _plan(config: ml_collections.ConfigDict, dataset: data_lib.Dataset | None, model: nn.Module | None) -> tuple:
    """Everything that can be refused without touching the workdir: the data, the model against it, the recipe
    (class weights, mixing) against the data, the mesh against the batch sizes, and the fresh state (with
    model.pretrained's weights; and its start-up line). `config` comes back with compute_dtype='auto' and the
    pretrained weights' data.preprocessing resolved."""
    settings = config.train
    dataset = data_lib.load_dataset(config.data, config.seed) if dataset is None else \
        data_lib.conform(dataset, config.data)
    check_recorded(settings, dataset.num_classes)
    model = models.build_model(config.model, dataset.num_classes) if model is None else model
    loss = models.check_head(model, dataset.input_shape, dataset.num_classes, config.loss)
    tta.check(tta.configured(config), dataset)
    mesh, eval_batch_size = _mesh(config, len(dataset.train), len(dataset.test))
    platform = mesh.devices.flat[0].platform
    if settings.compute_dtype == "auto":  # config.json and the recipe record the dtype this run computes in
        config = config.copy_and_resolve_references()
        config.train.compute_dtype = kernels.compute_dtype(settings.compute_dtype, settings.kernels, platform)
    kernels.check(settings.kernels, config.train.compute_dtype, platform)
    class_weights = losses.resolve_class_weights(settings.get("class_weights"), dataset.train.labels,
                                                 dataset.num_classes)
    Recipe.from_config(config, loss).augmentation.check(dataset.train.images.dtype, dataset.train.images.ndim)
    steps_per_epoch = len(dataset.train) // settings.batch_size
    head = finetune.head(config, model, dataset.input_shape)
    tx = make_optimizer(config.optimizer, steps_per_epoch, settings.num_epochs, head, settings.get("freeze_epochs", 0))
    state = create_state(model, tx, dataset.input_shape, config.seed, settings.kernels, platform,
                         settings.get("ema_decay", 0.0))
    config, state, pretrained = finetune.start(config, model, state, head)
    recipe = Recipe.from_config(config, loss, class_weights)  # after start: it may set data.preprocessing
    return config, dataset, model, recipe, mesh, eval_batch_size, state, pretrained


def check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to continue a workdir's checkpoints with a config that changes what they compute (config.RERUN_MAY_CHANGE
    lists the fields that may change), naming each changed field with both values; nothing is written first."""
    saved = workdir_lib.read_json(os.path.join(workdir, workdir_lib.CONFIG))
    if not isinstance(saved, dict) or not workdir_lib.has_checkpoints(workdir):
        return
    changed = config_lib.changed_fields(saved, config)
    if changed:
        fields = "; ".join(f"{field}={new!r} (config.json: {old!r})" for field, old, new in changed)
        raise ConfigError(f"workdir={workdir!r} holds checkpoints of another config: {fields}; rerun with the "
                          "config in its config.json to resume, or pass a new --workdir")


def _build(config: ml_collections.ConfigDict, workdir: str, dataset: data_lib.Dataset, model: models.Sequential,
           recipe: Recipe, mesh: jax.sharding.Mesh, eval_batch_size: int, state: TrainState, writes_files: bool,
           start: float) -> tuple[Training, TrainState, EpochSums]:
    """The plan with its compiled steps, and the first state and sums: from the workdir's newest intact checkpoint
    if it has one."""
    settings = config.train
    platform = mesh.devices.flat[0].platform
    steps_per_epoch = len(dataset.train) // settings.batch_size
    checkpoints = Checkpoints(workdir, keep=settings.keep_checkpoints, owner=True)
    restored = checkpoints.restore(state)
    state, sums = restored if restored else (state, EpochSums.zeros())
    state, sums = sharding.put_replicated((state, sums), mesh)
    micro_batch_size = settings.micro_batch_size or sharding.micro_batch_size(
        settings.batch_size, mesh, kernels.whole_batch(settings.kernels, settings.compute_dtype, platform))
    sharding.check_batch("train.micro_batch_size", micro_batch_size, mesh)
    frozen = dataclasses.replace(recipe, frozen=True)
    parts = settings.batch_size // micro_batch_size
    training = Training(
        config=config, workdir=workdir, writes_files=writes_files, dataset=dataset, model=model, recipe=recipe,
        mesh=mesh, checkpoints=checkpoints, resumed=restored is not None, steps_per_epoch=steps_per_epoch,
        steps_per_chunk=data_lib.chunk_steps(dataset.train, settings.batch_size, steps_per_epoch),
        eval_batch_size=eval_batch_size, parts=parts,
        train_fn=compile_train_step(mesh, parts, frozen if finetune.frozen_throughout(config) else recipe),
        frozen_fn=compile_train_step(mesh, parts, frozen) if settings.get("freeze_epochs", 0) else None,
        eval_fn=compile_eval_step(mesh, recipe), start=start,
        learning_rate=functools.partial(host_learning_rate,
                                        learning_rate_schedule(config.optimizer, steps_per_epoch, settings.num_epochs)))
    return training, state, sums


def _mesh(config: ml_collections.ConfigDict, train_size: int, test_size: int) -> tuple[jax.sharding.Mesh, int]:
    """The device mesh, checked against the batch sizes; and one fixed eval batch size no larger than needed."""
    settings = config.train
    if settings.batch_size > train_size:
        raise ConfigError(f"train.batch_size={settings.batch_size} is larger than the {config.data.name} training "
                          f"split ({train_size} examples); use at most {train_size}")
    mesh = sharding.make_mesh(settings.num_devices)
    sharding.check_batch("train.batch_size", settings.batch_size, mesh)
    eval_batch_size = min(settings.eval_batch_size, -(-test_size // mesh.size) * mesh.size)
    sharding.check_batch("train.eval_batch_size", eval_batch_size, mesh)
    return mesh, eval_batch_size


def announce(training: Training, state: TrainState) -> None:
    """Prints the summary and what will run, and writes summary.txt and config.json."""
    dataset, mesh, settings = training.dataset, training.mesh, training.config.train
    table = models.summary(training.model, dataset.input_shape)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    parts = f", each step in {training.parts} parts of {settings.batch_size // training.parts}" \
        if training.parts > 1 else ""
    if parts and state.batch_stats:
        parts += " (batch norm statistics per part)"
    platform = mesh.devices.flat[0].platform
    onednn = " through oneDNN" if kernels.onednn_in_force(settings.kernels, settings.compute_dtype, platform) else ""
    dtype = f"; {settings.compute_dtype} compute" if settings.compute_dtype != "float32" else ""
    training.log(table)
    training.log(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test examples of "
                 f"{dataset.input_shape}, {dataset.num_classes} classes; {training.steps_per_epoch} steps/epoch on "
                 f"{mesh.size} {platform} device(s){processes}{parts}; loss {training.recipe.loss}{dtype}{onednn}"
                 + (f"; inputs scaled as {training.recipe.preprocessing!r} weights expect (data.preprocessing)"
                    if training.recipe.preprocessing else ""))
    if training.pretrained and not training.resumed:
        training.log(training.pretrained)
    if training.resumed:
        step = int(jax.device_get(state.step))
        training.log(f"resuming from the checkpoint at step {step} (epoch {step // training.steps_per_epoch + 1}, "
                     f"batch {step % training.steps_per_epoch})")
    if training.writes_files:
        workdir_lib.write_atomic(os.path.join(training.workdir, workdir_lib.SUMMARY), table + "\n")
        workdir_lib.write_atomic(os.path.join(training.workdir, workdir_lib.CONFIG),
                                 training.config.to_json_best_effort(indent=2) + "\n")
        write_skipped(training)


def write_skipped(training: Training) -> None:
    """WORKDIR/skipped_files.txt: each file the data source could not read, with the reason (none: no file)."""
    path = os.path.join(training.workdir, workdir_lib.SKIPPED)
    skipped = training.dataset.skipped
    if not skipped:
        if os.path.exists(path):  # from a run over files since fixed
            os.remove(path)
        return
    workdir_lib.write_atomic(path, "".join(f"{file}\t{reason}\n" for file, reason in skipped))
    training.log(f"skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that could not be read; "
                 f"{path} lists {'them' if len(skipped) > 1 else 'it'} with the reasons")


def summary(model: models.Sequential | ml_collections.ConfigDict, input_shape: Sequence[int] | None = None) -> str:
    """The Keras-style summary training prints, for a model and an input shape, or for a whole config.

    For a config the model is built from `config.model` and, unless
    `input_shape` is given, the shape comes from the dataset's description
    (a TFDS set's images are not loaded; the other sources are quick to load
    or cached).
    """
    if isinstance(model, ml_collections.ConfigDict):
        config = model
        model = models.build_model(config.model)
        input_shape = input_shape or data_lib.input_shape(config.data)
    elif input_shape is None:
        raise ConfigError("summary(model) needs input_shape, e.g. summary(model, (28, 28, 1)); or pass a config, "
                          "whose dataset gives it")
    return models.summary(model, input_shape)
