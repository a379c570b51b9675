"""Your own data: image and text folders, series files, arrays and .npz, the decoded cache, and bad input."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cnn
from cnn import data as data_lib
from cnn.data import cache as cache_lib
from cnn.data import series as series_lib
from cnn.data.split import hold_out
from conftest import REPO, SHARED_DATASETS

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target


def _write_digit_folders(root: pathlib.Path, per_class: int | None = None) -> pathlib.Path:
    """The 1,797 scikit-learn digits as 8x8 PNGs in ROOT/<name>/, plus the usual debris of a real folder."""
    images, labels = _digits()
    count = {}
    for i, (image, label) in enumerate(zip(images, labels)):
        if per_class is not None and count.get(label, 0) >= per_class:
            continue
        count[label] = count.get(label, 0) + 1
        folder = root / DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    (root / "three" / "README.txt").write_text("not an image\n")
    (root / "three" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "four" / "corrupt.png").write_bytes((root / "four" / os.listdir(root / "four")[0]).read_bytes()[:60])
    (root / "five" / "empty.PNG").write_bytes(b"")
    return root


def _config(name: str, path, **fields):
    """A config's data section reading `path` as `name`."""
    config = cnn.base_config()
    config.data.name, config.data.path = name, str(path)
    for key, value in fields.items():
        config.data[key] = value
    return config.data


# --- The cache ------------------------------------------------------------------------------------------


def test_cache_entry_round_trips_and_rebuilds_what_is_damaged(tmp_path, capsys):
    folder = str(tmp_path / "entry")
    arrays = {"images": np.arange(600, dtype=np.uint8).reshape(6, 10, 10, 1) % 251, "labels": np.arange(6)}
    built = []

    def build():
        built.append(1)
        return cache_lib.Entry(arrays, {"class_names": ["a", "b"]})

    entry, hit = cache_lib.cached(folder, {"k": (1, 2)}, build)
    assert not hit and len(built) == 1
    manifest = json.loads((tmp_path / "entry" / "manifest.json").read_text())
    assert manifest["arrays"]["images"] == {"file": "images.npy", "shape": [6, 10, 10, 1], "dtype": "|u1",
                                            "bytes": 600, "crc32": cache_lib.checksum(arrays["images"])}
    assert manifest["info"]["class_names"] == ["a", "b"] and manifest["key"] == {"k": [1, 2]}
    again, hit = cache_lib.cached(folder, {"k": (1, 2)}, build)
    assert hit and len(built) == 1 and again.info["class_names"] == ["a", "b"]
    np.testing.assert_array_equal(again.arrays["images"], arrays["images"])

    npy = tmp_path / "entry" / "images.npy"
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF  # one edited byte: same size, wrong checksum
    npy.write_bytes(bytes(raw))
    assert cache_lib.read(folder, {"k": (1, 2)}) is None
    assert "is damaged (images.npy does not match its size or checksum); rebuilding it" in capsys.readouterr().err
    npy.write_bytes(bytes(raw[:200]))  # truncated
    assert cache_lib.read(folder, {"k": (1, 2)}) is None and "is damaged (images.npy" in capsys.readouterr().err
    entry, hit = cache_lib.cached(folder, {"k": (1, 2)}, build)
    assert not hit and len(built) == 2
    (tmp_path / "entry" / "labels.npy").unlink()  # missing
    entry, hit = cache_lib.cached(folder, {"k": (1, 2)}, build)
    assert not hit and len(built) == 3 and "is damaged (labels.npy" in capsys.readouterr().err
    assert cache_lib.read(folder, {"k": (1, 2)}) is not None  # rebuilt in place
    assert cache_lib.read(folder, {"k": (1, 3)}) is None and "data changed" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["entry"]  # no temporary folders left behind


def test_an_entry_killed_mid_write_never_looks_valid(tmp_path):
    """The writer's temporary folder is not the entry; a later writer removes it once its process is gone."""
    half = tmp_path / ".entry.tmp-999999999-abcd"  # a pid that cannot be alive
    half.mkdir()
    np.save(half / "images.npy", np.zeros(3))
    assert cache_lib.read(str(tmp_path / "entry"), "key") is None
    cache_lib.write(str(tmp_path / "entry"), "key", cache_lib.Entry({"x": np.ones(2)}, {}))
    assert sorted(os.listdir(tmp_path)) == ["entry"]


