"""Typed settings: frozen dataclasses built from user values with one set of checks.

Protocol parameters, dataset adapter options and the run spec are frozen dataclasses. One
builder, :func:`build`, turns a mapping (from YAML, the command line or Python keywords) into
an instance: unknown or misspelled names, wrong types and values outside a field's choices
give one :class:`~medxfer.errors.ParamError` that names the field in the caller's language
(``--set fewshot.n_shot=...``) and lists the valid fields with their types.

Field metadata (via :func:`setting`):

- ``execution=True`` marks fields that decide how a computation runs but not its numbers
  (device, progress, inference batch size); they never enter run keys (:func:`key_fields`).
- ``check`` is an extra validator ``value -> None`` raising ``ValueError`` with a message.
- ``help`` is a one-line description shown by ``medxfer ls``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from medxfer.errors import ParamError, UnknownNameError

T = TypeVar("T")
Spelling = Callable[[str], str]


def setting(default: Any = dataclasses.MISSING, *, help: str = "", execution: bool = False,
            check: Callable[[Any], None] | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with medxfer metadata (see the module docstring)."""
    meta = {"help": help, "execution": execution, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError("must be positive")


def at_least(low: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and value < low:
            raise ValueError(f"must be at least {low:g}")
    return check


def fraction(value: Any) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError("must be strictly between 0 and 1")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(tp: Any) -> str:
    """A short human-readable name of a type annotation."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"list of {inner}" if (len(args) == 2 and args[1] is Ellipsis) or origin is list else f"[{inner}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted for floats, lists for
    tuples, which are returned as tuples); raises ``TypeError`` with a message otherwise."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise TypeError(f"expected one of {type_name(tp)}")
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return coerce(value, option)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(f"expected {type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("expected a string")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected {type_name(tp)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            item = args[0] if args else Any
            return tuple(coerce(v, item) for v in value)
        if len(value) != len(args):
            raise TypeError(f"expected {len(args)} values, got {len(value)}")
        return tuple(coerce(v, a) for v, a in zip(value, args))
    if origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError("expected a mapping")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(f"expected {type_name(tp)}")


def describe_fields(cls: type) -> str:
    """``name (type, default ...)`` for every field, for error messages and help."""
    hints = _hints(cls)
    parts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        parts.append(f"{f.name} ({type_name(hints[f.name])}, default {default!r})")
    return ", ".join(parts)


def build(cls: type[T], values: Mapping[str, Any] | None, *, where: str,
          spell: Spelling = lambda name: name) -> T:
    """An instance of the frozen dataclass ``cls`` from ``values`` (missing fields default).

    ``where`` names the thing being configured (``protocol 'fewshot'``); ``spell`` writes a
    field name as the user would type it (``--set fewshot.n_shot``).
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=2, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(spell(c)) for c in close)}?" if close else ""
        raise ParamError(f"{where}: unknown {spell(k)!r}.{hint} Valid: {describe_fields(cls)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        f = fields[name]
        try:
            kwargs[name] = coerce(value, hints[name])
            check = f.metadata.get("check")
            if check is not None:
                check(kwargs[name])
        except (TypeError, ValueError) as exc:
            raise ParamError(f"{where}: {spell(name)}={value!r}: {exc} "
                             f"(type {type_name(hints[name])})") from None
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamError(f"{where}: {', '.join(repr(spell(m)) for m in missing)} required")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, UnknownNameError) as exc:  # a cross-field check in __post_init__
        if isinstance(exc, ParamError):
            raise
        raise ParamError(f"{where}: {exc}") from None


def key_fields(obj: Any) -> dict[str, Any]:
    """The fields of a settings object that change numbers (``execution`` fields left out)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not f.metadata.get("execution", False)}


def as_dict(obj: Any) -> dict[str, Any]:
    """Every field of a settings object as JSON-ready values (tuples become lists)."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def overrides(obj: Any) -> dict[str, Any]:
    """The key fields whose value differs from the field's default."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("execution", False):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(obj, f.name)
        if default is dataclasses.MISSING or _plain(value) != _plain(default):
            out[f.name] = _plain(value)
    return out
