"""The evaluator: per-class metrics equal scikit-learn's on predictions recomputed here, and test-time augmentation."""

import dataclasses
import glob
import json
import os
import struct

import numpy as np
import optax
import pytest
from sklearn import metrics

import cnn
from cnn import data as data_lib
from cnn import config as config_lib
from cnn import losses, plots, sharding
from cnn.inference import probabilities
from cnn.inference.export import exportable
from cnn.train import Recipe, TrainResult, create_state, evaluation
from cnn.train.steps import compile_eval_step


def _logits(run, images: np.ndarray) -> np.ndarray:
    """The trained model's logits, computed apart from the evaluator: a plain apply, no jit, no padding."""
    return np.asarray(run.model.apply(run.state.variables(), data_lib.preprocess(images), logits=True), np.float32)


def _probabilities(run, images: np.ndarray) -> np.ndarray:
    return np.asarray(losses.probabilities(run.recipe.loss, _logits(run, images)))


def _expected(labels: np.ndarray, predicted: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """scikit-learn's figures for the predictions, written out here rather than through cnn's code."""
    p, r, f, s = metrics.precision_recall_fscore_support(labels, predicted, labels=range(len(names)), zero_division=0)
    out = {"per_class": {n: {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
                         for i, n in enumerate(names)},
           "macro_f1": metrics.f1_score(labels, predicted, average="macro", zero_division=0),
           "balanced_accuracy": metrics.balanced_accuracy_score(labels, predicted)}
    if len(names) > 5:
        out["top5_accuracy"] = metrics.top_k_accuracy_score(labels, probs, k=5, labels=range(len(names)))
    if len(names) == 2:
        out["roc_auc"] = metrics.roc_auc_score(labels, probs[:, 1])
        out["average_precision"] = metrics.average_precision_score(labels, probs[:, 1])
    return out


def _check_against_sklearn(workdir: str, run, test: data_lib.Split, predicted: np.ndarray, probs: np.ndarray
                           ) -> dict:
    results = json.loads(open(os.path.join(workdir, "results.json")).read())
    last = json.loads(open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()[-1])
    assert results["test_accuracy"] == pytest.approx(metrics.accuracy_score(test.labels, predicted), abs=1e-6)
    expected = _expected(test.labels, predicted, probs, run.class_names)
    for record in (results, last):
        assert set(evaluation.METRICS) & record.keys() == expected.keys()
        _same_metrics(record, expected)
    return results


def _same_metrics(got: dict, expected: dict, rel: float = 1e-9, abs: float = 1e-5) -> None:
    """Per-class figures (from predicted classes) to `rel`; the scalars to `abs` (those from probabilities differ
    by float rounding)."""
    assert got["per_class"].keys() == expected["per_class"].keys()
    for name, figures in expected["per_class"].items():
        assert got["per_class"][name] == pytest.approx(figures, rel=rel), name
    for key, value in expected.items():
        if key != "per_class":
            assert got[key] == pytest.approx(value, abs=abs), key


def _scalar_tags(workdir: str) -> set[str]:
    """The scalar tags of the workdir's TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        data, at = open(path, "rb").read(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            tags |= {v.tag for v in event.summary.value if v.HasField("simple_value")}
            at += 12 + length + 4
    return tags


def test_ten_classes_metrics_equal_sklearns(digits_run, capsys):
    workdir, run, dataset = digits_run
    test = dataset.test
    logits = _logits(run, test.images)
    results = _check_against_sklearn(workdir, run, test, logits.argmax(-1), _probabilities(run, test.images))
    assert "roc_auc" not in results and "average_precision" not in results
    assert {"test/macro_f1", "test/balanced_accuracy", "test/top5_accuracy", "test/accuracy"} <= _scalar_tags(workdir)
    assert not any("per_class" in tag for tag in _scalar_tags(workdir))
    assert os.path.isfile(os.path.join(workdir, "plots", "per_class_recall.png"))
    assert not os.path.exists(os.path.join(workdir, "plots", "roc_curve.png"))


def _two_digits(first: int, second: int) -> data_lib.Dataset:
    digits = data_lib.load_dataset(cnn.load_config("configs/digits.py").data)
    split = lambda s: data_lib.Split(s.images[np.isin(s.labels, (first, second))],  # noqa: E731
                                     (s.labels[np.isin(s.labels, (first, second))] == second).astype(np.int32))
    return data_lib.Dataset("digits_3_8", split(digits.train), split(digits.test), [str(first), str(second)])


def test_two_class_sigmoid_metrics_equal_sklearns_and_draw_the_curves(tmp_path, capsys):
    config = cnn.load_config("configs/digits.py")
    config.model.layers = ("Conv2D(8, 3, activation='relu')", "Flatten()", "Dense(1, activation='sigmoid')")
    config.train.num_epochs, config.optimizer.learning_rate = 2, 2e-3
    run = cnn.train_and_evaluate(config, str(tmp_path), dataset=_two_digits(3, 8))
    assert run.recipe.loss == "sigmoid_binary_cross_entropy"
    test = run.dataset.test
    z = _logits(run, test.images)[:, 0]
    results = _check_against_sklearn(str(tmp_path), run, test, (z > 0).astype(int), _probabilities(run, test.images))
    assert "top5_accuracy" not in results and 0.5 < results["roc_auc"] <= 1
    assert {"test/roc_auc", "test/average_precision"} <= _scalar_tags(str(tmp_path))
    table = capsys.readouterr().out
    assert "class  precision  recall      f1  support" in table
    assert f"3         {results['per_class']['3']['precision']:.4f}" in table

    paths = plots.write_plots(str(tmp_path), run, run.dataset)
    names = {os.path.basename(p) for p in paths}
    assert {"roc_curve.png", "precision_recall_curve.png", "per_class_recall.png"} <= names
    roc = plots.roc_curve(run, test)
    assert f"AUC {results['roc_auc']:.4f}" in roc.axes[0].get_legend().get_texts()[0].get_text()
    bars = plots.per_class_recall(run, test).axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([results["per_class"][c]["recall"] for c in "38"])


def _evaluate(state, recipe, split) -> dict:
    mesh = sharding.make_mesh()
    return evaluation.evaluate(state, split, 100, compile_eval_step(mesh, recipe), sharding.batch_sharding(mesh))


def test_flip_tta_on_a_mirror_symmetric_model_changes_nothing():
    """A convolution whose kernels are their own mirror images, then global average pooling: the model gives an
    image and its mirror the same logits, so averaging the two changes no probability."""
    config = cnn.load_config("configs/digits.py")
    test = data_lib.load_dataset(config.data).test
    model = cnn.build_model(["Conv2D(16, 3, activation='relu', padding='same')", "GlobalAveragePooling2D()",
                             "Dense(10)"])
    state = create_state(model, optax.sgd(0.1), test.images.shape[1:], 0)
    kernel = state.params["conv2d"]["kernel"]
    state = state.replace(params={**state.params, "conv2d": {**state.params["conv2d"],
                                                             "kernel": (kernel + kernel[:, ::-1]) / 2}})
    plain = Recipe()
    flip = dataclasses.replace(plain, tta="flip")
    without, with_tta = _evaluate(state, plain, test), _evaluate(state, flip, test)
    assert with_tta["accuracy"] == without["accuracy"]
    assert with_tta["loss"] == pytest.approx(without["loss"], rel=1e-5)
    assert with_tta["metrics"].keys() == without["metrics"].keys()
    _same_metrics(with_tta["metrics"], without["metrics"], abs=1e-6)

    run = TrainResult(state=state, model=model, history=[], results={}, class_names=list("0123456789"))
    np.testing.assert_allclose(probabilities(dataclasses.replace(run, recipe=flip), test.images),
                               probabilities(run, test.images), atol=1e-6)


def test_flip_tta_averages_the_mirrors_probabilities_in_evaluation_and_prediction(tmp_path):
    config = cnn.load_config("configs/digits.py")
    config.train.num_epochs, config.train.pictures, config.eval.tta = 1, False, "flip"
    run = cnn.train_and_evaluate(config, str(tmp_path))
    assert run.recipe.tta == "flip"
    test = run.dataset.test
    plain = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, tta=None))
    mean = (_probabilities(run, test.images) + _probabilities(run, test.images[:, :, ::-1])) / 2
    assert np.abs(mean - _probabilities(run, test.images)).max() > 0.05  # digits are not mirror images
    _check_against_sklearn(str(tmp_path), run, test, mean.argmax(-1), mean)
    assert run.results["test_loss"] == pytest.approx(
        float(-np.log(mean[np.arange(len(test)), test.labels]).mean()), rel=1e-4)
    assert abs(run.results["test_loss"] - _evaluate(run.state, plain.recipe, test)["loss"]) > 1e-3

    loaded = cnn.load_run(str(tmp_path))  # prediction and exports average too
    assert loaded.recipe.tta == "flip"
    np.testing.assert_allclose(probabilities(loaded, test.images), mean, atol=1e-5)
    np.testing.assert_allclose(exportable(loaded).bound()(test.images), mean, atol=1e-5)  # what exports trace


def test_flip_tta_is_refused_on_series_and_unknown_names(tmp_path):
    config = cnn.base_config()
    config.data.name, config.data.max_length, config.model.preset, config.model.layers = \
        "synthetic_series", 32, "fcn", ()
    config.eval.tta = "flip"
    with pytest.raises(cnn.ConfigError, match=r"^eval.tta='flip' mirrors images, but synthetic_series holds "
                                              r"sequences shaped \(32, 1\); leave eval.tta=None$"):
        cnn.train_and_evaluate(config, str(tmp_path / "series"))
    assert not os.path.exists(tmp_path / "series")
    config.eval.tta = "rotate"
    with pytest.raises(cnn.ConfigError, match=r"^eval.tta='rotate' is not valid: expected None or one of 'flip'$"):
        config_lib.validate(config)


def test_binary_metrics_are_none_when_the_split_holds_one_class():
    predictions = evaluation.Predictions(np.zeros(4, int), np.array([0, 1, 0, 0]),
                                         np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]))
    out = evaluation.class_metrics(predictions, ["a", "b"])
    assert out["roc_auc"] is None and out["average_precision"] is None
    assert out["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["balanced_accuracy"] == 0.75 and "top5_accuracy" not in out


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn's, on the class predicted but absent
@pytest.mark.parametrize("seed", [0, 1])
def test_class_metrics_equal_sklearns_with_absent_and_never_predicted_classes(seed):
    """cnn counts the metrics itself (no second of sklearn imports in the first evaluation): equal to scikit-learn's
    calls with every class listed, on 10 classes where one never occurs, one is never predicted, and probabilities
    tie."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 9], 300)  # no 7
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 10, 300))
    predicted[predicted == 3] = 4  # 3 is never predicted
    probs = np.round(rng.dirichlet(np.ones(10), 300), 1)  # rounded: ties among the top five
    got = evaluation.class_metrics(evaluation.Predictions(labels, predicted, probs), [str(i) for i in range(10)])
    classes = np.arange(10)
    p, r, f, s = metrics.precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    expected = {"per_class": {str(i): {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]} for i in classes},
                "macro_f1": metrics.f1_score(labels, predicted, labels=classes, average="macro", zero_division=0),
                "balanced_accuracy": metrics.balanced_accuracy_score(labels, predicted),
                "top5_accuracy": metrics.top_k_accuracy_score(labels, probs, k=5, labels=classes)}
    _same_metrics(got, expected, abs=1e-12)
