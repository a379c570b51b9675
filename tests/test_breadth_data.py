"""The data-source registry, augmentation, channel conversion, text tokenisation and sequence inputs (cnn/data/)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import cnn
from cnn import data as data_lib
from cnn import data_sources


def test_every_data_source_names_functions_that_exist():
    """The registry names its loaders as text (so the config schema can read it without importing them): each
    must resolve, and the names that read data.path are the ones the config checks data.path against."""
    for source in [*data_sources.SOURCES.values(), data_sources.TFDS]:
        assert callable(data_sources.resolve(source.loader)), source
        assert source.input_shape is None or callable(data_sources.resolve(source.input_shape)), source
    assert cnn.config.OWN_DATA == ("image_folder", "text_folder", "series_file", "npz")
    assert data_sources.find("eurosat/rgb") is data_sources.TFDS
    assert data_sources.find("kmnist").loader == "cnn.data.idx:load"


def _batch(n=16, size=8, channels=3):
    return jnp.asarray(np.random.default_rng(0).integers(1, 256, (n, size, size, channels)), jnp.uint8)


def test_augment_is_deterministic_per_rng_and_keeps_shape_and_dtype():
    images = _batch()
    f = jax.jit(data_lib.augment, static_argnums=(2, 3, 4))
    a = f(images, jax.random.key(0), 2, True, "constant")
    assert a.shape == images.shape and a.dtype == jnp.uint8
    np.testing.assert_array_equal(a, f(images, jax.random.key(0), 2, True, "constant"))
    assert not np.array_equal(a, f(images, jax.random.key(1), 2, True, "constant"))
    np.testing.assert_array_equal(data_lib.augment(images, jax.random.key(0)), images)  # off by default


def test_flip_mirrors_some_examples_and_leaves_the_rest():
    images = _batch(64)
    out = np.asarray(data_lib.augment(images, jax.random.key(3), flip=True))
    flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48  # per example, about half


def test_crop_shifts_each_example_by_its_own_offset_within_the_padding():
    images = _batch(64, size=8, channels=1)  # no zeros in the originals
    out = np.asarray(data_lib.augment(images, jax.random.key(5), crop_padding=2))
    offsets = set()
    for o, i in zip(out, np.asarray(images)):
        padded = np.pad(i, ((2, 2), (2, 2), (0, 0)))
        found = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[dy:dy + 8, dx:dx + 8], o)]
        assert found, "each output is a window of the zero-padded image"
        offsets.add(found[0])
    assert len(offsets) > 10
    reflect = np.asarray(data_lib.augment(images, jax.random.key(5), crop_padding=2, pad_mode="reflect"))
    assert (reflect > 0).all()  # mirrored pixels, never zeros


def test_channel_conversion():
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    grey = data_lib.to_channels(rgb, 1)
    assert grey.shape == (2, 4, 4, 1) and int(grey[0, 0, 0, 0]) == 76  # 0.299 * 255
    assert data_lib.to_channels(grey, 3).shape == (2, 4, 4, 3)
    with pytest.raises(cnn.ConfigError, match="data.channels=3: cannot convert images with 4 channels"):
        data_lib.to_channels(np.zeros((1, 2, 2, 4), np.uint8), 3)


def test_digits_as_rgb_and_channels_refused_on_sequences():
    config = cnn.base_config()
    config.data.name, config.data.channels = "digits", 3
    assert cnn.load_dataset(config.data).input_shape == (8, 8, 3)
    config.data.name, config.data.max_length = "synthetic_series", 32
    with pytest.raises(cnn.ConfigError, match="data.channels=3 applies to images"):
        cnn.load_dataset(config.data)


def test_preprocess_scales_images_and_passes_ids_and_series_through():
    assert float(data_lib.preprocess(jnp.full((1, 2, 2, 1), 255, jnp.uint8)).max()) == 1.0
    ids = jnp.arange(6, dtype=jnp.int32).reshape(1, 6)
    assert data_lib.preprocess(ids, (0.5,), (0.2,)) is ids
    series = jnp.ones((1, 6, 2), jnp.float32) * 7
    assert data_lib.preprocess(series) is series


def test_vocabulary_from_training_text_and_encoding():
    train = [b"The film was great<br />great fun", "the END"]
    vocab = data_lib.build_vocabulary(train, 4)
    assert vocab == ["<pad>", "<oov>", "the", "great"]
    ids = data_lib.encode(["Great, the unknown word", "the the the the the the"], vocab, 5)
    assert ids.dtype == np.int32 and ids.tolist() == [[3, 2, 1, 1, 0], [2, 2, 2, 2, 2]]


def test_synthetic_series_is_fixed_and_balanced():
    config = cnn.base_config()
    config.data.name, config.data.max_length = "synthetic_series", 64
    a, b = cnn.load_dataset(config.data), cnn.load_dataset(config.data)
    assert a.input_shape == (64, 1) and a.train.images.dtype == np.float32 and a.num_classes == 4
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert np.bincount(a.train.labels).min() > 600


def test_imdb_mock_tokenises_and_caches_as_ids(tmp_path):
    config = cnn.load_config("configs/imdb.py")
    config.data.data_dir, config.data.vocab_size, config.data.max_length = str(tmp_path), 50, 16
    with tfds.testing.mock_data(num_examples=12):
        first = cnn.load_dataset(config.data)
    assert first.input_shape == (16,) and first.train.images.dtype == np.int32
    assert first.train.images.max() < 50 and first.class_names == ["neg", "pos"]
    second = cnn.load_dataset(config.data)  # from the cache, outside mock_data
    np.testing.assert_array_equal(first.test.images, second.test.images)
    assert (tmp_path / "cnn_cache" / "imdb_reviews__v50_l16" / "train" / "manifest.json").exists()


@pytest.mark.parametrize("field, value, message", [
    ("crop_padding", -1, "data.crop_padding=-1"), ("channels", 2, "data.channels=2"),
    ("pad_mode", "wrap", "data.pad_mode='wrap'"), ("vocab_size", 2, "data.vocab_size=2"),
    ("max_length", 0, "data.max_length=0"),
])
def test_bad_data_fields_name_the_field(field, value, message):
    config = cnn.base_config()
    config.data[field] = value
    with pytest.raises(cnn.ConfigError, match=message.replace("(", r"\(")):
        cnn.config.validate(config)


@pytest.mark.slow
def test_series_config_really_learns_the_wave_shapes(tmp_path, capsys):
    """1D convolutions end to end on real (synthetic) series: chance is 25%; 10 epochs reach ~90% (~15 s)."""
    run = cnn.train_and_evaluate(cnn.load_config("configs/series.py"), str(tmp_path))
    assert run.results["test_accuracy"] > 0.8
    out = capsys.readouterr().out
    assert out.count(" examples/s) at ") == 10 and "img/s" not in out  # series are not images
