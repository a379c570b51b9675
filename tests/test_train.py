"""Real training runs on the digits inside scikit-learn, through the notebook API."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnn
from cnn import data as data_lib
from cnn import train


def test_digits_learns_and_writes_the_workdir(config_path, tmp_path):
    config = cnn.load_config(config_path("digits"))
    run = cnn.train_and_evaluate(config, str(tmp_path))

    assert run.results["test_accuracy"] >= 0.95
    assert len(run.history) == config.train.num_epochs
    assert run.history[-1]["train_loss"] < run.history[0]["train_loss"]
    assert int(run.state.step) == run.results["steps"] == config.train.num_epochs * (1437 // config.train.batch_size)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, config.train.num_epochs + 1))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_accuracy"] == run.results["test_accuracy"] and results["seed"] == config.seed
    assert {"test_loss", "epochs", "steps", "train_seconds"} <= results.keys()
    assert "Total params: 76,522" in (tmp_path / "summary.txt").read_text()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))

    # The returned state predicts: accuracy recomputed by hand matches the reported one.
    test = data_lib.load_dataset(config.data).test
    logits = run.model.apply(run.state.variables(), data_lib.preprocess(test.images))
    assert float((np.argmax(logits, -1) == test.labels).mean()) == pytest.approx(results["test_accuracy"], abs=1e-6)


def test_eval_counts_every_example_once():
    """Padding in the last eval batch must not count: 360 test digits in batches of 100."""
    config = cnn.load_config("configs/digits.py")
    dataset = data_lib.load_dataset(config.data)
    model = cnn.build_model(config.model)
    state = train.create_state(model, optax.sgd(0.1), dataset.input_shape, 0)
    logits = model.apply(state.variables(), data_lib.preprocess(dataset.test.images))
    expected_acc = float((np.argmax(logits, -1) == dataset.test.labels).mean())
    expected_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, dataset.test.labels).mean())
    mesh = cnn.sharding.make_mesh()
    got = train.evaluate(state, dataset.test, 100, jax.jit(train.eval_step), cnn.sharding.batch_sharding(mesh))
    assert got["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_a_fresh_state_is_one_compiled_program():
    """create_state is one XLA program, which the compilation cache keeps for the next run; made eagerly, the keys
    and each optimizer array were a program apiece, compiled again in every process."""
    programs = []

    def count(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            programs.append(kwargs.get("fun_name"))

    model = cnn.build_model(cnn.load_config("configs/digits.py").model)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:  # an input shape no other test uses: no program of it is compiled yet
        state = train.create_state(model, optax.adam(1e-3), (5, 7, 1), 3)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(programs) == 1, programs
    init_rng, dropout_rng = jax.random.split(jax.random.key(3))
    np.testing.assert_array_equal(jax.random.key_data(state.dropout_rng), jax.random.key_data(dropout_rng))
    params = model.init(init_rng, jnp.zeros((1, 5, 7, 1)))["params"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params)
    assert int(state.step) == 0 and not any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(jnp.any, state.opt_state)))


def test_train_step_is_pure_and_lowers_the_loss():
    config = cnn.load_config("configs/digits.py")
    dataset = data_lib.load_dataset(config.data)
    model = cnn.build_model(config.model)
    state = train.create_state(model, optax.adam(1e-3), dataset.input_shape, 0)
    index = data_lib.epoch_index(len(dataset.train), 64, 0, 1)[0]
    batch = {"image": dataset.train.images[index], "label": dataset.train.labels[index]}
    step = jax.jit(train.train_step)
    a, metrics_a = step(state, batch)
    b, metrics_b = step(state, batch)  # same inputs, same outputs
    np.testing.assert_array_equal(metrics_a["loss"], metrics_b["loss"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
    for _ in range(20):
        a, metrics = step(a, batch)
    assert float(metrics["loss"]) < 0.5 * float(metrics_a["loss"])


def test_sigmoid_loss_and_accuracy():
    logits = jnp.array([[2.0], [-1.0], [0.5]])
    labels = jnp.array([1, 1, 0])
    losses, correct = train.compute_loss("sigmoid_binary_cross_entropy", logits, labels)
    p = jax.nn.sigmoid(logits[:, 0])
    np.testing.assert_allclose(losses, -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p)), rtol=1e-5)
    np.testing.assert_array_equal(correct, [1.0, 0.0, 0.0])


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "sgd", "optimizer.learning_rate": 0.05, "optimizer.nesterov": True},
    {"optimizer.name": "adam", "optimizer.schedule": "warmup_cosine", "optimizer.warmup_epochs": 1},
    {"optimizer.name": "adamw", "optimizer.weight_decay": 1e-4, "optimizer.schedule": "warmup_cosine"},
])
def test_optimizers_and_schedules_learn(tmp_path, overrides):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs = 3
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["test_accuracy"] > 0.85


def test_batch_norm_and_dropout_state_in_training(tmp_path):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs = 3
    config.model.layers = ("Conv2D(16, 3, padding='same')", "BatchNormalization()", "Activation('relu')",
                           "MaxPooling2D(2)", "Flatten()", "Dropout(0.3)", "Dense(10, activation='softmax')")
    run = cnn.train_and_evaluate(config, str(tmp_path))
    stats = run.state.batch_stats["batch_normalization"]
    assert float(jnp.abs(stats["mean"]).sum()) > 0  # running averages were updated
    assert run.results["test_accuracy"] > 0.85
    assert "Non-trainable params: 32" in (tmp_path / "summary.txt").read_text()


def test_warm_restart_ends_the_first_cycle_as_a_run_of_that_length(tmp_path):
    """With a restart after epoch 1, epoch 1 anneals fully: it ends exactly as a one-epoch run does."""
    config = cnn.load_config("configs/digits.py")
    config.optimizer.schedule, config.optimizer.warmup_epochs = "warmup_cosine", 0.3
    config.train.num_epochs = 1
    one = cnn.train_and_evaluate(config, str(tmp_path / "one"))
    config.train.num_epochs, config.optimizer.restart_epochs = 2, (1,)
    restarted = cnn.train_and_evaluate(config, str(tmp_path / "restarted"))
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(restarted.history[0][key], one.history[0][key], rtol=1e-5)
    config.optimizer.restart_epochs = ()  # one cycle over both epochs: epoch 1 ends at a high learning rate
    single = cnn.train_and_evaluate(config, str(tmp_path / "single"))
    assert abs(single.history[0]["train_loss"] - one.history[0]["train_loss"]) > 1e-3
    assert restarted.results["test_accuracy"] > 0.9


def test_steps_on_a_staged_chunk_equal_steps_on_host_batches():
    """The loop's data path: batches staged on the devices and picked by step train as batches put one by one."""
    from cnn import sharding

    config = cnn.load_config("configs/digits.py")
    dataset = data_lib.load_dataset(config.data)
    state = train.create_state(cnn.build_model(config.model), optax.adam(1e-3), dataset.input_shape, 0)
    mesh = sharding.make_mesh(0)
    rows = data_lib.epoch_index(len(dataset.train), 32, 0, 1)[:5]
    chunk = data_lib.stage_chunk(dataset.train, rows, 8, sharding.chunk_sharding(mesh))
    assert chunk["image"].shape == (8, 32, 8, 8, 1)
    np.testing.assert_array_equal(chunk["label"][5:], np.broadcast_to(dataset.train.labels[rows[4]], (3, 32)))
    sums = train.EpochSums.zeros()
    staged, staged_sums = sharding.put_replicated((state, sums), mesh)
    start = sharding.put_replicated(np.int32(0), mesh)
    on_host = train.create_state(cnn.build_model(config.model), optax.adam(1e-3), dataset.input_shape, 0)
    step, host_step = train.compile_train_step(mesh), jax.jit(train.train_step)  # `step` donates the staged state
    for i in range(5):
        staged, staged_sums, _ = step(staged, staged_sums, chunk, start)
        on_host, metrics = host_step(on_host, data_lib.host_batch(dataset.train, rows[i]))
        sums = sums.add(metrics)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), staged.params,
                           on_host.params)
    np.testing.assert_allclose(staged_sums.loss, sums.loss, rtol=1e-5)


