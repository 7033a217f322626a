"""Typed records read from JSON: each field of a frozen dataclass checked against its annotation.

What a file holds is data. :func:`read_record` turns a mapping into a record only when every field has its declared
type — ``bool``, ``int``, ``float`` (finite; an integer is accepted), ``str``, tuples of those, a nested record, a
``Mapping[str, X]``, each optionally ``| None`` — and the constraints declared in the field's metadata hold:

- ``choices``: the allowed values;
- ``range``: ``(low, high)``, inclusive, for a number or every number of a tuple;
- ``layer``: every integer is a layer index below ``context["n_layers"]``;
- ``read`` / ``write``: a field's own reader ``(value, path, context) -> value`` and writer ``value -> JSON data``.

Anything else raises the caller's error class with a message naming the field (``chosen.layer``), so a malformed file
is one clear sentence, never a traceback. A field is added to a record by declaring it with a default: files without
it read as the default, and :func:`record_dict` leaves a field at its default out, so their bytes do not change.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from nsteer.errors import NsteerError

Record = TypeVar("Record")

_SHOWN = 80  # characters of a bad value quoted in a message


class FieldProblem(Exception):
    """A field whose value does not fit its declaration; ``path`` names it."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def read_record(
    cls: type[Record],
    data: Any,
    *,
    where: str,
    error: type[NsteerError],
    hint: str,
    root: str = "",
    context: Mapping[str, Any] | None = None,
    unknown: str = "error",
) -> Record:
    """``data`` as a ``cls`` record, or ``error`` naming the first field that does not fit.

    ``where`` names the file in the message, ``root`` the record inside it (``chosen``: fields are named
    ``chosen.layer``); ``hint`` says what to do. ``unknown="ignore"`` drops keys ``cls`` does not declare
    (``"error"``: they are refused).
    """
    try:
        return parse_record(cls, data, root, context or {}, unknown)
    except FieldProblem as problem:
        field = f", field {problem.path}" if problem.path else ""
        raise error(f"{where}{field}: {problem} {hint}".rstrip()) from None


def record_dict(record: Any, *, always: Collection[str] = ()) -> dict[str, Any]:
    """A record as JSON-ready data: tuples as lists, nested records as dicts; a field at its default is left out
    unless it is named in ``always``."""
    data: dict[str, Any] = {}
    for field in dataclasses.fields(record):
        value = getattr(record, field.name)
        if field.name not in always and _is_default(field, value):
            continue
        write = field.metadata.get("write")
        data[field.name] = write(value) if write else _plain(value)
    return data


def _is_default(field: dataclasses.Field, value: Any) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return record_dict(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def parse_record(cls: type[Record], data: Any, path: str, context: Mapping[str, Any], unknown: str = "error") -> Record:
    """``data`` as a ``cls`` record whose fields are named below ``path``; :class:`FieldProblem` if one does not fit
    (a field's own ``read`` function calls this for a nested record)."""
    if not isinstance(data, Mapping):
        raise FieldProblem(path, f"expected a JSON object, got {_kind(data)}.")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    hints = typing.get_type_hints(cls)
    extra = sorted(str(key) for key in data if key not in fields)
    if extra and unknown == "error":
        raise FieldProblem(
            _join(path, extra[0]),
            "this nsteer does not know this field (written by a newer nsteer?); upgrade nsteer.",
        )
    missing = [
        name
        for name, field in fields.items()
        if name not in data and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise FieldProblem(_join(path, missing[0]), "this field is required but missing.")
    values = {}
    for name, field in fields.items():
        if name not in data:
            continue
        read = field.metadata.get("read")
        where = _join(path, name)
        if read:
            values[name] = read(data[name], where, context)
        else:
            values[name] = _value(hints[name], data[name], where, field.metadata, context, unknown)
    return cls(**values)


def _value(kind: Any, value: Any, path: str, rules: Mapping[str, Any], context: Mapping[str, Any], unknown: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"{path}: only 'X | None' unions are supported in records")
        return _value(options[0], value, path, rules, context, unknown)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        return parse_record(kind, value, path, context, unknown)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldProblem(path, f"expected a list, got {_kind(value)}.")
        item_kind = args[0]
        return tuple(
            _value(item_kind, item, f"{path}[{index}]", rules, context, unknown) for index, item in enumerate(value)
        )
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
            raise FieldProblem(path, f"expected an object with string keys, got {_kind(value)}.")
        item_kind = args[1] if len(args) == 2 else Any
        return {key: _value(item_kind, item, f"{path}[{key!r}]", {}, context, unknown) for key, item in value.items()}
    return _scalar(kind, value, path, rules, context)


def _scalar(kind: Any, value: Any, path: str, rules: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise FieldProblem(path, f"expected true or false, got {_show(value)}.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldProblem(path, f"expected an integer, got {_show(value)}.")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldProblem(path, f"expected a number, got {_show(value)}.")
        try:
            value = float(value)
        except OverflowError:  # an integer past float's range (JSON allows any number of digits)
            raise FieldProblem(path, f"expected a finite number, got {_show(value)}.") from None
        if not math.isfinite(value):
            raise FieldProblem(path, f"expected a finite number, got {value}.")
    elif kind is str:
        if not isinstance(value, str):
            raise FieldProblem(path, f"expected a string, got {_show(value)}.")
    else:
        raise TypeError(f"{path}: records cannot hold {kind!r}")
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        raise FieldProblem(path, f"expected one of {', '.join(map(str, choices))}, got {_show(value)}.")
    bounds = rules.get("range")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise FieldProblem(path, f"expected a value from {bounds[0]} to {bounds[1]}, got {_show(value)}.")
    if rules.get("layer"):
        n_layers = context.get("n_layers")
        if n_layers is not None and not 0 <= value < n_layers:
            raise FieldProblem(path, f"layer {value} is out of range: the vector has layers 0..{n_layers - 1}.")
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    """A bad value quoted literally and briefly: files are data, and a message must stay one readable line."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."
