"""Your own Flax module as the model: `config.model.module = "nets.py:Net(width=32)"`.

The reference names a Linen module class, or a function returning a module,
in a Python file ("path/to/nets.py:Net", relative to the working directory
or absolute) or in an importable module ("my_package.nets:Net"), with
literal keyword arguments written as a call (read with `ast`, never run).
cnn calls it with `num_classes=N` plus those arguments. The module's
`__call__(x, train)` returns logits shaped (batch, num_classes), or
(batch, 1) for a sigmoid binary head; it may use nn.BatchNorm (the
'batch_stats' collection) and nn.Dropout (the 'dropout' rng).

A notebook passes the module itself: `cnn.train_and_evaluate(config, workdir,
model=Net(num_classes=10))`; `record` then writes into the run's config the
reference that rebuilds it, where one exists.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from cnn import losses
from cnn import config as config_lib
from cnn import spec as spec_lib
from cnn.errors import ConfigError

FIELD = "model.module"
EXAMPLE = "'nets.py:Net', 'path/to/nets.py:Net(width=32)' or 'my_package.nets:Net'"
# The fields every Linen module has; they are not the user's arguments.
_LINEN_FIELDS = ("parent", "name")


@dataclasses.dataclass(frozen=True)
class Reference:
    """A parsed `model.module`: where the module is defined, its name, and the keyword arguments written."""

    source: str  # a file path ending in .py, or a dotted module name
    name: str
    kwargs: dict[str, Any]
    call: str  # "Net(width=32)" as written, "Net" without arguments

    @property
    def is_file(self) -> bool:
        return self.source.endswith(".py")

    def text(self) -> str:
        return f"{self.source}:{self.call}"


def parse(text: Any) -> Reference:
    """Splits "source:Name(args)" into a Reference; anything else is a one-line ConfigError."""
    bad = ConfigError(f"{FIELD}={text!r} is not a module reference: write {EXAMPLE}")
    if not isinstance(text, str):
        raise bad
    head, paren, tail = text.strip().partition("(")
    source, colon, name = head.rpartition(":")
    if not colon or not source.strip() or not name.strip():
        raise bad
    call = (name + paren + tail).strip()
    name, args, kwargs = spec_lib.parse_call(call, FIELD, "module reference", EXAMPLE, bare_name=True)
    if args:
        raise ConfigError(f"{FIELD}={text!r}: write the arguments by name, as in {name}(width=32)")
    return Reference(source.strip(), name, {k: _hashable(v) for k, v in kwargs.items()}, call)


def _hashable(value: Any) -> Any:
    """Lists as tuples: a module's fields must hash, as jit asks of the function it compiles."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def absolute(text: str) -> str:
    """`text` with a file's path made absolute (from the working directory), so the run's config.json names the
    file from anywhere; a module name and the arguments are kept as written."""
    ref = parse(text)
    if not ref.is_file:
        return text
    return dataclasses.replace(ref, source=os.path.abspath(os.path.expanduser(ref.source))).text()


@functools.lru_cache(maxsize=32)
def _run_file(path: str, mtime_ns: int):
    """The user's file run once per version: building the model twice gives the same class, so equal modules
    compare equal and compiled steps are reused."""
    return config_lib.run_file(path, f"{FIELD} file", "nets.py:Net")


def factory(ref: Reference) -> Callable[..., nn.Module]:
    """The class or function `ref` names, from its file or module; a missing one is a ConfigError."""
    if ref.is_file:
        path = os.path.abspath(os.path.expanduser(ref.source))
        if not os.path.isfile(path):
            raise ConfigError(f"{FIELD}={ref.text()!r}: the file {ref.source!r} does not exist (looked in "
                              f"{os.path.dirname(path)}); give its path from the working directory, or an absolute one")
        module, where = _run_file(path, os.stat(path).st_mtime_ns), ref.source
    else:
        module, where = _import(ref), f"module {ref.source!r}"
    make = getattr(module, ref.name, None)
    if make is None:
        known = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module)
                       and v.__module__ == module.__name__)
        raise ConfigError(f"{FIELD}={ref.text()!r}: {where} has no {ref.name!r}; its modules: "
                          f"{', '.join(known) or 'none (define a flax.linen.Module class there)'}")
    if not callable(make):
        raise ConfigError(f"{FIELD}={ref.text()!r}: {ref.name} is a {type(make).__name__}, not a module class or a "
                          "function returning a module")
    return make


