"""torch state dicts (torch.save's zip, .safetensors) into cnn's backbones, without torch (cnn/models/torch_files.py).

The tests write torch's zip themselves: `_Pickler` emits the same opcodes torch.save does (a
`torch._utils._rebuild_tensor_v2` call per tensor on a storage named by a persistent id), without importing torch.
A torchvision ResNet-18 of random values is then checked against a forward pass written here on the state dict's
own arrays in torch's layout (NCHW, OIHW). The other three architectures' names and shapes are torchvision's,
recorded in tests/data/torchvision_state_dicts.json (torchvision 0.29.1: `[(key, shape, dtype) for key, value in
torchvision.models.NAME(num_classes=10).state_dict().items()]`); experiments/pretrained_parity.py compares their
outputs with torchvision itself.
"""

import argparse
import collections
import os
import json
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import cnn
import cnn.models

STATE_DICTS = json.loads((pathlib.Path(__file__).parent / "data" / "torchvision_state_dicts.json").read_text())


class _Global:
    """A global by its module and name, as a torch class or function appears in torch's pickles."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise NotImplementedError


class _Storage:
    """A torch storage: the values of one or more tensors, one after another (three zeros first, so offsets are
    never 0)."""

    def __init__(self, key, dtype):
        self.key, self.chunks, self.size = key, [np.zeros(3, dtype)], 3

    def add(self, values):
        offset, self.size = self.size, self.size + values.size
        self.chunks.append(values.ravel())
        return offset


class _Tensor:
    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self):
        return (_Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):
    """torch.save's pickle: storages as persistent ids ('storage', torch.<Type>Storage, key, 'cpu', numel)."""

    TYPES = {"float32": "FloatStorage", "int64": "LongStorage", "float16": "HalfStorage"}

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = _Global("torch", self.TYPES[obj.chunks[0].dtype.name])
            return ("storage", kind, obj.key, "cpu", obj.size)
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        else:
            super().save(obj, save_persistent_id)


def torch_save(path, obj, archive="archive"):
    """Writes `obj` (dicts whose arrays become torch tensors) as torch.save does. Tensors of one dtype share a
    storage at offsets, and 2-D ones are stored transposed with strides that read them back, as torch may."""
    storages, shared = [], {}

    def tensor(array):
        if array.ndim == 2:  # column-major: strides (1, rows)
            storages.append(_Storage(str(len(storages)), array.dtype))
            return _Tensor(storages[-1], storages[-1].add(array.T.copy()), array.shape, (1, array.shape[0]))
        if array.dtype.name not in shared or shared[array.dtype.name].size > 50_000:
            shared[array.dtype.name] = _Storage(str(len(storages)), array.dtype)
            storages.append(shared[array.dtype.name])
        storage, strides = shared[array.dtype.name], tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
        return _Tensor(storage, storage.add(array), array.shape, strides)

    convert = lambda o: collections.OrderedDict((k, convert(v)) for k, v in o.items()) if isinstance(o, dict) \
        else tensor(o) if isinstance(o, np.ndarray) else o
    data = pickle.io.BytesIO()
    _Pickler(data, protocol=2).dump(convert(obj))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{archive}/data.pkl", data.getvalue())
        zf.writestr(f"{archive}/byteorder", "little")
        zf.writestr(f"{archive}/version", "3\n")
        for storage in storages:
            values = np.concatenate(storage.chunks)
            zf.writestr(f"{archive}/data/{storage.key}", values.astype(values.dtype.newbyteorder("<")).tobytes())


