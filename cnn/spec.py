"""The one parser for calls written as strings: layer specs and presets.

A config writes `"Conv2D(32, 3, activation='relu')"` or
`"vgg(widths=(32, 64))"`; both are read here with `ast` as a name and literal
arguments, never executed, so a config cannot run code. Arithmetic on numbers
(`"Rescaling(1. / 255, offset=-0.5)"`, as Keras code writes it) is worked out
here from the syntax tree: numbers, unary and binary `+ - * /`, nothing else.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any

from cnn.errors import ConfigError


def parse_call(text: Any, field: str, what: str, example: str, bare_name: bool = False
               ) -> tuple[str, list, dict[str, Any]]:
    """Splits `text` into (name, positional args, keyword args); every argument must be a literal.

    With `bare_name`, a name alone (`"resnet20"`) is a call without
    arguments. Anything else raises a ConfigError naming `field`, saying it
    is not a `what` and showing `example`.
    """
    bad = ConfigError(f"{field}={text!r} is not a {what}: write {example}")
    if not isinstance(text, str) or not text.strip():
        raise bad
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if bare_name and isinstance(node, ast.Name):
            return node.id, [], {}
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise SyntaxError
        args = [literal(a) for a in node.args]
        kwargs = {k.arg: literal(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError):
        raise bad from None
    if None in kwargs:  # **spread
        raise bad
    return node.func.id, args, kwargs


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.UAdd: operator.pos, ast.USub: operator.neg}


def _number(value: Any) -> Any:
    """`value` if it is a real number arithmetic may take (not a bool, not a complex); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"arithmetic on {value!r}")
    return value


def literal(node: ast.AST) -> Any:
    """The value of a literal, where numbers may be combined with unary and binary + - * / (`1. / 255`, `-28 * 28`).

    Tuples and lists are read element by element, so `(28 * 28,)` works;
    everything else goes to `ast.literal_eval`, which refuses names and
    calls. Raises ValueError (or ZeroDivisionError) on anything else.
    """
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [literal(e) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_number(literal(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_number(literal(node.left)), _number(literal(node.right)))
    return ast.literal_eval(node)


def lookup(name: str, registry: dict[str, Callable], field: str, text: str, what: str) -> Callable:
    """`registry[name]`, or a ConfigError with the closest known name and the full list."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, registry, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{field}={text!r}: unknown {what} {name!r}; {hint}known: {', '.join(registry)}")


def bind(make: Callable, args: Iterable, kwargs: dict, field: str, text: str, name: str, shown: str) -> None:
    """Checks that the arguments fit `make`'s signature; else a ConfigError showing how `name` is called."""
    try:
        inspect.signature(make).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{field}={text!r}: {e}; {name} takes {shown}") from None


def signature(name: str, make: Callable, skip: int = 0) -> str:
    """How a registered callable is written, e.g. `Dense(units, activation=None, use_bias=True)`."""
    params = list(inspect.signature(make).parameters.values())[skip:]
    words = []
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not any(w.startswith("*") for w in words):
            words.append("*")  # the arguments after it are written by name, as Keras' keyword arguments are
        words.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return name + "(" + ", ".join(words) + ")"
