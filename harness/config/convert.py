"""Plain mappings into the frozen dataclasses of :mod:`harness.config.schema`, field by field.

Each value becomes its field's annotated type (a YAML ``1`` in a float field becomes ``1.0``, so
the config hash stays canonical) and must then pass the range its field declares with
:func:`check`. Errors name the file and the dotted field path. No YAML here
(:mod:`harness.config.parse` reads it) and no rule across fields (:mod:`harness.config.checks`);
this module imports nothing of the package, so every other module may import it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from harness.config.schema import TrialConfig


class ConfigError(ValueError):
    """A bad sweep file; the message names the file and the field path."""


def check(ok: Callable[[Any], bool], msg: str) -> dict[str, Any]:
    """A field's metadata: a given value must satisfy ``ok``, else ``<path>: <msg>, got <value>``."""
    return {"check": (ok, msg)}


def violation(metadata: typing.Mapping[str, Any], value: Any) -> str | None:
    """The message of the :func:`check` in ``metadata`` that ``value`` fails, or None."""
    ok, msg = metadata.get("check", (None, ""))
    return None if ok is None or ok(value) else msg


def convert(tp: Any, value: Any, path: str, where: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, Literal, unions, tuples, dicts, dataclasses)."""
    origin = typing.get_origin(tp)
    fail = lambda msg: ConfigError(f"{where}: {path}: {msg}")  # noqa: E731
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, value, path, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise fail(f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, where)
    if origin is tuple:
        return _convert_tuple(tp, value, path, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(f"expected a mapping, got {value!r}")
        item = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        if dataclasses.is_dataclass(item):  # e.g. variants: name -> VariantConfig
            return {k: build(item, v, f"{path}.{k}", where) for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {value!r}")
        return value
    raise fail(f"unsupported type {tp}")  # pragma: no cover


def _convert_union(tp: Any, value: Any, path: str, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    real = [a for a in args if a is not type(None)]
    if len(real) == 1:  # X | None: keep X's own, more precise error
        return convert(real[0], value, path, where)
    for arg in real:
        try:
            return convert(arg, value, path, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: {path}: expected {tp}, got {value!r}")


def _convert_tuple(tp: Any, value: Any, path: str, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: {path}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value))
    if len(args) != len(value):
        raise ConfigError(f"{where}: {path}: expected {len(args)} values, got {len(value)}")
    return tuple(convert(a, v, f"{path}[{i}]", where) for i, (a, v) in enumerate(zip(args, value)))


def build(cls: type, raw: Any, path: str, where: str) -> Any:
    """A ``cls`` from the mapping ``raw``: no unknown key, every required field, each value of its
    field's type and within its field's declared range (``source_file`` is never read from a file)."""
    prefix = f"{path}." if path else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {path or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields or key == "source_file":
            known = sorted(set(fields) - {"source_file"})
            raise ConfigError(f"{where}: {prefix}{key}: unknown field; known: {known}")
    kwargs = {k: convert(hints[k], v, f"{prefix}{k}", where) for k, v in raw.items()}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            raise ConfigError(f"{where}: {prefix}{name}: required field is missing")
    for name, value in kwargs.items():
        msg = violation(fields[name].metadata, value)
        if msg:
            raise ConfigError(f"{where}: {prefix}{name}: {msg}, got {value!r}")
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides
def replace_path(obj, path: list[str], value):
    """A copy of a frozen dataclass tree with the field at ``path`` set to ``value``."""
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        return {**obj, head: replace_path(obj.get(head, {}), rest, value) if rest else value}
    current = getattr(obj, head)
    return dataclasses.replace(obj, **{head: replace_path(current, rest, value) if rest else value})


def apply_overrides(trial: TrialConfig, overrides: dict[str, Any]) -> TrialConfig:
    """``{dotted.path: value}`` applied to a trial, then rebuilt so every value has its field's
    type (a grid's ``1`` for a float field becomes ``1.0``: the config hash stays canonical)."""
    if not overrides:
        return trial
    for path, value in overrides.items():
        trial = replace_path(trial, path.split("."), value)
    return build(type(trial), trial.to_dict(), "", "<trial>")
