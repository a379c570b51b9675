"""Weight files into cnn's models: `pretrained(name_or_specs, path)` -> (module, variables).

`read` tells a file's kind by its content, not its extension, and gives
every kind in one form, `Layers`: each weighted layer's name and its arrays
in Keras' order and layout (kernel, bias; gamma, beta, moving mean, moving
variance; ...). The kinds:

- Keras 3's `.weights.h5` (`layers/<key>/vars/0, 1, ...`, the layer's name
  in the `vars` group's attributes) and the legacy HDF5 layout of Keras 2
  and of the files `keras.applications` downloads (`layer_names` and per
  layer `weight_names` attributes; a whole-model file keeps them under
  `model_weights`), read with h5py;
- torch state dicts (torchvision's and timm's `.pth`), from torch.save's
  zip or from `.safetensors`, read without torch (cnn/models/torch_files.py)
  and laid out as Keras lays out the same weights.

A layer's arrays go onto the Flax variables of the layer of the same name
(a backbone, cnn/models/backbones.py, through its per-source renaming) or of
the same place among the layers that hold weights (a Sequential of layer
specs, as Keras itself loads a legacy file). Flax's variables of one layer
are put in Keras' order by their names (`_ORDER`); a depthwise kernel is
reshaped, as cnn/models/layers.py's DepthwiseConv says.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.errors import ConfigError
import cnn.models.backbones as backbones_lib
import cnn.models.presets as presets
import cnn.models.torch_files as torch_files
from cnn.models.sequential import adapt, build_model, parse_stack

Layers = dict[str, list[np.ndarray]]  # layer name -> its arrays in Keras' order, in the file's order

# Flax variable names in the order Keras keeps the same weights.
_ORDER = ("depthwise", "pointwise", "kernel", "embedding", "scale", "alpha", "bias", "mean", "var", "variance",
          "count")


# read()'s layouts and the source whose names and style a backbone takes for each
SOURCES = {"keras3": "keras", "legacy": "keras", "torch": "torchvision", "safetensors": "torchvision"}
FORMATS = ("Keras' HDF5 weight files (model.save_weights('x.weights.h5'), or the legacy .h5 of keras.applications), "
           "torch state dicts saved by torch.save (torch >= 1.6) and .safetensors")


def read(path: str) -> tuple[Layers, str]:
    """The weighted layers of a weight file and its layout ('keras3', 'legacy', 'torch' or 'safetensors', told
    apart by the file's content); else a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"weight file {path!r} does not exist")
    kind = _kind(path)
    if kind == "torch":
        return torch_files.layers(torch_files.read_zip(path)), kind
    if kind == "safetensors":
        return torch_files.layers(torch_files.read_safetensors(path)), kind
    import h5py  # noqa: PLC0415 - only reading a Keras weight file needs it
    with h5py.File(path, "r") as f:
        if "layer_names" not in f.attrs and "model_weights" in f:
            f = f["model_weights"]
        if "layer_names" in f.attrs:
            return _legacy(f), "legacy"
        if isinstance(f.get("layers"), h5py.Group):
            return _keras3(f["layers"]), "keras3"
    raise ConfigError(f"weight file {path!r} is HDF5 but not a Keras weight file (no 'layer_names' attribute and "
                      "no 'layers' group); save it with model.save_weights")


def _kind(path: str) -> str:
    """'hdf5', 'torch' (torch.save's zip) or 'safetensors', from the file's first bytes; else a ConfigError."""
    with open(path, "rb") as f:
        head = f.read(16)
    if torch_files.is_legacy_torch(head):
        raise ConfigError(f"weight file {path!r} is in torch's format from before torch 1.6, which cnn does not "
                          "read: re-save it with torch>=1.6 (torch.save(torch.load(path), new_path)) or as "
                          "safetensors")
    if torch_files.is_torch_zip(path):
        return "torch"
    if torch_files.is_safetensors(head, os.path.getsize(path)):
        return "safetensors"
    import h5py  # noqa: PLC0415 - h5py knows where an HDF5 signature may sit (after a user block)
    if h5py.is_hdf5(path):
        return "hdf5"
    raise ConfigError(f"weight file {path!r} is not a known weight format: cnn reads {FORMATS}")


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _legacy(group) -> Layers:
    layers = {}
    for name in map(_text, group.attrs["layer_names"]):
        weight_names = [_text(n) for n in group[name].attrs.get("weight_names", [])]
        if weight_names:
            layers[name] = [np.asarray(group[name][w]) for w in weight_names]
    return layers


def _keras3(group) -> Layers:
    layers = {}
    for key in group:  # h5py lists them by key: conv2d, conv2d_1, ..., as cnn's Sequential names its layers
        vars_ = group[key].get("vars")
        if vars_ is not None and len(vars_):
            layers[key] = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
            name = _text(vars_.attrs.get("name", key))
            if name != key:
                layers[name] = layers[key]
    return layers


def _node(tree: dict, layer: str) -> Any:
    """The subtree of `layer` ('/' joins a nested layer's path), or None."""
    for key in layer.split("/"):
        tree = tree.get(key) if hasattr(tree, "get") else None
    return tree


def _leaves(variables: dict, layer: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """(collection, path, value) of each variable of `layer`, in Keras' order."""
    found = []
    for collection, tree in variables.items():
        node = _node(tree, layer)
        if node is not None:
            for path, value in jax.tree_util.tree_flatten_with_path(node)[0]:
                found.append((collection, tuple(k.key for k in path), value))
    return sorted(found, key=lambda leaf: [_ORDER.index(k) if k in _ORDER else len(_ORDER) for k in leaf[1]])


def _fit(array: np.ndarray, target: Any, where: str) -> np.ndarray:
    """`array` shaped as `target`: equal shapes, or a Keras depthwise kernel (*k, C, m) as Flax's (*k, 1, C*m)."""
    shape = tuple(target.shape)
    if array.shape != shape:
        depthwise = (array.ndim == len(shape) > 2 and shape[-2] == 1 and array.shape[:-2] == shape[:-2]
                     and array.shape[-2] * array.shape[-1] == shape[-1])
        if not depthwise:
            raise ConfigError(f"{where} has shape {array.shape} in the file but {shape} in the model: the file is "
                              "for another architecture (or another width, input size or class count)")
        array = array.reshape(shape)
    return jnp.asarray(array, dtype=target.dtype)


def assign(variables: dict, layers: Layers, pairs: Sequence[tuple[str, str]], path: str) -> dict:
    """`variables` with each (model layer, file layer) pair's arrays put in; a count or shape that does not fit
    is a ConfigError naming the first such tensor."""
    out, order = _mutable(variables), {name: i for i, name in enumerate(layers)}
    for ours, theirs in sorted(pairs, key=lambda pair: order[pair[1]]):  # the file's first misfit is named
        leaves, arrays = _leaves(variables, ours), layers[theirs]
        if len(arrays) != len(leaves):
            raise ConfigError(f"weight file {path!r}: layer {theirs!r} has {len(arrays)} tensors, the model's "
                              f"{ours!r} {len(leaves)} ({', '.join('/'.join(p) for _, p, _ in leaves)}): the "
                              "file is for another architecture")
        for i, ((collection, keys, target), array) in enumerate(zip(leaves, arrays)):
            node = _node(out[collection], ours)
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = _fit(array, target, f"weight file {path!r}: layer {theirs!r} tensor {i} (the model's "
                                                 f"{ours}/{'/'.join(keys)})")
    return out


def _weighted(variables: dict) -> list[str]:
    """The model's layers that hold variables themselves, '/' joining a nested one's path (in no particular
    order: pytrees sort their keys)."""
    paths = (path for tree in variables.values() for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
    return list(dict.fromkeys("/".join(k.key for k in path[:-1]) for path in paths))


def _pairs_by_name(model_layers: list[str], layers: Layers, rename, path: str) -> list:
    """Each model layer with the file layer of its name (or the name Keras numbers in a busy session:
    'normalization_1' for 'normalization')."""
    pairs = []
    for ours in model_layers:
        theirs = rename(ours)
        if theirs not in layers:
            numbered = [k for k in layers if re.fullmatch(re.escape(theirs) + r"_\d+", k)]
            if len(numbered) != 1:
                raise ConfigError(f"weight file {path!r} has no layer {theirs!r}: the file is for another "
                                  f"architecture (its first layers: {', '.join(list(layers)[:4])})")
            theirs = numbered[0]
        pairs.append((ours, theirs))
    return pairs


def _file_classes(layers: Layers, rename, head: str) -> int | None:
    arrays = layers.get(rename(head))
    return int(arrays[0].shape[-1]) if arrays else None


def pretrained(name_or_specs: str | Sequence[str], path: str, input_shape: Sequence[int] | None = None,
               num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """The model and its variables from a weight file (any kind `read` knows), for a notebook.

    `name_or_specs` is a backbone preset ('resnet50', 'mobilenet_v2(alpha=0.5)', ...), built in the style of the
    file's source (torchvision's form for a torch file), or a list of layer specs the file's Keras Sequential was
    built from. A backbone keeps the file's head unless `num_classes` differs from it: then its head is freshly
    initialised, to fine-tune. `input_shape` defaults to the backbone's 224x224x3; a list of specs needs it.
    """
    path = os.fspath(path)
    layers, layout = read(path)
    if isinstance(name_or_specs, str):
        return _backbone(name_or_specs, path, layers, layout, input_shape, num_classes)
    if input_shape is None:
        raise ConfigError("pretrained(specs, path) needs input_shape, e.g. (28, 28, 1): the Dense layers' weights "
                          "depend on it")
    if SOURCES[layout] != "keras":
        raise ConfigError(f"weight file {path!r} is a torch state dict: layer specs load Keras weight files only "
                          "(a torch Flatten orders features as channels, height, width); load it into a backbone")
    model = build_model(list(name_or_specs))
    variables = _init(model, input_shape, shapes_only=True)
    ours = [n for n in parse_stack(tuple(model.layers))[2] if any(n in tree for tree in variables.values())]
    if layout == "keras3":
        pairs = _pairs_by_name(ours, layers, lambda n: n, path)
    else:  # a legacy file's names are its session's (conv2d_7); Keras loads it by order, and so does cnn
        if len(layers) != len(ours):
            raise ConfigError(f"weight file {path!r} has {len(layers)} layers with weights, the specs "
                              f"{len(ours)}: the file is for another model")
        pairs = list(zip(ours, layers))
    return model, assign(variables, layers, pairs, path)


def _init(model: nn.Module, input_shape: Sequence[int], shapes_only: bool, fresh: Sequence[str] = ()) -> dict:
    """The model's variables as mutable dicts: their shapes only where the file fills them, but initialised for
    the top-level layers in `fresh` (a new head; XLA then computes those alone, not the backbone's millions of
    random values), or everywhere unless `shapes_only`."""
    x, key = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32), jax.random.key(0)
    init = adapt(model).init
    if not shapes_only:
        return _mutable(jax.jit(init)(key, jnp.zeros(x.shape, x.dtype)))
    variables = _mutable(jax.eval_shape(init, key, x))
    if fresh:
        pick = lambda tree: {c: {n: tree[c][n] for n in fresh if n in tree[c]} for c in tree}
        for collection, layers in jax.jit(lambda k, x: pick(init(k, x)))(key, jnp.zeros(x.shape, x.dtype)).items():
            variables[collection].update(_mutable(layers))
    return variables


def _mutable(tree: Any) -> Any:
    return {k: _mutable(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _backbone(text: str, path: str, layers: Layers, layout: str, input_shape, num_classes) -> tuple:
    """The backbone `text` names, built in the style of the file's source, with the file's tensors."""
    name, kwargs = presets.parse(text, "pretrained(name)")
    backbone = backbones_lib.BACKBONES.get(name)
    if backbone is None:
        raise ConfigError(f"pretrained({text!r}): {name} is a preset of layer specs; pass its specs "
                          f"(cnn.models.presets.expand) or a backbone: {', '.join(backbones_lib.BACKBONES)}")
    source = backbone.sources.get(SOURCES[layout])
    if source is None:
        raise ConfigError(f"pretrained({text!r}, {path!r}): cnn reads no {SOURCES[layout]} weight file for {name} "
                          f"(it reads {' and '.join(backbone.sources)} files for it)")
    if source.style is not None:
        if kwargs.setdefault("style", source.style) != source.style:
            raise ConfigError(f"pretrained({text!r}, {path!r}): a {SOURCES[layout]} file's weights fit "
                              f"{name}(style={source.style!r}); drop the style override")
    head, rename = backbone.head, source.rename
    classes = _file_classes(layers, rename, head)
    if num_classes is None and classes is None:
        raise ConfigError(f"weight file {path!r} has no {rename(head)!r} layer (a file saved without its top): "
                          "pass num_classes for a new head")
    module = backbone.module(num_classes=num_classes or classes, **kwargs)
    size = backbone.default_size
    new_head = num_classes not in (None, classes)
    variables = _init(module, tuple(input_shape) if input_shape else (size, size, 3), True, (head,) if new_head else ())
    pairs = _pairs_by_name([n for n in _weighted(variables) if not (new_head and n == head)], layers, rename, path)
    return module, assign(variables, layers, pairs, path)


class Filled(NamedTuple):
    """What `fill` put in: the tensors loaded from the file, the variables left at their initial values
    ('predictions/kernel', ...: normally the head), and the file's layout."""

    loaded: int
    left: list[str]
    layout: str


def fill(name_or_specs: str | Sequence[str] | None, variables: dict, path: str, head: str | None = None,
         source: tuple[Layers, str] | None = None) -> tuple[dict, Filled]:
    """An initialised model's `variables` with a weight file's tensors put in, and what was loaded.

    `name_or_specs` says how the file's layers are found: a backbone preset
    (its per-source names), a Sequential's layer specs (a legacy file's
    layers by place, as Keras loads them, else by name), or None for your own
    module (by name). The `head` layer alone may be missing from the file or
    differ in shape (another class count): it then keeps its initial values.
    Any other layer that is missing or does not fit is a ConfigError naming
    it. `source` is the file's (layers, layout) when already read (a cnn
    workdir's checkpoint); otherwise `read(path)` reads it.
    """
    path = os.fspath(path)
    layers, layout = source or read(path)
    pairs = _fill_pairs(name_or_specs, variables, layers, layout, path, head)
    kept = [(ours, theirs) for ours, theirs in pairs if ours != head or _fits(variables, layers, ours, theirs)]
    done = dict(kept)
    left = [f"{name}/{'/'.join(keys)}" for name in _weighted(variables) if name not in done
            for _, keys, _ in _leaves(variables, name)]
    return assign(variables, layers, kept, path), Filled(sum(len(layers[t]) for _, t in kept), left, layout)


def as_layers(variables: dict) -> Layers:
    """A model's own variables as a weight file's layers (a cnn checkpoint, for `fill`'s `source`)."""
    return {name: [np.asarray(v) for _, _, v in _leaves(variables, name)] for name in _weighted(variables)}


def _fill_pairs(name_or_specs, variables: dict, layers: Layers, layout: str, path: str, head: str | None) -> list:
    """(model layer, file layer) for every weighted layer of the model but a head the file lacks."""
    ours, rename = _weighted(variables), (lambda n: n)
    if isinstance(name_or_specs, str):  # a backbone: the names of the file's source
        name, kwargs = presets.parse(name_or_specs, "model.preset")
        backbone, source = backbones_lib.BACKBONES[name], SOURCES.get(layout, layout)
        how = backbone.sources.get(source)
        if how is None:
            raise ConfigError(f"weight file {path!r}: cnn reads no {source} weight file for {name} (it reads "
                              f"{' and '.join(backbone.sources)} files for it)")
        style = kwargs.get("style", getattr(backbone.module, "style", None))
        if how.style is not None and style != how.style:
            raise ConfigError(f"weight file {path!r} holds {source} weights, which fit {name}(style={how.style!r}), "
                              f"not style={style!r}: set model.preset=\"{name}(style={how.style!r})\"")
        rename = how.rename
    elif name_or_specs is not None and not isinstance(name_or_specs, str):
        ours = [n for n in parse_stack(tuple(name_or_specs))[2] if n in ours]
        if layout == "legacy":  # by place, a head past the file's end left out
            if head == ours[-1] and len(layers) == len(ours) - 1:
                ours = ours[:-1]
            if len(layers) != len(ours):
                raise ConfigError(f"weight file {path!r} has {len(layers)} layers with weights, the model "
                                  f"{len(ours)}: the file is for another model")
            return list(zip(ours, layers))
    if head is not None and not any(k == rename(head) or re.fullmatch(re.escape(rename(head)) + r"_\d+", k)
                                    for k in layers):
        ours = [n for n in ours if n != head]
    return _pairs_by_name(ours, layers, rename, path)


def _fits(variables: dict, layers: Layers, ours: str, theirs: str) -> bool:
    """Whether the file's arrays of a layer have the model layer's count and shapes (a depthwise kernel's
    reshaping aside)."""
    leaves, arrays = _leaves(variables, ours), layers[theirs]
    try:
        return len(leaves) == len(arrays) and all(_fit(a, t, theirs) is not None
                                                  for (_, _, t), a in zip(leaves, arrays))
    except ConfigError:
        return False
