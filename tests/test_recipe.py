"""The recipe tricks of issue 33: class weights, label smoothing, mixup and cutmix, the moving average of the
parameters, gradient clipping, optax's wider optimizer set and the extra schedules."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cnn
from cnn import config as config_lib
from cnn import data as data_lib
from cnn import losses, train
from cnn.data.images import Augmentation, mix
from cnn.errors import ConfigError
from cnn.train.optimizer import learning_rate_schedule, make_optimizer

RECIPE_FIELDS = ("loss_label_smoothing", "data.mixup_alpha", "data.cutmix_alpha", "train.class_weights",
                 "train.ema_decay", "optimizer.clip_norm", "optimizer.args", "optimizer.boundaries_epochs",
                 "optimizer.decay_factor")


def _log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _digits(epochs=1, **fields):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs, config.train.pictures = epochs, False
    for key, value in fields.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    return config


# --- class weights and label smoothing: the loss, exactly ---

def test_class_weights_multiply_each_examples_loss_and_divide_by_the_batch_size():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 3)).astype(np.float32), np.array([0, 1, 2, 2, 1, 0])
    weights = (0.5, 2.0, 3.0)
    loss, accuracy = losses.training_loss("softmax_cross_entropy", jnp.asarray(logits), jnp.asarray(labels),
                                          class_weights=weights)
    per_example = -_log_softmax(logits)[np.arange(6), labels]
    assert float(loss) == pytest.approx(float((np.asarray(weights)[labels] * per_example).sum() / 6), rel=1e-6)
    assert float(accuracy) == pytest.approx(float((logits.argmax(-1) == labels).mean()))
    unweighted, _ = losses.training_loss("softmax_cross_entropy", jnp.asarray(logits), jnp.asarray(labels))
    assert float(unweighted) == pytest.approx(float(per_example.mean()), rel=1e-6)


def test_balanced_class_weights_are_n_over_classes_times_count():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert losses.resolve_class_weights("balanced", labels, 3) == pytest.approx((10 / 18, 10 / 9, 10 / 3))
    assert losses.resolve_class_weights((1, 2, 3), labels, 3) == (1.0, 2.0, 3.0)
    assert losses.resolve_class_weights(None, labels, 3) is None
    with pytest.raises(ConfigError, match=r"train.class_weights has 2 weights but the dataset has 3 classes") as e:
        losses.resolve_class_weights((1, 2), labels, 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="class 3 has no training examples"):
        losses.resolve_class_weights("balanced", labels, 4)


def test_label_smoothing_moves_targets_toward_uniform():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(5, 4)).astype(np.float32), np.array([0, 3, 1, 2, 3])
    loss, _ = losses.training_loss("softmax_cross_entropy", jnp.asarray(logits), jnp.asarray(labels), smoothing=0.2)
    targets = 0.8 * np.eye(4)[labels] + 0.2 / 4
    assert float(loss) == pytest.approx(float(-(targets * _log_softmax(logits)).sum(-1).mean()), rel=1e-6)
    # A one-unit sigmoid head: the target 1 becomes 0.9 and 0 becomes 0.1 (smoothing 0.2 toward 0.5).
    z, y = np.array([[0.3], [-1.2], [2.0]], np.float32), np.array([1, 0, 1])
    loss, _ = losses.training_loss("sigmoid_binary_cross_entropy", jnp.asarray(z), jnp.asarray(y), smoothing=0.2)
    p, t = 1 / (1 + np.exp(-z[:, 0])), np.where(y == 1, 0.9, 0.1)
    assert float(loss) == pytest.approx(float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean()), rel=1e-5)


def test_mixed_targets_blend_losses_and_weights_and_count_the_dominant_label():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 3)).astype(np.float32))
    labels, partner, ratio = jnp.array([0, 1, 2, 0]), jnp.array([1, 1, 0, 2]), jnp.array([0.7, 0.2, 1.0, 0.4])
    weights = (1.0, 2.0, 4.0)
    loss, accuracy = losses.training_loss("softmax_cross_entropy", logits, labels, (partner, ratio),
                                          class_weights=weights)
    lp, r, w = _log_softmax(np.asarray(logits)), np.asarray(ratio), np.asarray(weights)
    own, other = -lp[np.arange(4), labels], -lp[np.arange(4), partner]
    blended_weight = r * w[labels] + (1 - r) * w[partner]
    assert float(loss) == pytest.approx(float((blended_weight * (r * own + (1 - r) * other)).sum() / 4), rel=1e-6)
    dominant = np.where(r >= 0.5, labels, partner)
    assert float(accuracy) == pytest.approx(float((np.asarray(logits).argmax(-1) == dominant).mean()))
    # A ratio of 1 is the label itself: the soft path agrees with the integer one.
    hard, _ = losses.training_loss("softmax_cross_entropy", logits, labels)
    soft, _ = losses.training_loss("softmax_cross_entropy", logits, labels, (partner, jnp.ones(4)))
    assert float(soft) == pytest.approx(float(hard), rel=1e-6)


# --- mixup and cutmix ---

def test_mixup_blends_each_example_with_the_reversed_batch_by_its_ratio():
    x = jnp.asarray(np.random.default_rng(3).random((6, 4, 4, 1)), jnp.float32)
    labels = jnp.arange(6)
    mixed, (partner, ratio) = mix(x, labels, jax.random.key(0), mixup_alpha=0.4)
    assert partner.tolist() == [5, 4, 3, 2, 1, 0]
    assert len(set(np.asarray(ratio).round(6).tolist())) == 6  # a ratio per example
    r = np.asarray(ratio)[:, None, None, None]
    np.testing.assert_allclose(mixed, r * np.asarray(x) + (1 - r) * np.asarray(x)[::-1], rtol=1e-6)


def test_cutmix_pastes_a_box_of_the_partner_covering_one_minus_the_ratio():
    n = 8
    x = jnp.asarray(np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 10, 12, 3), np.float32))
    mixed, (partner, ratio) = mix(x, jnp.arange(n), jax.random.key(1), cutmix_alpha=1.0)
    mixed = np.asarray(mixed)
    for i in range(n):
        from_partner = mixed[i, ..., 0] == n - 1 - i
        assert np.all((mixed[i, ..., 0] == i) | from_partner)
        assert 1 - from_partner.mean() == pytest.approx(float(ratio[i]))
        rows, cols = np.flatnonzero(from_partner.any(1)), np.flatnonzero(from_partner.any(0))
        if rows.size:  # one box
            assert from_partner[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert 0 < float(ratio.mean()) < 1


def test_both_on_choose_mixup_or_cutmix_per_step():
    x = jnp.asarray(np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 6, 6, 1), np.float32))
    kinds = set()
    for seed in range(12):
        mixed, _ = mix(x, jnp.arange(4), jax.random.key(seed), mixup_alpha=0.5, cutmix_alpha=1.0)
        pure = np.isin(np.asarray(mixed), np.arange(4)).all()  # cutmix only moves pixels
        kinds.add("cutmix" if pure else "mixup")
    assert kinds == {"cutmix", "mixup"}


# A small model keeps the compilations of these tests short.
TINY = ("Conv2D(4, 3, activation='relu')", "Flatten()", "Dense(10)")
_train_step = jax.jit(train.train_step, static_argnums=2)  # one cache for the module: equal recipes compile once
_ADAM = optax.adam(3e-3)  # one object: the optimizer is static in the state, so another would compile again


@functools.cache
def _digits_data():
    return data_lib.load_dataset(cnn.load_config("configs/digits.py").data)


@functools.cache
def _tiny_fresh():
    config = cnn.load_config("configs/digits.py")
    config.model.layers = TINY
    return train.create_state(cnn.build_model(config.model), optax.sgd(0.1), (8, 8, 1), 0, ema_decay=0.5)


def _tiny_state(tx, ema_decay=0.0):
    """A fresh state of the tiny model with optimizer `tx` (initialised once: compiling init is most of the cost)."""
    fresh = _tiny_fresh()
    return train.TrainState.create(apply_fn=fresh.apply_fn, params=fresh.params, tx=tx, batch_stats=fresh.batch_stats,
                                   dropout_rng=fresh.dropout_rng, ema_params=fresh.ema_params if ema_decay else None,
                                   ema_decay=ema_decay)


def _steps(recipe, n=3):
    """The tiny model after `n` adam steps on batches of 32 digits with `recipe`."""
    dataset = _digits_data()
    state = _tiny_state(_ADAM)
    for i in range(n):
        batch = {"image": dataset.train.images[32 * i:32 * (i + 1)], "label": dataset.train.labels[32 * i:32 * (i + 1)]}
        state, _ = _train_step(state, batch, recipe)
    return state


@pytest.mark.parametrize("field", ["mixup_alpha", "cutmix_alpha"])
def test_alpha_zero_is_no_mixing_and_alpha_above_zero_changes_training(field):
    plain = _steps(train.Recipe())
    zero = _steps(train.Recipe(augmentation=Augmentation(**{field: 0.0})))
    jax.tree_util.tree_map(np.testing.assert_array_equal, zero.params, plain.params)
    mixed = _steps(train.Recipe(augmentation=Augmentation(**{field: 1.0})))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(mixed.params),
                                                        jax.tree_util.tree_leaves(plain.params)))


def test_mixing_refuses_inputs_it_cannot_take():
    with pytest.raises(ConfigError, match="data.cutmix_alpha=1.0: CutMix pastes boxes of images"):
        Augmentation(cutmix_alpha=1.0).check(np.dtype(np.float32), 3)
    with pytest.raises(ConfigError, match="data.mixup_alpha=0.2: token ids cannot be blended"):
        Augmentation(mixup_alpha=0.2).check(np.dtype(np.int32), 2)
    Augmentation(mixup_alpha=0.2, cutmix_alpha=1.0).check(np.dtype(np.uint8), 4)
    Augmentation(mixup_alpha=0.2).check(np.dtype(np.float32), 3)  # series blend


# --- the moving average of the parameters ---

def test_ema_with_decay_zero_is_the_raw_weights_and_otherwise_the_recurrence():
    fresh = _tiny_state(optax.sgd(0.1), ema_decay=0.9)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _tiny_fresh().ema_params, _tiny_fresh().params)  # the start
    zero = fresh.replace(ema_decay=0.0)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01) + p * 0.1, fresh.params)
    state, expected = fresh, jax.tree_util.tree_map(np.asarray, fresh.params)
    for t in range(4):
        zero = zero.apply_gradients(grads=grads)
        jax.tree_util.tree_map(np.testing.assert_array_equal, zero.ema_params, zero.params)
        state = state.apply_gradients(grads=grads)
        d = min(0.9, (1 + t) / (10 + t))
        expected = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * np.asarray(p), expected, state.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.ema_params, expected)
    assert state.variables()["params"] is state.ema_params  # what evaluation and prediction read
    plain = _tiny_state(optax.sgd(0.1))
    assert plain.ema_params is None and plain.variables()["params"] is plain.params


def test_ema_is_what_evaluation_uses_and_is_in_the_checkpoint(tmp_path):
    run = cnn.train_and_evaluate(_digits(2, train__ema_decay=0.9), str(tmp_path))
    assert run.state.ema_params is not None
    loaded = cnn.load_run(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.state.ema_params, run.state.ema_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.state.params, run.state.params)
    test = run.dataset.test
    probabilities = train.probabilities_fn(run.recipe)(loaded.state, test.images)
    accuracy = float((np.argmax(probabilities, -1) == test.labels).mean())
    assert accuracy == pytest.approx(run.results["test_accuracy"], abs=1e-6)
    raw = loaded.state.replace(ema_params=None)
    assert not np.allclose(train.probabilities_fn(run.recipe)(raw, test.images), probabilities)


def test_mixup_ema_and_class_weights_resume_exactly(tmp_path):
    """Stopped after its first epoch and rerun, a run with mixing, smoothing, class weights and a moving average
    ends as the uninterrupted one: the mixing draws come from the step's key, the average from the checkpoint."""
    fields = dict(data__mixup_alpha=0.4, data__cutmix_alpha=1.0, loss_label_smoothing=0.1,
                  train__ema_decay=0.95, train__class_weights="balanced", optimizer__clip_norm=1.0)
    reference = cnn.train_and_evaluate(_digits(2, **fields), str(tmp_path / "reference"))

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cnn.train_and_evaluate(_digits(2, **fields), str(tmp_path / "resumed"), on_epoch_end=stop)
    resumed = cnn.train_and_evaluate(_digits(2, **fields), str(tmp_path / "resumed"))
    for a, b in ((resumed.state.params, reference.state.params), (resumed.state.ema_params,
                                                                  reference.state.ema_params)):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] for r in lines] == [r["test_accuracy"] for r in reference.history]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in reference.history]


