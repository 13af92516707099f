"""Typed loading of plain YAML data into dataclasses, with errors that name the field and the fix.

The plan YAML is the contract a person edits by hand, so every mistake must be reported as
`plan.yaml: field 'mesh.tp' must be an integer, got 'two'` rather than a traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from costmodel.bounded_yaml import brief


class PlanError(ValueError):
    """A plan file or plan object that is malformed or does not match the model, cluster or world size."""


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def from_plain(tp: Any, value: Any, field: str, source: str) -> Any:
    """Convert YAML-loaded `value` to type `tp` (dataclass, list, dict, scalar, Optional), or raise PlanError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
        origin = typing.get_origin(tp)

    def fail() -> PlanError:
        return PlanError(f"{source}: field '{field}' must be {_type_name(tp)}, got {brief(value)}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields), key=str)
        if unknown:
            prefix = f"{field}." if field else ""
            name = str(unknown[0]) if len(str(unknown[0])) <= 60 else f"{str(unknown[0])[:60]}..."
            raise PlanError(f"{source}: unknown field '{prefix}{name}'; allowed here: {', '.join(fields)}. "
                            "Remove it or fix its spelling.")
        kwargs = {}
        for name, f in fields.items():
            path = f"{field}.{name}" if field else name
            if name not in value:
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                if has_default:
                    continue
                raise PlanError(f"{source}: missing field '{path}' ({_type_name(hints[name])}). Add it, or re-run "
                                "`meshplan plan` to write a complete plan.")
            kwargs[name] = from_plain(hints[name], value[name], path, source)
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item,) = typing.get_args(tp)
        return [from_plain(item, v, f"{field}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        key_tp, val_tp = typing.get_args(tp)
        return {from_plain(key_tp, k, f"{field}", source): from_plain(val_tp, v, f"{field}.{k}", source)
                for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {field}")


OMIT_IF_DEFAULT = {"omit_if_default": True}
"""Field metadata: `to_plain` leaves the field out while it holds its default (a rarely used field, such as a
layer's `tp_rows`, then adds no line to every plan); loading fills the default back in."""


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts in field order (so YAML keeps a readable, stable order)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_if_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
