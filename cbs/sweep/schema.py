"""Typed config sections and their validation.

Configs are plain frozen dataclasses. We chose dataclasses over pydantic because the
messages a user sees must follow one house format (key path, offending value, what is
allowed, a did-you-mean for typos) and the validator that produces them is short.

A field declares its constraints with :func:`spec`::

    @dataclasses.dataclass(frozen=True)
    class Problem:
        dim: int = spec(10_000, ge=1, doc="number of Hessian eigenvalues")
        spectrum: Literal["harmonic", "power"] = spec("harmonic", doc="...")

:func:`parse` turns a nested dict (from YAML) into the dataclass, raising
:class:`ConfigError` that names the first problem found.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from cbs.errors import ConfigError

__all__ = ["ConfigError", "spec", "parse", "to_dict", "describe"]


def spec(
    default: Any = dataclasses.MISSING,
    *,
    doc: str = "",
    ge=None,
    gt=None,
    le=None,
    lt=None,
    min_len: int | None = None,
    factory=None,
    hidden: bool = False,
) -> Any:
    """A dataclass field with bounds (numbers, or every number in a list) and a doc;
    ``hidden`` keeps it out of --help (fields filled by code, not by users)."""
    meta = dict(doc=doc, ge=ge, gt=gt, le=le, lt=lt, min_len=min_len, hidden=hidden)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        frozen = default
        return dataclasses.field(default_factory=lambda: _copy(frozen), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(x):
    import copy

    return copy.deepcopy(x)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


# The largest magnitude of an integer key without a bound of its own: steps, batch sizes,
# widths and counts become 32-bit integers on the device (JAX's default), so a value past
# 2^31 would overflow mid-run after the folder was written; it is refused here instead.
INT_LIMIT = 2**31


def _show_bound(bound) -> str:
    """A bound as the user should read it: 2^k = N for the large powers of two."""
    if isinstance(bound, int) and bound >= 2**16 and bound & (bound - 1) == 0:
        return f"2^{bound.bit_length() - 1} = {bound}"
    return str(bound)


def _int_only(tp) -> bool:
    """Whether a field's type holds integers and no floats (int, list[int], int | None...)."""
    if tp is int:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return float not in args and any(_int_only(a) for a in args)
    if origin in (list, tuple):
        return bool(args) and _int_only(args[0])
    return False


def _check_bounds(path: str, value: Any, meta: dict, int_only: bool = False) -> None:
    nums = value if isinstance(value, (list, tuple)) else [value]
    for i, x in enumerate(nums):
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            continue
        where = f"{path}[{i}]" if isinstance(value, (list, tuple)) else path
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(where, x, "a finite number is required")
        if (
            int_only
            and isinstance(x, int)
            and meta.get("le") is None
            and meta.get("lt") is None
            and not -INT_LIMIT <= x < INT_LIMIT
        ):
            raise ConfigError(
                where,
                x,
                f"allowed: an integer of magnitude below {_show_bound(INT_LIMIT)} (steps, batch "
                "sizes, widths and counts are 32-bit integers on the device)",
            )
        for key, ok, word in (
            ("ge", lambda a, b: a >= b, ">="),
            ("gt", lambda a, b: a > b, ">"),
            ("le", lambda a, b: a <= b, "<="),
            ("lt", lambda a, b: a < b, "<"),
        ):
            bound = meta.get(key)
            if bound is not None and not ok(x, bound):
                raise ConfigError(where, x, f"allowed: a value {word} {_show_bound(bound)}")
    min_len = meta.get("min_len")
    if min_len is not None and isinstance(value, (list, tuple)) and len(value) < min_len:
        raise ConfigError(
            path,
            value,
            f"allowed: a list with at least {min_len} entr" + ("y" if min_len == 1 else "ies"),
        )


def _same_shape(value: Any, tp) -> bool:
    """Whether ``value`` has the container shape of type ``tp`` (mapping / list)."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin is dict
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return False


def _convert(path: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(path, value, "allowed: null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
        raise ConfigError(path, value, "allowed: " + ", ".join(repr(c) for c in choices), hint)
    if origin in (Union, types.UnionType):
        errors = []
        # Try exact-type members first so that 3 stays an int in `int | float`.
        for arg in typing.get_args(tp):
            try:
                return _convert(path, value, arg)
            except ConfigError as e:
                errors.append(e)
        deepest = max(errors, key=lambda e: e.path.count(".") + e.path.count("["))
        if deepest.path != path:
            raise deepest
        # A mapping given where a list or a mapping is allowed is meant as the mapping: its
        # own error (e.g. a reversed range) names the real cause, not "allowed: a list".
        shaped = [e for arg, e in zip(typing.get_args(tp), errors) if _same_shape(value, arg)]
        if len(shaped) == 1:
            raise shaped[0]
        raise ConfigError(path, value, f"allowed: {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, value, f"allowed: {_type_name(tp)}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        out = [_convert(f"{path}[{i}]", v, arg) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, value, f"allowed: {_type_name(tp)}")
        ktp, vtp = typing.get_args(tp)
        return {_convert(path, k, ktp): _convert(f"{path}.{k}", v, vtp) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, value, "allowed: true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)  # exact; a huge one is then refused by its bound
        raise ConfigError(path, value, "allowed: an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, value, "allowed: a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, value, "allowed: a string")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def parse(cls, data: Any, path: str = ""):
    """Builds dataclass ``cls`` from a mapping, validating every key and value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, data, f"allowed: {_type_name(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                where,
                key,
                "unknown key; allowed keys: " + ", ".join(fields),
                f"did you mean {close[0]!r}?" if close else "",
            )
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in data:
            value = _convert(where, data[name], hints[name])
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(hints[name]) and not dataclasses.is_dataclass(value):
                value = parse(hints[name], value, where)
        else:
            raise ConfigError(where, None, f"this key is required: {_type_name(hints[name])}")
        _check_bounds(where, value, f.metadata, _int_only(hints[name]))
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a __post_init__ cross-field check
        raise ConfigError(path, data, str(e)) from None
    return obj


def to_dict(obj) -> Any:
    """The plain (YAML/JSON-ready) form of a config object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls, prefix: str = "") -> list[str]:
    """One line per key (dotted path, type, default, doc), for --help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("hidden"):
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"  {key}: {f.metadata.get('doc', '')}")
            lines += describe(tp, key + ".")
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else "required"
        )
        bounds = " ".join(
            f"{k}{v}"
            for k, v in (
                ("≥", f.metadata.get("ge")),
                (">", f.metadata.get("gt")),
                ("≤", f.metadata.get("le")),
                ("<", f.metadata.get("lt")),
            )
            if v is not None
        )
        default_text = "required" if default == "required" else f"default {to_dict(default)!r}"
        lines.append(
            f"  {key} ({_type_name(tp)}{'; ' + bounds if bounds else ''}; {default_text}): "
            f"{f.metadata.get('doc', '')}"
        )
    return lines