@pytest.mark.parametrize("micro_batch_size", [0, 16])  # a step in one call; in two
def test_an_epoch_only_dispatches_steps(tmp_path, micro_batch_size):
    """Nothing crosses between the host and the devices implicitly during an epoch's steps: batches are staged a
    chunk at a time by an explicit device_put, step records and checkpoints fetch with an explicit device_get, so
    the host only dispatches. The epoch runs under jax.transfer_guard('disallow'), which raises otherwise."""
    from cnn import runtime
    from cnn.train import loop, metrics

    config = cnn.load_config("configs/digits.py")
    config.train.micro_batch_size, config.train.pictures = micro_batch_size, False
    config.train.log_every_steps, config.train.checkpoint_every_steps = 5, 7
    training, state, sums = train.prepare(config, str(tmp_path))
    assert training.parts == (2 if micro_batch_size else 1)
    with training.lock, metrics.MetricWriter(str(tmp_path)) as writer, runtime.stop_requests() as stop:
        steps = metrics.StepLog(writer, 5, training.steps_per_epoch, training.learning_rate, training.start, 0)
        with jax.transfer_guard("disallow"):
            trained = loop.train_epoch(training, state, sums, 1, stop, steps)
        training.checkpoints.close()
    assert int(trained.state.step) == trained.steps_run == training.steps_per_epoch == 44
    assert [r["step"] for r in writer.steps] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert training.checkpoints.latest_step() == 42
    assert 0 < float(trained.sums.loss) / 44 < float(jnp.log(10.0))  # it learned: below chance