def _import(ref: Reference):
    try:
        return importlib.import_module(ref.source)
    except ModuleNotFoundError as e:
        if e.name and (ref.source == e.name or ref.source.startswith(e.name + ".")):
            raise ConfigError(f"{FIELD}={ref.text()!r}: no module named {e.name!r}; name a file as "
                              f"'path/to/file.py:{ref.name}', or put the package on PYTHONPATH") from None
        raise _user_error(ref.text(), e) from None
    except Exception as e:  # noqa: BLE001 - whatever the user's module raised, a SyntaxError included
        raise _user_error(ref.text(), e) from None


def _user_error(where: str, error: Exception, path: str | None = None) -> ConfigError:
    """One line for an error raised in the user's code: its file and line (the last frame outside cnn, Flax and
    JAX unless `path` names the file), then the error."""
    if path is None and not isinstance(error, SyntaxError):
        frames = [f.filename for f in traceback.extract_tb(error.__traceback__) if not _library(f.filename)]
        path = frames[-1] if frames else None
    if path is None and isinstance(error, SyntaxError):
        path = error.filename
    if path is None:
        return ConfigError(f"{where}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    return config_lib.file_error(path, error)


def _library(filename: str) -> bool:
    roots = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(nn.__file__),
             os.path.dirname(os.path.dirname(nn.__file__)), os.path.dirname(jax.__file__),
             os.path.dirname(importlib.__file__))
    return filename.startswith("<") or os.path.abspath(filename).startswith(roots)


def build(text: str, num_classes: int | None) -> nn.Module:
    """The module `text` names, called with `num_classes` and the written arguments, and checked."""
    ref = parse(text)
    make = factory(ref)
    if num_classes is None:
        raise ConfigError(f"{FIELD}={text!r} needs the class count: set model.num_classes, or build it where the "
                          "dataset is known")
    kwargs = {"num_classes": num_classes, **ref.kwargs}
    takes = arguments(make)
    if "num_classes" not in takes and not _takes_any(make):
        raise ConfigError(f"{FIELD}={text!r}: {ref.name} has no num_classes argument; cnn passes the dataset's "
                          f"class count as num_classes, so give {ref.name} a field `num_classes: int`")
    spec_lib.bind(make, [], kwargs, FIELD, text, ref.name, f"{', '.join(takes)}" if takes else "no arguments")
    try:
        module = make(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's constructor
        raise _user_error(f"{FIELD}={text!r}", e) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{FIELD}={text!r}: {ref.name}(...) gave a {type(module).__name__}, not a flax.linen "
                          "Module")
    check_call(module, f"{FIELD}={text!r}")
    return module


def arguments(make: Callable) -> list[str]:
    """The argument names `make` takes (a module class: its fields but parent and name)."""
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):
        return []
    return [p for p, v in params.items() if p not in _LINEN_FIELDS and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]


def _takes_any(make: Callable) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(make).parameters.values())
    except (TypeError, ValueError):
        return True


def check_call(module: nn.Module, where: str) -> None:
    """Refuses a module whose __call__ has no `train` argument: cnn says whether it trains on every call."""
    call = type(module).__call__
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return
    if "train" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{where}: {type(module).__name__}.__call__{inspect.signature(call)} takes no `train`; "
                          "define __call__(self, x, train: bool), as cnn passes train=True while training (dropout, "
                          "batch statistics) and train=False otherwise")


class Own(nn.Module):
    """The user's module under cnn's call, `(x, train, logits)`: its own returns logits already.

    It shares the user's module's scope (nn.share_scope), so the parameters
    are the user's own tree, as `Net(...).init` makes it: a checkpoint's
    params plug straight into `Net(...).apply`.
    """

    module: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.module)

    def __call__(self, x: jax.Array, train: bool = False, logits: bool = True) -> jax.Array:
        return self.module(x, train=train)


