"""Configs: one dataclass per stage, a docstring per field, YAML files and command-line overrides.

The convention, the same for every verb:

    chatloop VERB [--config FILE.yaml] [--FIELD VALUE | --FIELD=VALUE | --SECTION.FIELD=VALUE] ...

Precedence: a command-line override beats the YAML file, which beats the dataclass default. Nested
dataclasses (e.g. the model shape) are addressed with dots (`--model.n_layer=4`) and written as nested
mappings in YAML. A bool field also takes a bare `--FIELD` (true) and `--no-FIELD` (false). `None` is
written `none` (or `null`). An unknown field or a value of the wrong type is a `ConfigError` that names the
source (file or flag), the field, and what was expected.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from chatloop.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override that does not fit the dataclass; the message says where and why."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right below a field) of a dataclass and its bases."""
    if hasattr(cls, "__field_docs_from__"):
        return field_docs(cls.__field_docs_from__)
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or a command-line string to the field type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    is_text = isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if type(None) in options and (value is None or (is_text and value.lower() in ("none", "null"))):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        for allowed in get_args(tp):
            if value == allowed or (is_text and str(allowed) == value):
                return allowed
        raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_type,) = get_args(tp)
        if is_text:
            value = [v for v in (s.strip() for s in value.split(",")) if v] if value.strip() else []
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item_type)}, got {value!r}")
        return [coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if is_text and value.lower() in ("true", "yes", "1", "on"):
            return True
        if is_text and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if is_text:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if is_text:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _unknown(cls: type, key: str, where: str) -> ConfigError:
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    return ConfigError(f"{where}: unknown field {key!r} of {cls.__name__}; expected one of: {names}")


def from_dict(cls: type[T], data: dict[str, Any], where: str, base: T | None = None) -> T:
    """Build (or update `base` of) dataclass `cls` from a nested mapping, checking names and types."""
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    updates = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown(cls, key, where)
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            updates[key] = from_dict(tp, value, f"{where}.{key}" if where else key, getattr(obj, key))
        else:
            updates[key] = coerce(value, tp, f"{where}: field {key!r}")
    return dataclasses.replace(obj, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def _set_dotted(cls: type, obj: Any, dotted: str, raw: str, flag: str) -> Any:
    head, _, rest = dotted.partition(".")
    head = head.replace("-", "_")
    known = {f.name for f in dataclasses.fields(cls)}
    if head not in known:
        raise _unknown(cls, head, flag)
    tp = _hints(cls)[head]
    if rest:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{flag}: field {head!r} of {cls.__name__} has no sub-fields")
        return dataclasses.replace(obj, **{head: _set_dotted(tp, getattr(obj, head), rest, raw, flag)})
    return dataclasses.replace(obj, **{head: coerce(raw, tp, flag)})


def _field_type(cls: type, dotted: str) -> Any:
    for part in dotted.split(".")[:-1]:
        tp = _hints(cls).get(part.replace("-", "_"))
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp  # type: ignore[assignment]
    return _hints(cls).get(dotted.split(".")[-1].replace("-", "_"))


def _is_bool(cls: type, dotted: str) -> bool:
    return _field_type(cls, dotted) is bool


def _is_list(cls: type, dotted: str) -> bool:
    return get_origin(_field_type(cls, dotted)) is list


def parse_args(cls: type[T], argv: list[str]) -> T:
    """Parse `[--config FILE] [--field value ...]` into a `cls` instance (see the module docstring)."""
    args = list(argv)
    config_file = None
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --FIELD=VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            head, dot, last = key.rpartition(".")
            if last.startswith("no-") and _is_bool(cls, head + dot + last[3:]):  # --no-x, --stage.no-x
                key, value = head + dot + last[3:], "false"
            elif _is_bool(cls, key) and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif _is_list(cls, key) and i + 1 < len(args):
                # A list takes every value up to the next flag, so shell globs work: --inputs data/*.txt
                values = []
                while i + 1 < len(args) and not args[i + 1].startswith("--"):
                    i += 1
                    values.append(args[i])
                value = ",".join(values)
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"--{key}: missing a value")
        if key == "config":
            config_file = value
        else:
            pairs.append((key, value))
        i += 1
    obj = cls()
    if config_file is not None:
        obj = from_dict(cls, load_yaml(config_file), str(config_file))
    for key, value in pairs:
        obj = _set_dotted(cls, obj, key, value, f"--{key}")
    return obj


def resolve_function(spec: str, flag: str) -> Any:
    """The function a config value names as `module:function` (a plug-in: a judge, a reward), imported now, so a
    stage depends on its plug-ins only through the value it is given."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name) if name else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{flag}={spec}: cannot import it ({e})") from None
    if not callable(function):
        raise ConfigError(f"{flag}={spec}: expected module:function, naming a function of an importable module")
    return function


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def help_text(cls: type, prefix: str = "") -> str:
    """One block per field: flag, type, default and docstring; nested dataclasses are expanded."""
    lines = []
    docs = field_docs(cls)
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"\n  [{prefix}{f.name}] {docs.get(f.name, '')}")
            lines.append(help_text(tp, f"{prefix}{f.name}."))
            continue
        default = getattr(defaults, f.name)
        lines.append(f"  --{prefix}{f.name}  ({_type_name(tp)}, default: {default!r})")
        if f.name in docs:
            lines.extend("      " + ln for ln in textwrap.wrap(docs[f.name], 92))
    return "\n".join(lines)