def resnet18_state_dict(rng, classes=10):
    """torchvision's resnet18(num_classes=classes).state_dict() keys and shapes, random values (running variances
    positive)."""
    state = {}

    def conv(name, out, inp, k):
        state[f"{name}.weight"] = rng.normal(0, (2 / (inp * k * k)) ** 0.5, (out, inp, k, k)).astype(np.float32)

    def bn(name, n):
        for leaf, value in (("weight", rng.uniform(0.5, 1.5, n)), ("bias", rng.normal(0, 0.2, n)),
                            ("running_mean", rng.normal(0, 0.2, n)), ("running_var", rng.uniform(0.5, 2, n))):
            state[f"{name}.{leaf}"] = value.astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.asarray(7, np.int64)

    conv("conv1", 64, 3, 7), bn("bn1", 64)
    channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            name = f"layer{stage + 1}.{block}"
            conv(f"{name}.conv1", width, channels, 3), bn(f"{name}.bn1", width)
            conv(f"{name}.conv2", width, width, 3), bn(f"{name}.bn2", width)
            if block == 0 and stage > 0:
                conv(f"{name}.downsample.0", width, channels, 1), bn(f"{name}.downsample.1", width)
            channels = width
    state["fc.weight"] = rng.normal(0, 0.05, (classes, 512)).astype(np.float32)
    state["fc.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    return state


@jax.jit
def resnet18_reference(state, x):
    """torchvision's ResNet-18 forward in eval mode, on the state dict as it is (NCHW inputs, OIHW kernels), up to
    its pooled features."""
    conv = lambda x, name, stride, pad: jax.lax.conv_general_dilated(
        x, state[f"{name}.weight"], (stride, stride), [(pad, pad)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    per_channel = lambda name, leaf: state[f"{name}.{leaf}"][None, :, None, None]
    bn = lambda x, name: (x - per_channel(name, "running_mean")) / jnp.sqrt(per_channel(name, "running_var") + 1e-5) \
        * per_channel(name, "weight") + per_channel(name, "bias")
    x = jax.nn.relu(bn(conv(x, "conv1", 2, 3), "bn1"))
    x = jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)])
    for stage in range(4):
        for block in range(2):
            name, stride = f"layer{stage + 1}.{block}", 2 if stage and not block else 1
            y = jax.nn.relu(bn(conv(x, f"{name}.conv1", stride, 1), f"{name}.bn1"))
            y = bn(conv(y, f"{name}.conv2", 1, 1), f"{name}.bn2")
            if f"{name}.downsample.0.weight" in state:
                x = bn(conv(x, f"{name}.downsample.0", stride, 0), f"{name}.downsample.1")
            x = jax.nn.relu(x + y)
    return x.mean(axis=(2, 3))


@pytest.fixture(scope="module")
def resnet18():
    """A random torchvision ResNet-18 state dict, an input batch (NCHW) and torchvision's softmax for it."""
    rng = np.random.default_rng(0)
    state = resnet18_state_dict(rng)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    expected = jax.nn.softmax(resnet18_reference(state, x) @ state["fc.weight"].T + state["fc.bias"])
    assert np.ptp(expected, axis=1).min() > 0.05, "near-uniform predictions would make the comparison weak"
    return state, x, expected


def _predict(path, x, name="resnet18", **kwargs):
    module, variables = cnn.models.pretrained(name, path, input_shape=x.shape[2:] + x.shape[1:2], **kwargs)
    logits = jax.jit(module.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return module, variables, jax.nn.softmax(logits)


@pytest.mark.parametrize("layout", ["torch", "safetensors", "checkpoint"])
def test_a_torchvision_resnet18_state_dict_predicts_as_torchvision(resnet18, tmp_path, layout):
    state, x, expected = resnet18
    path = tmp_path / "weights.bin"  # the kind comes from the content, not the extension
    if layout == "safetensors":
        safetensors.numpy.save_file(state, path)
    else:
        torch_save(path, state if layout == "torch" else {"epoch": 3, "state_dict": state}, archive="resnet18")
    module, variables, probabilities = _predict(path, x)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert module.num_classes == 10
    np.testing.assert_array_equal(variables["params"]["layer2_0"]["downsample_0"]["kernel"],
                                  state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))


def test_a_new_head_stays_initialised_and_the_rest_loads(resnet18, tmp_path):
    state, x, _ = resnet18
    torch_save(tmp_path / "r18.pth", state)
    module, variables, probabilities = _predict(tmp_path / "r18.pth", x, num_classes=4)
    head = variables["params"]["fc"]
    assert module.num_classes == 4 and head["kernel"].shape == (512, 4)
    assert not head["bias"].any() and 0.02 < np.std(head["kernel"]) < 0.08  # Flax's Dense initialisers
    features = resnet18_reference(state, x)
    np.testing.assert_allclose(probabilities, jax.nn.softmax(features @ head["kernel"] + head["bias"]), atol=1e-5)


def test_another_architecture_or_width_names_the_tensor_that_does_not_fit(resnet18, tmp_path):
    state, x, _ = resnet18
    torch_save(tmp_path / "r18.pth", state)
    with pytest.raises(cnn.ConfigError, match=r"has no layer 'layer1\.0\.(downsample\.\d|conv3|bn3)': the file is "
                                              r"for another architecture"):
        cnn.models.pretrained("resnet50", tmp_path / "r18.pth", input_shape=(32, 32, 3))
    narrow = {**state, "conv1.weight": state["conv1.weight"][:32]}
    safetensors.numpy.save_file(narrow, tmp_path / "narrow.safetensors")
    with pytest.raises(cnn.ConfigError) as error:
        _predict(tmp_path / "narrow.safetensors", x)
    assert str(error.value).endswith("layer 'conv1' tensor 0 (the model's conv1/kernel) has shape (7, 7, 3, 32) in "
                                     "the file but (7, 7, 3, 64) in the model: the file is for another architecture "
                                     "(or another width, input size or class count)")
    with pytest.raises(cnn.ConfigError, match=r"a torchvision file's weights fit resnet50\(style='torchvision'\); "
                                              "drop the style override"):
        cnn.models.pretrained("resnet50(style='keras')", tmp_path / "r18.pth")