def test_hold_out_is_stratified_and_drawn_from_the_seed():
    labels = np.repeat(np.arange(3), [50, 30, 2])
    train, test = hold_out(labels, 0.2, seed=0)
    assert np.bincount(labels[test]).tolist() == [10, 6, 1]  # a class of two still gives one
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(82))
    np.testing.assert_array_equal(hold_out(labels, 0.2, seed=0)[1], test)
    assert not np.array_equal(hold_out(labels, 0.2, seed=1)[1], test)


# --- Image folders --------------------------------------------------------------------------------------


def test_image_folder_reads_classes_skips_and_lists_unreadable_files(tmp_path, capsys):
    root = _write_digit_folders(tmp_path / "digits")
    dataset = cnn.load_dataset(_config("image_folder", root), seed=0)
    assert dataset.class_names == sorted(DIGIT_NAMES)
    assert len(dataset.train) + len(dataset.test) == 1797 and 340 < len(dataset.test) < 380
    assert dataset.input_shape == (8, 8, 1) and dataset.train.images.dtype == np.uint8
    assert sorted(os.path.basename(p) for p, _ in dataset.skipped) == ["corrupt.png", "empty.PNG"]
    assert dict((os.path.basename(p), r) for p, r in dataset.skipped)["empty.PNG"] == "empty file"
    err = capsys.readouterr().err
    assert "2 files that are not images ignored" in err
    assert "unreadable" not in err and "Dataset.skipped" not in err  # training announces them, once

    # The pixels and labels are the files': digit 0 of the set is the first 'zero' file.
    images, labels = _digits()
    zero = sorted(DIGIT_NAMES).index("zero")
    everything = np.concatenate([dataset.train.images, dataset.test.images])
    assert any(np.array_equal(i[..., 0], images[0]) for i in everything[np.concatenate(
        [dataset.train.labels, dataset.test.labels]) == zero])

    # Cached: the same arrays, and an added file is noticed.
    again = cnn.load_dataset(_config("image_folder", root), seed=0)
    assert "from the cache" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.images, dataset.train.images)
    Image.fromarray(images[1]).save(root / "one" / "extra.png")
    grown = cnn.load_dataset(_config("image_folder", root), seed=0)
    assert len(grown.train) + len(grown.test) == 1798 and "data changed" in capsys.readouterr().err

    with pytest.raises(cnn.ConfigError, match=r"corrupt.png: could not be decoded .*set data.strict=False"):
        cnn.load_dataset(_config("image_folder", root, strict=True))


def test_image_modes_formats_and_sizes(tmp_path):
    rng = np.random.default_rng(0)
    grey, rgb = tmp_path / "mixed" / "grey", tmp_path / "mixed" / "rgb"
    grey.mkdir(parents=True)
    rgb.mkdir(parents=True)
    picture = rng.integers(0, 256, (6, 5, 3), np.uint8)
    Image.fromarray(picture[..., 0]).save(grey / "a.PNG")
    Image.fromarray(picture[..., 0]).save(grey / "b.bmp")
    Image.fromarray((picture[..., 0].astype(np.uint16) * 200)).save(grey / "c16.png")  # 16-bit grey
    Image.fromarray(picture).save(rgb / "d.JPG", quality=95)
    Image.fromarray(picture).convert("P").save(rgb / "e.gif")
    Image.fromarray(np.dstack([picture, np.full((6, 5), 255, np.uint8)])).save(rgb / "f.tiff")
    Image.fromarray(picture).save(rgb / "g.webp", lossless=True)
    dataset = cnn.load_dataset(_config("image_folder", tmp_path / "mixed", test_fraction=0.5))
    assert dataset.input_shape == (6, 5, 3)  # grey and colour mixed: RGB
    every = np.concatenate([dataset.train.images, dataset.test.images])
    assert len(every) == 7 and not dataset.skipped
    webp = [i for i in every if np.array_equal(i, picture)]
    assert webp, "the lossless WebP (and TIFF, its alpha opaque) read back exactly"
    assert any(i.max() == 255 and np.array_equal(i[..., 0], i[..., 1]) for i in every)  # 16-bit scaled to 8

    grey_only = cnn.load_dataset(_config("image_folder", tmp_path / "mixed", channels=1, test_fraction=0.5))
    assert grey_only.input_shape == (6, 5, 1)

    Image.fromarray(picture[:4, :4]).save(rgb / "small.png")
    with pytest.raises(cnn.ConfigError, match=r"images differ in size: .* is 5x6 and .*small.png is 4x4; set "
                                              r"data.image_size=\(height, width\)"):
        cnn.load_dataset(_config("image_folder", tmp_path / "mixed"))
    sized = cnn.load_dataset(_config("image_folder", tmp_path / "mixed", image_size=(10, 12), test_fraction=0.5))
    assert sized.input_shape == (10, 12, 3)


