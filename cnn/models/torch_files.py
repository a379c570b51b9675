"""PyTorch weight files as numpy state dicts, without importing torch: torch.save's zip, and safetensors.

`torch.save` (torch >= 1.6) writes a zip holding `<name>/data.pkl`, a
pickle, and `<name>/data/<key>`, each storage's raw bytes. In the pickle a
tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)` on a storage named by a persistent id
('storage', torch.FloatStorage, key, location, numel). Unpickling calls
whatever a pickle names, so `_Unpickler` resolves only those names (and
collections.OrderedDict, the state dict's type) to numpy readers and
refuses every other class: a weight file cannot run code here.

A state dict turns into weights.py's `Layers` by `layers()`: each module's
tensors in Keras' order and layout, so Keras and torch files load through
the same code.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from cnn.errors import ConfigError

StateDict = dict[str, np.ndarray]

# torch's typed storage classes, as its pickles name them, and the dtype of their bytes
_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
             "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}
# torch.save before 1.6 (a bare pickle stream) starts with this magic number, pickled as a long
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# a module's tensors in the order Keras keeps the same weights (kernel, bias; gamma, beta, moving mean, variance)
_ORDER = ("weight", "bias", "running_mean", "running_var")


def is_torch_zip(path: str) -> bool:
    """Whether the file is torch.save's zip (a zip with a data.pkl one folder down)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in archive.namelist())


def is_legacy_torch(head: bytes) -> bool:
    """Whether the file starts as torch.save's format before torch 1.6 (`_use_new_zipfile_serialization=False`)."""
    return head.startswith(_LEGACY_MAGIC)


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether the file starts as safetensors: an 8-byte little-endian header length, then a JSON object."""
    return len(head) > 8 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


class _StorageType:
    """A torch storage class in the pickle: the dtype of its bytes."""

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGES[name])


class _Unpickler(pickle.Unpickler):
    """Unpickles data.pkl with numpy: storages are read from the zip, tensors are strided views of them copied
    out, and every global but torch's tensor and storage names and OrderedDict is refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self.archive, self.prefix, self.path = archive, prefix, path
        order = prefix + "byteorder"
        self.byteorder = "<" if order not in archive.namelist() or archive.read(order) == b"little" else ">"
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return lambda data, *_: data  # an nn.Parameter: its tensor
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise ConfigError(f"weight file {self.path!r} names {module}.{name}, which cnn does not load (it runs no "
                          "code from a pickle): save the state dict alone, torch.save(model.state_dict(), path), "
                          "or as safetensors")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ConfigError(f"weight file {self.path!r} refers to {str(pid)[:60]}, not a torch storage")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            dtype = storage_type.dtype.newbyteorder(self.byteorder)
            self.storages[key] = np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)
        return self.storages[key]

    def _tensor(self, storage: np.ndarray, offset: int, size, stride, *_: Any) -> np.ndarray:
        """torch._utils._rebuild_tensor_v2: the tensor of `size` at `offset` in `storage`, steps of `stride`."""
        if not isinstance(storage, np.ndarray):
            raise TypeError(f"a tensor's storage is {type(storage).__name__}")
        size, stride = tuple(size), tuple(stride)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if 0 in size:
            return np.zeros(size, storage.dtype)
        if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
            raise ConfigError(f"weight file {self.path!r}: a tensor of shape {size} runs past its storage "
                              f"({storage.size} values); the file is damaged")
        strides = [s * storage.itemsize for s in stride]
        view = np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False)
        return np.ascontiguousarray(view).astype(storage.dtype.newbyteorder("="))


def read_zip(path: str) -> StateDict:
    """The state dict of a torch.save zip: the pickled dict of tensors, or the one it wraps under 'state_dict' or
    'model' (Lightning's and timm's checkpoints)."""
    with zipfile.ZipFile(path) as archive:
        prefix = next(n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl"))[:-8]
        try:
            obj = _Unpickler(archive, prefix, path).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, AttributeError, EOFError, IndexError, KeyError,
                TypeError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"weight file {path!r} is a torch zip that cnn cannot read ({error}); re-save it "
                              "with torch.save(model.state_dict(), path) or as safetensors") from None
    return _state_dict(obj, path)


def _state_dict(obj: Any, path: str) -> StateDict:
    tensors = lambda d: isinstance(d, dict) and d and all(isinstance(v, np.ndarray) for v in d.values())
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict))):
        if tensors(candidate):
            if all(str(k).startswith("module.") for k in candidate):  # saved from DataParallel
                return {str(k)[len("module."):]: v for k, v in candidate.items()}
            return {str(k): v for k, v in candidate.items()}
    raise ConfigError(f"weight file {path!r} holds no state dict (a dict of tensors, alone or under 'state_dict' or "
                      "'model'); save it with torch.save(model.state_dict(), path)")


def read_safetensors(path: str) -> StateDict:
    """A .safetensors file's tensors, by the safetensors package's numpy reader."""
    import safetensors.numpy  # noqa: PLC0415 - only reading such a file needs it

    try:
        return dict(safetensors.numpy.load_file(path))
    except (safetensors.SafetensorError, ValueError, TypeError) as error:
        raise ConfigError(f"weight file {path!r} looks like safetensors but cannot be read: {error}") from None


def layers(state: StateDict) -> dict[str, list[np.ndarray]]:
    """Each module's tensors (the key up to its last '.') in Keras' order and layout: a convolution's weight
    (out, in, *kernel) as (*kernel, in, out), a linear one's (out, in) as (in, out); num_batches_tracked, a
    counter, is dropped."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "num_batches_tracked":
            grouped.setdefault(module, {})[leaf] = array
    rank = lambda leaf: _ORDER.index(leaf) if leaf in _ORDER else len(_ORDER)
    return {module: [_keras_layout(leaves[leaf]) if leaf == "weight" else leaves[leaf]
                     for leaf in sorted(leaves, key=rank)] for module, leaves in grouped.items()}


def _keras_layout(weight: np.ndarray) -> np.ndarray:
    if weight.ndim < 2:
        return weight
    return weight.T if weight.ndim == 2 else weight.transpose(*range(2, weight.ndim), 1, 0)
