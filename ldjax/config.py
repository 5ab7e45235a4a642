"""Typed dataclass configs from the command line: flags, a JSON config file, or both.

Every entry point (``experiments/*.py``, ``ldjax pretrain|sft|dpo``) declares one frozen
dataclass and a ``main(config)``; :func:`parse_config` turns ``argv`` into that dataclass.
Precedence: dataclass defaults < ``--config file.json`` < explicit flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def _field_type(tp: Any) -> tuple[Any, bool]:
    """Returns (scalar type, is_tuple) for a field annotation; Optional[X] becomes X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _field_type(args[0])
        return str, False
    if origin in (tuple, Sequence, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return (args[0] if args else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per dataclass field (help from field metadata)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=pathlib.Path, default=None,
                        help="JSON file of field values; explicit flags override it")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_tuple = _field_type(hints[f.name])
        conv = _parse_bool if tp is bool else tp
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=f.metadata.get("help", " ") + f" (default: {default!r})")
        if is_tuple:
            kwargs.update(nargs="*", type=conv)
        else:
            kwargs.update(type=conv)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None) -> T:
    """Parses ``argv`` into an instance of dataclass ``cls``; unknown keys in a config file are an error."""
    parser = build_parser(cls, prog=prog)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if config_path is not None:
        try:
            loaded = json.loads(pathlib.Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"cannot read config file {config_path}: {e}")
        unknown = set(loaded) - names
        if unknown:
            parser.error(f"config file {config_path} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
        values.update(loaded)
    values.update(ns)
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        _, is_tuple = _field_type(hints[name])
        if is_tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