@pytest.mark.parametrize("name", sorted(STATE_DICTS))
def test_every_tensor_of_torchvisions_state_dicts_finds_its_one_place(tmp_path, name):
    """Each tensor of torchvision's state dict (its names and shapes) lands on exactly one variable of the same
    values, every variable gets one: per-tensor sums of random values match one to one."""
    rng = np.random.default_rng(1)
    state = {key: rng.normal(size=shape).astype(dtype) for key, shape, dtype in STATE_DICTS[name]}
    safetensors.numpy.save_file(state, tmp_path / f"{name}.safetensors")
    module, variables = cnn.models.pretrained(name, tmp_path / f"{name}.safetensors", input_shape=(32, 32, 3))
    assert module.style == "torchvision" and module.num_classes == 10
    sums = lambda arrays: sorted(float(np.asarray(a, np.float64).sum()) for a in arrays)
    np.testing.assert_allclose(sums(jax.tree_util.tree_leaves(variables)),
                               sums(v for k, v in state.items() if not k.endswith("num_batches_tracked")), rtol=1e-6)


def test_files_of_no_known_kind_are_one_line_errors(tmp_path):
    cases = {"notes.pth": b"not weights at all",
             "old.pth": b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".\x80\x02M\xe9\x03."}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("archive/readme.txt", "a zip, but not torch's")
    for name in ("notes.pth", "other.zip"):
        with pytest.raises(cnn.ConfigError, match=r"is not a known weight format: cnn reads Keras' HDF5 weight files "
                                                  r".*torch state dicts saved by torch.save .* and .safetensors$"):
            cnn.models.pretrained("resnet18", tmp_path / name)
    with pytest.raises(cnn.ConfigError, match=r"in torch's format from before torch 1.6.*re-save it with torch>=1.6 "
                                              r".* or as safetensors$"):
        cnn.models.pretrained("resnet18", tmp_path / "old.pth")


class _Shell:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_naming_any_other_class_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, payload in (("shell.pth", {"conv1.weight": _Shell()}), ("model.pth", argparse.Namespace(lr=0.1))):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        with pytest.raises(cnn.ConfigError, match=r"names (posix\.system|argparse\.Namespace), which cnn does not "
                                                  r"load \(it runs no code from a pickle\): save the state dict alone"):
            cnn.models.pretrained("resnet18", tmp_path / name)
    assert not (tmp_path / "pwned").exists()
    torch_save(tmp_path / "ints.pth", {"epoch": 3, "step": 7})
    with pytest.raises(cnn.ConfigError, match=r"holds no state dict \(a dict of tensors, alone or under 'state_dict' "
                                              r"or 'model'\)"):
        cnn.models.pretrained("resnet18", tmp_path / "ints.pth")


def test_layer_specs_load_keras_files_only(resnet18, tmp_path):
    safetensors.numpy.save_file(resnet18[0], tmp_path / "r18.safetensors")
    with pytest.raises(cnn.ConfigError, match="is a torch state dict: layer specs load Keras weight files only"):
        cnn.models.pretrained(["Conv2D(64, 7)", "Flatten()", "Dense(10)"], tmp_path / "r18.safetensors", (32, 32, 3))


def test_a_damaged_torch_zip_is_a_one_line_error(tmp_path):
    storage = _Storage("0", np.float32)  # three values
    for name, tensor, records in (("short.pth", _Tensor(storage, 1, (2, 5), (5, 1)), {"0": storage}),
                                  ("missing.pth", _Tensor(storage, 0, (3,), (1,)), {})):
        data = pickle.io.BytesIO()
        _Pickler(data, protocol=2).dump({"fc.weight": tensor})
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            zf.writestr("archive/data.pkl", data.getvalue())
            for key, values in records.items():
                zf.writestr(f"archive/data/{key}", np.concatenate(values.chunks).tobytes())
    with pytest.raises(cnn.ConfigError, match=r"a tensor of shape \(2, 5\) runs past its storage \(3 values\); the "
                                              r"file is damaged$"):
        cnn.models.pretrained("resnet18", tmp_path / "short.pth")
    with pytest.raises(cnn.ConfigError, match=r"is a torch zip that cnn cannot read \(.*\); re-save it with "
                                              r"torch.save\(model.state_dict\(\), path\) or as safetensors$"):
        cnn.models.pretrained("resnet18", tmp_path / "missing.pth")