@pytest.mark.parametrize("parts", [2, 4])
def test_accumulated_parts_train_as_the_whole_batch(parts):
    """Gradient accumulation (train.micro_batch_size): `parts` calls, one update, the same parameters and metrics
    as one call on the whole batch (a model without batch norm or dropout)."""
    from cnn import sharding

    config = cnn.load_config("configs/digits.py")
    dataset = data_lib.load_dataset(config.data)
    def fresh():  # each run's own state: the steps donate it
        return train.create_state(cnn.build_model(config.model), optax.sgd(0.1, momentum=0.9), dataset.input_shape,
                                  0)

    mesh = sharding.make_mesh(0)
    chunk = data_lib.stage_chunk(dataset.train, data_lib.epoch_index(len(dataset.train), 32, 0, 1)[:3], 3,
                              sharding.chunk_sharding(mesh))
    start = sharding.put_replicated(np.int32(0), mesh)
    results = []
    for step in train.compile_train_step(mesh, 1), train.compile_train_step(mesh, parts):
        s, sums = sharding.put_replicated((fresh(), train.EpochSums.zeros()), mesh)
        for _ in range(3):
            s, sums, loss = step(s, sums, chunk, start)
        results.append((s, sums))
    (whole, whole_sums), (accumulated, accumulated_sums) = results
    assert int(accumulated.step) == 3
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), accumulated.params,
                           whole.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), accumulated_sums, whole_sums)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), whole.params, fresh().params)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4  # the comparison is between trained parameters


def test_accumulation_with_batch_norm_and_dropout_learns(tmp_path):
    """With batch norm (statistics per part) and dropout (a key per part) the parts still train a good model."""
    config = cnn.load_config("configs/digits.py")
    config.model.layers = ("Conv2D(16, 3, padding='same', use_bias=False)", "BatchNormalization()",
                           "Activation('relu')", "MaxPooling2D(2)", "Flatten()", "Dropout(0.3)", "Dense(10)")
    config.train.num_epochs = 3
    config.train.micro_batch_size = 8
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["test_accuracy"] > 0.9
    stats = jax.tree_util.tree_leaves(run.state.batch_stats)
    assert stats and all(np.all(np.isfinite(s)) for s in stats)


def test_same_seed_same_result(tmp_path):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs = 2
    a = cnn.train_and_evaluate(config, str(tmp_path / "a"))
    b = cnn.train_and_evaluate(config, str(tmp_path / "b"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.state.params, b.state.params)
    assert a.history[-1]["test_loss"] == b.history[-1]["test_loss"]


def test_model_runs_on_an_array_without_training():
    model = cnn.build_model(["Conv2D(8, 3, activation='relu')", "Flatten()", "Dense(10, activation='softmax')"])
    x = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)
    variables = model.init(jax.random.key(0), x)
    probs = model.apply(variables, x)
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_final_checkpoint_restores_the_trained_state(tmp_path):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs = 2
    run = cnn.train_and_evaluate(config, str(tmp_path))
    dataset = data_lib.load_dataset(config.data)
    fresh = train.create_state(run.model, train.make_optimizer(config.optimizer, 1437 // 32, 2),
                               dataset.input_shape, seed=1)
    restored, epoch_sums = cnn.checkpoint.Checkpoints(str(tmp_path)).restore(fresh)
    assert int(restored.step) == int(run.state.step)
    assert float(epoch_sums.loss) == 0.0  # saved at an epoch end
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.params, run.state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored.opt_state, run.state.opt_state)


def test_bfloat16_compute_keeps_float32_parameters():
    """Mixed precision: bf16 forward and backward, float32 parameters and updates, and it still learns."""
    config = cnn.load_config("configs/digits.py")
    dataset = data_lib.load_dataset(config.data)
    model = cnn.build_model(config.model)
    state = train.create_state(model, optax.adam(1e-3), dataset.input_shape, 0)
    recipe = train.Recipe(compute_dtype="bfloat16")
    index = data_lib.epoch_index(len(dataset.train), 64, 0, 1)[0]
    batch = {"image": dataset.train.images[index], "label": dataset.train.labels[index]}
    assert recipe.inputs(batch["image"]).dtype == jnp.bfloat16
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(recipe.cast(state.variables())["params"]))
    step = jax.jit(functools.partial(train.train_step, recipe=recipe))
    first = None
    for _ in range(20):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
    assert float(metrics["loss"]) < 0.5 * first