# --- optimizers and schedules ---

@pytest.mark.parametrize("name", config_lib.OPTIMIZERS)
def test_each_optimizer_builds_and_trains_a_step(name):
    opt = config_lib.base_config().optimizer
    opt.name, opt.learning_rate, opt.weight_decay = name, 1e-3, 1e-4
    config = cnn.load_config("configs/digits.py")
    config.optimizer = opt
    config_lib.validate(config)
    dataset = _digits_data()
    state = _tiny_state(make_optimizer(opt, 10, 1))
    batch = {"image": dataset.train.images[:32], "label": dataset.train.labels[:32]}
    new, metrics = _train_step(state, batch, train.Recipe())
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(new.params),
                                                      jax.tree_util.tree_leaves(state.params))]
    assert all(moved)


def test_optimizer_args_are_passed_through_and_checked_against_optax():
    opt = config_lib.base_config().optimizer
    opt.name, opt.learning_rate, opt.args = "lion", 0.5, {"b1": 0.0, "b2": 0.5}
    grads = {"w": jnp.array([3.0, -0.2, 0.0])}
    updates, _ = make_optimizer(opt, 1, 1).update(grads, make_optimizer(opt, 1, 1).init(grads), grads)
    np.testing.assert_array_equal(updates["w"], [-0.5, 0.5, 0.0])  # b1=0: the sign of the gradient, times the rate
    opt.args = {"beta": 0.9}
    with pytest.raises(ConfigError) as e:
        make_optimizer(opt, 1, 1)
    assert str(e.value) == "optimizer.args: optax.lion has no parameter 'beta'; it takes b1, b2, mu_dtype, mask"
    opt.args = {"weight_decay": 0.1}
    with pytest.raises(ConfigError, match="set optimizer.weight_decay instead"):
        make_optimizer(opt, 1, 1)
    config = config_lib.base_config()
    config.optimizer.name, config.optimizer.b1 = "lion", 0.95
    with pytest.raises(ConfigError, match=r"optimizer.b1=0.95 is read by adam, adamw, nadam only; .*optimizer.args"):
        config_lib.validate(config)


