"""Config dataclasses as the single source of options: `--key value` flags, YAML files, Python.

Every subcommand has one dataclass. Its fields become dotted flags (nested dataclasses give
`--train.lr`); a YAML file given with `--config` supplies values under the same names; flags
override YAML, YAML overrides defaults. The result is the same dataclass the Python API takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.files import read_text

_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a flag string or a YAML value into the field's type, or say which key is wrong."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE_WORDS):
        if optional:
            return None
        raise UserError(f"option {key} cannot be empty")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base) or (str,)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, item, key) for v in items]
    if base is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in _TRUE_WORDS | _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise UserError(f"option {key}={value!r} is not a boolean; use true or false")
    if base in (int, float):
        try:
            number = base(value)
        except (TypeError, ValueError):
            kind = "an integer" if base is int else "a number"
            raise UserError(f"option {key}={value!r} is not {kind}; give {kind}") from None
        if base is int and isinstance(value, float) and value != number:
            raise UserError(f"option {key}={value!r} must be a whole number")
        return number
    if base is str:
        return str(value)
    return value


def _help(field: dataclasses.Field, default: Any) -> str:
    text = field.metadata.get("help", "")
    return f"{text} (default: {default})" if text else f"(default: {default})"


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add a flag for every field of dataclass `cls` (recursively, dotted)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or "options") if prefix else parser
    for field in dataclasses.fields(cls):
        name, tp = prefix + field.name, hints[field.name]
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, name + ".")
        elif "options" in field.metadata:  # an open dict: preset plus any field of another dataclass
            sub = parser.add_argument_group(name)
            sub.add_argument(f"--{name}.preset", dest=f"{name}.preset", default=argparse.SUPPRESS,
                             help=f"named preset (default: {_default_of(field).get('preset')})")
            sub_hints = typing.get_type_hints(field.metadata["options"])
            for inner in dataclasses.fields(field.metadata["options"]):
                _add_flag(sub, f"{name}.{inner.name}", sub_hints[inner.name],
                          inner.metadata.get("help", "overrides the preset"))
        elif field.metadata.get("positional"):
            many = typing.get_origin(_unwrap_optional(tp)[0]) is list  # e.g. `rag index DOCS...`
            group.add_argument(name, nargs="*" if many else "?", default=argparse.SUPPRESS, metavar=name.upper(),
                               help=field.metadata.get("help"))
        else:
            _add_flag(group, name, tp, _help(field, _default_of(field)), field.metadata.get("flag"))


def _add_flag(group: Any, name: str, tp: Any, help_text: str, flag: str | None = None) -> None:
    """--name (or --flag, when the field's name cannot be the flag, e.g. a Python keyword)."""
    base, _ = _unwrap_optional(tp)
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if typing.get_origin(base) is list:
        item = getattr(typing.get_args(base)[0], "__name__", "VALUE")
        kwargs.update(nargs="+", action="extend", metavar=item.upper())  # --x a b and --x a --x b both work
    elif base in (int, float, str):
        kwargs["metavar"] = base.__name__.upper()
    elif base is bool:
        kwargs.update(nargs="?", const="true", metavar="BOOL")
    group.add_argument(f"--{flag or name}", **kwargs)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Construct dataclass `cls` from a nested dict, coercing types and rejecting unknown keys."""
    if not isinstance(values, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise UserError(f"unknown option(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                        f"valid: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        field, tp = known[name], hints[name]
        if dataclasses.is_dataclass(tp):
            # Start from this field's own default (a recipe may set different defaults than the class).
            base = dataclasses.asdict(_default_of(field)) if _default_of(field) is not None else {}
            kwargs[name] = build(tp, _merge(base, value) if isinstance(value, dict) else value, f"{prefix}{name}.")
        elif "options" in field.metadata:
            kwargs[name] = _build_open_dict(field, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _build_open_dict(field: dataclasses.Field, value: dict[str, Any], prefix: str) -> dict[str, Any]:
    target = field.metadata["options"]
    hints = typing.get_type_hints(target)
    merged = _merge(_default_of(field), value)
    out = {}
    for key, item in merged.items():
        if key == "preset":
            out[key] = str(item)
        elif key in hints:
            out[key] = _coerce(item, hints[key], prefix + key)
        else:
            raise UserError(f"unknown option {prefix}{key}; valid: preset, {', '.join(sorted(hints))}")
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file '{path}' does not exist; check the --config path")
    text = read_text(path, "config file")  # a folder, unreadable or not UTF-8: one line naming it
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of options at the top level")
    return data


def parse(cls: type, namespace: argparse.Namespace) -> Any:
    """defaults ← YAML (--config) ← flags, then build the dataclass."""
    flat = {k: v for k, v in vars(namespace).items() if k not in ("config", "command", "subcommand", "handler")}
    values = load_yaml(namespace.config) if getattr(namespace, "config", None) else {}
    return build(cls, _merge(values, _nest(flat)))