def test_test_folder_may_lack_classes_but_not_add_them(tmp_path):
    train = _write_digit_folders(tmp_path / "train", per_class=12)
    test = _write_digit_folders(tmp_path / "test", per_class=3)
    for name in ("eight", "nine"):
        for f in (test / name).iterdir():
            f.unlink()
        (test / name).rmdir()
    dataset = cnn.load_dataset(_config("image_folder", train, test_path=str(test)))
    assert len(dataset.train) == 120 and len(dataset.test) == 24 and dataset.class_names == sorted(DIGIT_NAMES)
    assert set(dataset.test.labels.tolist()) == {sorted(DIGIT_NAMES).index(n) for n in DIGIT_NAMES[:8]}
    (test / "ten").mkdir()
    with pytest.raises(cnn.ConfigError, match=r"data.test_path=.* has class folders that data.path lacks: 'ten'"):
        cnn.load_dataset(_config("image_folder", train, test_path=str(test)))


def test_digit_folders_train_and_predict_from_the_command_line(tmp_path):
    """End to end as a user runs it: the folder names are the classes in results.json and in cnn.predict."""
    root = _write_digit_folders(tmp_path / "digits")
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={workdir}",
            "--config.data.name=image_folder", f"--config.data.path={root}", "--config.train.num_epochs=2"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["class_names"] == sorted(DIGIT_NAMES) and results["test_accuracy"] > 0.85
    skipped = (workdir / "skipped_files.txt").read_text().splitlines()
    assert [os.path.basename(line.split("\t")[0]) for line in skipped] == ["corrupt.png", "empty.PNG"]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "skipped" in line or "unreadable" in line]
    assert said == [f"skipped 2 files that could not be read; {workdir / 'skipped_files.txt'} lists them with the "
                    "reasons"], said
    assert sorted(os.listdir(workdir / "plots")) == ["confusion_matrix.png", "feature_maps.png", "filters.png",
                                                      "learning_curves.png", "misclassified.png",
                                                      "per_class_recall.png"]

    seven = next((root / "seven").glob("*.png"))
    done = subprocess.run([sys.executable, "-m", "cnn.predict", f"--workdir={workdir}", str(seven)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{seven}: seven ("), done.stdout


# --- Text folders ---------------------------------------------------------------------------------------


def test_text_folder_tokenises_with_a_training_vocabulary(tmp_path):
    rng = np.random.default_rng(0)
    words = {"sport": ["goal", "match", "team", "score"], "weather": ["rain", "sun", "wind", "cloud"]}
    for name, vocabulary in words.items():
        (tmp_path / "news" / name).mkdir(parents=True)
        for i in range(20):
            text = " ".join(rng.choice(vocabulary + ["the", "a"], 12))
            (tmp_path / "news" / name / f"{i}.txt").write_text(text)
    (tmp_path / "news" / "sport" / "blank.txt").write_text("  \n")
    (tmp_path / "news" / "sport" / "notes.md").write_text("ignored")
    dataset = cnn.load_dataset(_config("text_folder", tmp_path / "news", vocab_size=20, max_length=8), seed=3)
    assert dataset.class_names == ["sport", "weather"] and dataset.input_shape == (8,)
    assert dataset.train.images.dtype == np.int32 and len(dataset.train) == 32 and len(dataset.test) == 8
    assert [os.path.basename(p) for p, _ in dataset.skipped] == ["blank.txt"]
    assert dataset.train.images.max() < 20 and (dataset.train.images > 1).mean() > 0.9  # known words
    config = cnn.load_config(str(REPO / "configs" / "imdb.py"))
    config.data.name, config.data.path, config.data.vocab_size, config.data.max_length = \
        "text_folder", str(tmp_path / "news"), 20, 8
    config.model.layers = ("Embedding(20, 8)", "Conv1D(8, 3, activation='relu')", "GlobalMaxPooling1D()",
                           "Dense(1, activation='sigmoid')")
    config.train.num_epochs, config.train.batch_size, config.optimizer.learning_rate = 8, 8, 3e-2
    run = cnn.train_and_evaluate(config, str(tmp_path / "run"))
    assert run.results["test_accuracy"] == 1.0  # the two classes share no topical word


# --- Series files ---------------------------------------------------------------------------------------


def test_ts_file_multivariate_variable_length_with_missing_values(tmp_path):
    lines = ["# comment", "@problemName toy", "@timeStamps false", "@missing true", "@univariate false",
             "@dimensions 2", "@equalLength false", "@classLabel true up down", "@data",
             "1,2,3,4:10,20,30,40:up", "4,?,2:40,30,NaN:down", "1,2,3,4,5:1,1,1,1,1:up", "5,4,3,2,1:2,2,2,2,2:down"]
    (tmp_path / "toy_TRAIN.ts").write_text("\n".join(lines) + "\n")
    parsed = series_lib.read_file(str(tmp_path / "toy_TRAIN.ts"))
    assert parsed.classes == ["up", "down"] and parsed.labels == ["up", "down", "up", "down"]
    filled = series_lib.fill_missing(parsed.series[1])
    np.testing.assert_allclose(filled, [[4, 40], [3, 30], [2, 30]])  # inside: interpolated; at the end: the last
    np.testing.assert_allclose(series_lib.fill_missing(np.array([[1.0], [np.nan], [np.nan]])), [[1.0]])
    config = _config("series_file", tmp_path / "toy_TRAIN.ts", test_fraction=0.5)
    dataset = cnn.load_dataset(config)
    assert dataset.input_shape == (5, 2) and dataset.train.images.dtype == np.float32
    assert dataset.class_names == ["up", "down"] and len(dataset.train) == len(dataset.test) == 2
    config.max_length = 3
    assert cnn.load_dataset(config).input_shape == (3, 2)


def test_ucr_2018_tsv_and_csv_files(tmp_path):
    rows = ["1\t0.5\t0.25\t0.1", "2\t-1\t-2\t-3", "1.0\t0.1\t0.2\tNaN", "2\t3\t2\t1"]
    (tmp_path / "a_TRAIN.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "a_TEST.csv").write_text("\n".join(r.replace("\t", ",") for r in rows[:2]) + "\n")
    dataset = cnn.load_dataset(_config("series_file", tmp_path / "a_TRAIN.tsv", test_path=str(tmp_path / "a_TEST.csv")))
    assert dataset.class_names == ["1", "2"] and dataset.input_shape == (3, 1)
    assert dataset.train.labels.tolist() == [0, 1, 0, 1] and dataset.test.labels.tolist() == [0, 1]
    np.testing.assert_allclose(dataset.train.images[2, :, 0], [0.1, 0.2, 0.0])  # the NaN ended it; zero-padded
    (tmp_path / "b_TEST.csv").write_text("3,1,2,3\n")
    with pytest.raises(cnn.ConfigError, match=r"data.test_path=.* has labels that data.path lacks: '3'"):
        cnn.load_dataset(_config("series_file", tmp_path / "a_TRAIN.tsv", test_path=str(tmp_path / "b_TEST.csv")))


def _aeon_data(name: str) -> pathlib.Path:
    """A UCR/UEA set inside aeon's wheel, found without importing aeon (seconds of imports)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None:
        pytest.skip("aeon is not installed (pip install -e '.[dev]')")
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def test_reads_uea_sets_as_aeon_ships_them():
    basic = _aeon_data("BasicMotions")
    dataset = cnn.load_dataset(_config("series_file", basic / "BasicMotions_TRAIN.ts",
                                       test_path=str(basic / "BasicMotions_TEST.ts")))
    assert dataset.input_shape == (100, 6) and len(dataset.train) == len(dataset.test) == 40
    assert dataset.class_names == ["Standing", "Running", "Walking", "Badminton"]  # @classLabel's order
    vowels = _aeon_data("JapaneseVowels")
    dataset = cnn.load_dataset(_config("series_file", vowels / "JapaneseVowels_TRAIN.ts",
                                       test_path=str(vowels / "JapaneseVowels_TEST.ts")))
    assert dataset.input_shape == (29, 12) and (len(dataset.train), len(dataset.test)) == (270, 370)
    assert (dataset.train.images[:, -1] == 0).all(axis=-1).mean() > 0.5  # most are shorter: zero-padded


@pytest.mark.slow
def test_fcn_on_italy_power_demand_lands_in_the_published_range(tmp_path):
    """Wang et al. 2017 report a 0.030 test error for FCN on ItalyPowerDemand (97.0%); 30 epochs, ~20 s."""
    data = _aeon_data("ItalyPowerDemand")
    config = cnn.load_config(str(REPO / "configs" / "ucr.py"))
    config.data.path = str(data / "ItalyPowerDemand_TRAIN.ts")
    config.data.test_path = str(data / "ItalyPowerDemand_TEST.ts")
    config.train.num_epochs = 30
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.results["test_accuracy"] >= 0.95  # 1,029 test series; chance is 0.5
    assert run.results["class_names"] == ["1", "2"]
    top = cnn.predict(run, run.dataset.test.images[:5], top_k=1)  # series predict with the file's labels
    assert all(row[0][0] in ("1", "2") for row in top)


# --- Arrays and .npz ------------------------------------------------------------------------------------


def test_from_arrays_takes_images_series_and_labels_of_every_kind():
    images, labels = _digits()
    grey = cnn.from_arrays(images[:100], labels[:100], images[100:150], labels[100:150])
    assert grey.input_shape == (8, 8, 1) and grey.class_names == [str(i) for i in range(10)]
    floats = cnn.from_arrays(images[:100, ..., None] / 255.0, labels[:100], images[100:110, ..., None] / 255.0,
                             labels[100:110])
    np.testing.assert_array_equal(floats.train.images, grey.train.images)
    names = np.array(DIGIT_NAMES)
    named = cnn.from_arrays(images[:100], names[labels[:100]], images[100:110], names[labels[100:110]])
    assert named.class_names == sorted(DIGIT_NAMES)
    assert [named.class_names[i] for i in named.test.labels] == names[labels[100:110]].tolist()
    given = cnn.from_arrays(images[:100], labels[:100], images[:5], labels[:5], class_names=DIGIT_NAMES)
    assert given.class_names == DIGIT_NAMES and given.train.labels.tolist() == labels[:100].tolist()
    series = cnn.from_arrays(np.random.default_rng(0).normal(size=(20, 30)), [1, 2] * 10,
                             np.zeros((4, 30)), [2, 2, 1, 1])
    assert series.input_shape == (30, 1) and series.class_names == ["1", "2"] and series.test.labels.tolist() == \
        [1, 1, 0, 0] and series.train.images.dtype == np.float32


@pytest.mark.parametrize("change, message", [
    ({"y_train": np.zeros(7, int)}, "y_train has 7 labels but x_train has 20 examples"),
    ({"x_test": np.full((4, 8, 8, 1), np.nan)}, "x_test holds 256 NaN or infinite values"),
    ({"x_train": np.full((20, 8, 8, 1), np.inf, np.float32)}, "x_train holds 1,280 NaN or infinite values"),
    ({"x_train": np.zeros((20, 8, 8), bool)}, "x_train is bool shaped (20, 8, 8); cnn takes uint8 images"),
    ({"x_train": np.zeros((20, 8, 8), np.int64)}, "x_train is int64"),
    ({"x_test": np.full((4, 8, 8, 1), 3.0)}, "x_test holds float images with values in [3, 3]"),
    ({"class_names": ["a", "b"]}, "y_train holds labels outside class_names: 2"),
    ({"y_test": np.array(["x"] * 4)}, "must both be int labels or both string labels"),
    ({"y_test": np.array([0, 1, 9, 9])}, "y_test holds labels that y_train lacks: 9"),
    ({"x_test": np.zeros((4, 6, 6), np.uint8)}, "x_test examples are uint8 (6, 6, 1) but x_train's are"),
    ({"y_train": np.zeros(20, int), "y_test": np.zeros(4, int)}, "y_train holds one class"),
])
def test_from_arrays_names_the_bad_argument(change, message):
    args = {"x_train": np.zeros((20, 8, 8), np.uint8), "y_train": np.arange(20) % 3,
            "x_test": np.zeros((4, 8, 8), np.uint8), "y_test": np.array([0, 1, 2, 0]), "class_names": None}
    args.update(change)
    with pytest.raises(cnn.ConfigError) as raised:
        cnn.from_arrays(**args)
    assert message in str(raised.value)


def test_arrays_train_through_the_config_preprocessing(tmp_path):
    """config.data only preprocesses: image_size and channels are applied, and mean/std are checked."""
    images, labels = _digits()
    dataset = cnn.from_arrays(images[:1400], labels[:1400], images[1400:], labels[1400:], class_names=DIGIT_NAMES)
    config = cnn.load_config(str(REPO / "configs" / "digits.py"))
    config.train.num_epochs = 3
    config.data.image_size, config.data.channels = (12, 12), 3
    run = cnn.train_and_evaluate(config, str(tmp_path / "run"), dataset=dataset)
    assert run.results["input_shape"] == [12, 12, 3] and run.results["class_names"] == DIGIT_NAMES
    assert run.results["test_accuracy"] > 0.85 and run.results["dataset"] == "arrays"
    assert cnn.predict(run, images[1400:1401], top_k=1)[0][0][0] == DIGIT_NAMES[labels[1400]]
    folder_config = cnn.load_config(str(REPO / "configs" / "image_folder.py"))  # no data.path: not needed here
    folder_config.data.channels, folder_config.data.mean, folder_config.data.std = 3, (0.5, 0.5), (0.2, 0.2)
    fresh = cnn.from_arrays(images[:100], labels[:100], images[100:120], labels[100:120])
    with pytest.raises(cnn.ConfigError, match=r"data.mean=\(0.5, 0.5\) has 2 values but the images have 3"):
        cnn.train_and_evaluate(folder_config, str(tmp_path / "other"), dataset=fresh)
    with pytest.raises(cnn.ConfigError, match=r"data.name='image_folder' reads your own data: set data.path"):
        cnn.load_dataset(folder_config.data)


def test_npz_in_the_keras_layout_and_with_only_a_training_split(tmp_path):
    images, labels = _digits()
    np.savez(tmp_path / "digits.npz", x_train=images[:1500], y_train=labels[:1500], x_test=images[1500:],
             y_test=labels[1500:])
    dataset = cnn.load_dataset(_config("npz", tmp_path / "digits.npz"))
    assert (len(dataset.train), len(dataset.test), dataset.input_shape) == (1500, 297, (8, 8, 1))
    assert dataset.name == "npz"
    np.savez(tmp_path / "train_only.npz", x_train=images, y_train=np.array(DIGIT_NAMES)[labels],
             class_names=np.array(DIGIT_NAMES))
    held = cnn.load_dataset(_config("npz", tmp_path / "train_only.npz", test_fraction=0.1), seed=0)
    assert abs(len(held.test) - 180) <= 5 and held.class_names == DIGIT_NAMES  # 10% of each class, rounded
    np.savez(tmp_path / "bad.npz", x_train=images[:10], y_train=labels[:12])
    with pytest.raises(cnn.ConfigError, match=r"bad.npz': y_train has 12 labels but x_train has 10 examples"):
        cnn.load_dataset(_config("npz", tmp_path / "bad.npz"))


# --- Bad input from the command line ---------------------------------------------------------------------


def _bad_input(case: str, tmp: pathlib.Path) -> tuple[list[str], str]:
    """The overrides that make `case`, and the start of the one error line it must give."""
    root = tmp / case
    root.mkdir()
    if case == "empty folder":
        return ["--config.data.name=image_folder", f"--config.data.path={root}"], "has no class folders"
    if case == "single class":
        _write_digit_folders(root, per_class=3)
        for name in DIGIT_NAMES[1:]:
            for f in (root / name).iterdir():
                f.unlink()
            (root / name).rmdir()
        return ["--config.data.name=image_folder", f"--config.data.path={root}"], "has one class folder ('zero')"
    if case == "unreadable class":
        _write_digit_folders(root, per_class=3)
        for f in (root / "two").iterdir():
            f.write_bytes(b"garbage")
        return (["--config.data.name=image_folder", f"--config.data.path={root}"],
                "the class folder 'two' has no readable image (3 could not be read")
    if case == "unknown test classes":
        _write_digit_folders(root / "train", per_class=3)
        (root / "test" / "eleven").mkdir(parents=True)
        return (["--config.data.name=image_folder", f"--config.data.path={root / 'train'}",
                 f"--config.data.test_path={root / 'test'}"], "has class folders that data.path lacks: 'eleven'")
    if case == "missing path":
        return ["--config.data.name=image_folder", f"--config.data.path={root / 'nowhere'}"], "does not exist"
    if case == "npz missing keys":
        np.savez(root / "x.npz", x_train=np.zeros((4, 8, 8), np.uint8), x_test=np.zeros((2, 8, 8), np.uint8))
        return ["--config.data.name=npz", f"--config.data.path={root / 'x.npz'}"], "lacks 'y_train', 'y_test'"
    (root / "x_TRAIN.ts").write_text("@problemName x\n@univariate true\n@data\n1,2,3:1\n")
    return (["--config.data.name=series_file", f"--config.data.path={root / 'x_TRAIN.ts'}"],
            "has no class labels in its header")


@pytest.mark.parametrize("case", ["empty folder", "single class", "unreadable class", "unknown test classes",
                                  "missing path", "npz missing keys", "ts broken header"])
def test_bad_own_data_is_one_line_and_keeps_the_workdir(case, tmp_path):
    overrides, message = _bad_input(case, tmp_path)
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "results.json").write_text('{"test_accuracy": 0.5}\n')  # an earlier run's
    (workdir / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "cnn.main", "--config=configs/digits.py", f"--workdir={workdir}",
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    after = {p.name: p.read_bytes() for p in workdir.iterdir() if p.name != ".lock"}  # the run's (released) lock
    assert after == before


# --- Against the TFDS path --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_from_folders_matches_its_archives(tmp_path):
    """The same Fashion-MNIST images, exported to class folders, train as the set read from its archives (the
    arrays TFDS gives, test_mnist.py shows) does (~1 minute).

    Training files are lossless PNGs named by their TFDS index, so the folder
    gives the same arrays in the same order and the runs agree; a fifth of
    the test images are JPEGs, and a corrupt, an empty and two stray files
    lie beside them.
    """
    if not (SHARED_DATASETS / "fashion_mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no Fashion-MNIST archives in {SHARED_DATASETS}")
    config = cnn.load_config(str(REPO / "configs" / "fashion_mnist.py"))
    config.data.manual_dir = str(SHARED_DATASETS / "fashion_mnist")
    config.data.train_split, config.data.test_split = "train[:4000]", "test[:2000]"
    config.train.num_epochs = 2
    archive_run = cnn.train_and_evaluate(config, str(tmp_path / "archive_run"))
    archive_data = archive_run.dataset
    folders = [f"{i}_{name.replace('/', '_')}" for i, name in enumerate(archive_data.class_names)]
    for split, part in (("train", archive_data.train), ("test", archive_data.test)):
        for folder in folders:
            (tmp_path / split / folder).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(part.images, part.labels)):
            jpeg = split == "test" and i % 5 == 0
            Image.fromarray(image[..., 0]).save(tmp_path / split / folders[label] / f"{i:05d}.{'jpg' if jpeg else 'png'}",
                                                quality=95)
    (tmp_path / "train" / folders[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "train" / folders[1] / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / folders[2] / "README.txt").write_text("exported from the archives\n")
    (tmp_path / "test" / ".DS_Store").write_bytes(b"\0")

    config.data.name, config.data.path, config.data.test_path = "image_folder", str(tmp_path / "train"), \
        str(tmp_path / "test")
    folder_run = cnn.train_and_evaluate(config, str(tmp_path / "folder_run"))
    assert folder_run.class_names == folders
    np.testing.assert_array_equal(folder_run.dataset.train.images, archive_data.train.images)
    np.testing.assert_array_equal(folder_run.dataset.train.labels, archive_data.train.labels)
    assert sorted(os.path.basename(p) for p, _ in folder_run.dataset.skipped) == ["broken.png", "empty.jpg"]
    assert len((tmp_path / "folder_run" / "skipped_files.txt").read_text().splitlines()) == 2
    archive_accuracy, folder_accuracy = archive_run.results["test_accuracy"], folder_run.results["test_accuracy"]
    assert archive_accuracy > 0.75
    assert abs(folder_accuracy - archive_accuracy) <= 0.005, (folder_accuracy, archive_accuracy)