def test_clip_norm_scales_the_gradient_to_that_global_norm():
    opt = config_lib.base_config().optimizer
    opt.momentum, opt.learning_rate, opt.clip_norm = 0.0, 1.0, 1.0
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    tx = make_optimizer(opt, 1, 1)
    updates, _ = tx.update(grads, tx.init(grads), grads)
    np.testing.assert_allclose(np.concatenate([updates["a"], updates["b"]]), [-0.6, 0.0, -0.8], rtol=1e-6)


def _rates(schedule, steps, **fields):
    opt = config_lib.base_config().optimizer
    opt.schedule, opt.learning_rate = schedule, 0.1
    for key, value in fields.items():
        opt[key] = value
    rate = learning_rate_schedule(opt, 10, 5)  # 10 steps an epoch, 50 in all
    return [float(rate(s)) for s in steps]


def test_schedules_give_their_rates_at_chosen_steps():
    assert _rates("step", [0, 19, 20, 29, 30, 49], boundaries_epochs=(2, 3), decay_factor=0.1) == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert _rates("linear", [0, 25, 50]) == pytest.approx([0.1, 0.05, 0.0])
    assert _rates("exponential", [0, 5, 10, 30], decay_factor=0.5) == pytest.approx(
        [0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.0125])
    assert _rates("one_cycle", [0, 15, 50]) == pytest.approx([0.1 / 25, 0.1, 0.1 / 25 / 1e4], rel=1e-4)
    assert _rates("one_cycle", [10], warmup_epochs=1.0) == pytest.approx([0.1])  # the peak after warmup_epochs
    assert _rates("constant", [0, 49]) == [0.1, 0.1]