def source_file(module: nn.Module) -> str | None:
    """The file the module's __call__ is written in, for error lines."""
    call = inspect.unwrap(type(module).__call__)
    code = getattr(call, "__code__", None)
    return code.co_filename if code is not None else None


def shape_error(module: nn.Module, where: str, error: Exception) -> ConfigError:
    """An error raised while running the user's module once: its file and line, or the module's name."""
    path = source_file(module)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if path and f.filename == path]
    if frames or isinstance(error, SyntaxError):
        return config_lib.file_error(path, error)
    return ConfigError(f"{where}: {type(module).__name__}: {type(error).__name__}: "
                       f"{(str(error).strip().splitlines() or [''])[0]}")


def check_output(shape: Sequence[int], num_classes: int, loss: str, where: str) -> str:
    """Checks a user module's output shape against the dataset and picks the loss ('auto': by the units)."""
    expected = f"(batch, num_classes) = (batch, {num_classes})" + (" or (batch, 1) for a sigmoid head"
                                                                    if num_classes == 2 else "")
    shown = "(batch, " + ", ".join(map(str, shape[1:])) + ")"
    if len(shape) != 2:
        raise ConfigError(f"{where} returns logits shaped {shown}; return {expected}")
    units = shape[1]
    loss = losses.auto(units) if loss == "auto" else loss
    if losses.LOSSES[loss].head_error(units, num_classes, where):  # the registry's rule, worded for a module
        raise ConfigError(f"{where} returns logits shaped {shown} but the dataset has {num_classes} classes; return "
                          f"{expected}" + ("" if loss == losses.auto(units) else f" (with loss={loss!r})"))
    return loss


# --- What a run records ----------------------------------------------------------------------------------------


def reference_of(module: nn.Module) -> tuple[str | None, str]:
    """The reference that rebuilds `module` ("package.module:Name(width=16)"), or None and why not.

    Importable class, fields that are literals (num_classes excluded: cnn
    passes it); a class defined in a notebook (__main__) or a file run by
    cnn has no importable home.
    """
    cls = type(module)
    home, name = cls.__module__, cls.__qualname__
    why = f"{home}.{name} is not importable (defined in a notebook or a script); reload the run with " \
          f"cnn.load_run(workdir, model={cls.__name__}(...))"
    if home == "__main__" or "<locals>" in name:
        return None, why
    try:
        found = functools.reduce(getattr, name.split("."), importlib.import_module(home))
    except Exception:  # noqa: BLE001 - any failure means: not importable
        return None, why
    if found is not cls:
        return None, why
    args = []
    for field in dataclasses.fields(module):
        if field.name in (*_LINEN_FIELDS, "num_classes") or not field.init:
            continue
        value = getattr(module, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        text = repr(value)
        try:
            if spec_lib.parse_call(f"f({field.name}={text})", FIELD, "", "")[2][field.name] != value:
                raise ConfigError("")
        except ConfigError:
            return None, f"{home}.{name}'s field {field.name}={text[:60]} is not a literal; reload the run with " \
                         f"cnn.load_run(workdir, model={cls.__name__}(...))"
        args.append(f"{field.name}={text}")
    return f"{home}:{name}" + (f"({', '.join(args)})" if args else ""), ""


def record(config: ml_collections.ConfigDict, model: nn.Module | None = None) -> ml_collections.ConfigDict:
    """The config a run records in config.json: model.module's file made absolute; with a `model` passed in, the
    model section naming it instead of the layers or preset (and a note when no reference rebuilds it).

    `config` itself is left alone.
    """
    if model is None and config.model.get("module") is None:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if model is not None:
            text, note = reference_of(model)
            config.model.layers, config.model.preset, config.model.module = (), None, text
            if note:
                config.model.note = note
        elif config.model.module is not None:
            config.model.module = absolute(config.model.module)
    return config
