"""Property tests: any layer stack or config value either works or is refused by one message naming the field."""

import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnn
from cnn import models
from cnn.models.layers import LAYERS

VALUES = st.one_of(
    st.integers(-3, 40), st.floats(-2, 5, allow_nan=False), st.booleans(), st.none(),
    st.sampled_from(["relu", "softmax", "sigmoid", "same", "valid", "full", "", "x"]),
    st.tuples(st.integers(-1, 6), st.integers(-1, 6)), st.lists(st.integers(0, 4), max_size=3),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
)
KEYWORDS = ["activation", "padding", "strides", "pool_size", "rate", "use_bias", "momentum", "units", "bogus"]


@st.composite
def layer_spec(draw):
    kind = draw(st.sampled_from([*LAYERS, "Conv3D", "dense"]))
    args = draw(st.lists(VALUES, max_size=3))
    kwargs = draw(st.dictionaries(st.sampled_from(KEYWORDS), VALUES, max_size=2))
    return f"{kind}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"


@st.composite
def sound_layer_spec(draw):
    """A spec that parses; whether it fits its input is left to chance."""
    n = st.integers(1, 5)
    rank = draw(st.sampled_from(["1D", "2D"]))
    return draw(st.sampled_from([
        f"Conv{rank}({draw(n)}, {draw(n)}, padding={draw(st.sampled_from(['valid', 'same']))!r}, "
        f"activation={draw(st.sampled_from(['relu', 'gelu', None]))!r})",
        f"MaxPooling{rank}({draw(n)})", f"AveragePooling{rank}({draw(n)}, padding='same')",
        f"GlobalAveragePooling{rank}()", "Flatten()", f"Dense({draw(n)}, activation='tanh')",
        f"Dropout({draw(st.floats(0, 0.9)):.2f})", "BatchNormalization()", "Activation('relu')",
    ]))


@st.composite
def layer_stack(draw, classes):
    body = draw(st.lists(st.one_of(sound_layer_spec(), sound_layer_spec(), sound_layer_spec(), sound_layer_spec(),
                                   layer_spec()), max_size=4))
    head = draw(st.sampled_from([f"Dense({classes})", f"Dense({classes}, activation='softmax')",
                                 "Dense(1, activation='sigmoid')", draw(layer_spec())]))
    return [*body, head]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), shape=st.sampled_from([(8, 8, 1), (16, 16, 3), (20, 2), (12,)]),
       classes=st.sampled_from([2, 10]))
def test_random_layer_stacks_build_and_run_or_name_the_field(data, shape, classes):
    specs = data.draw(layer_stack(classes))
    try:
        model = cnn.build_model(specs)
        loss = models.check_head(model, shape, classes, "auto")
    except cnn.ConfigError as e:
        assert str(e).startswith(("model.layers", "loss=")), str(e)
        return
    x = jnp.ones((2, *shape))
    variables = model.init(jax.random.key(0), x)
    y = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})[0]
    assert y.shape == (2, 1 if loss == "sigmoid_binary_cross_entropy" else classes)


FIELDS = ["seed", "train.num_epochs", "train.batch_size", "train.eval_batch_size", "train.num_devices",
          "train.checkpoint_every_steps", "train.keep_checkpoints", "optimizer.name", "optimizer.learning_rate",
          "optimizer.momentum", "optimizer.b2", "optimizer.weight_decay", "optimizer.schedule",
          "optimizer.warmup_epochs", "optimizer.restart_epochs", "loss", "data.name", "data.image_size", "data.mean",
          "model.layers"]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=VALUES | st.floats(allow_nan=True, allow_infinity=True))
def test_random_config_values_pass_or_name_the_field(field, value):
    config = cnn.base_config()
    section, _, name = field.rpartition(".")
    node = config[section] if section else config
    try:
        node[name] = value
    except (TypeError, ValueError):
        return  # ml_collections refuses a value of the wrong type itself (the CLI reports it as a flag error)
    try:
        cnn.config.validate(config)
    except cnn.ConfigError as e:
        assert field in str(e), (field, value, str(e))