def test_a_run_logs_the_schedules_rate(tmp_path):
    config = _digits(2, optimizer__schedule="step", optimizer__boundaries_epochs=(1,), optimizer__decay_factor=0.5)
    config.train.log_every_steps = 1
    run = cnn.train_and_evaluate(config, str(tmp_path))
    rates = {r["step"]: r["learning_rate"] for r in run.steps}
    assert rates[44] == pytest.approx(config.optimizer.learning_rate)  # update 44 has count 43: epoch 1
    assert rates[45] == pytest.approx(config.optimizer.learning_rate * 0.5)


# --- the config fields ---

def test_recipe_fields_are_checked_in_one_line_and_change_what_a_step_computes():
    for fields, message in [
            ({"loss_label_smoothing": 1.0}, "loss_label_smoothing=1.0 is not valid"),
            ({"data__mixup_alpha": -0.1}, "data.mixup_alpha=-0.1 is not valid"),
            ({"train__class_weights": "even"}, "train.class_weights='even' is not valid"),
            ({"train__ema_decay": 1.0}, "train.ema_decay=1.0 is not valid"),
            ({"optimizer__clip_norm": -1.0}, "optimizer.clip_norm=-1.0 is not valid"),
            ({"optimizer__name": "adamax"}, "optimizer.name='adamax' is not valid"),
            ({"optimizer__boundaries_epochs": (2,)},
             "optimizer.boundaries_epochs=(2,) needs optimizer.schedule='step'"),
            ({"optimizer__decay_factor": 0.0}, "optimizer.decay_factor=0.0 is not valid")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
            config_lib.validate(_digits(**fields))
        assert "\n" not in str(e.value)
    assert not set(RECIPE_FIELDS) & set(config_lib.RERUN_MAY_CHANGE)
    saved = json.loads(_digits(optimizer__args={"eps": 1e-6}).to_json_best_effort())
    assert config_lib.changed_fields(saved, _digits()) == [("optimizer.args", {"eps": 1e-6}, {})]
