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


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit status 2):
    ``<prog>: error: <message> — see <prog> --help`` (argparse prints the whole usage first)."""

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per dataclass field (help from field metadata).

    A usage error (unknown flag, a value of the wrong type) exits with status 2 after one line
    on stderr naming the flag (:class:`OneLineArgumentParser`).
    """
    parser = OneLineArgumentParser(
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
        if is_tuple:  # `--seeds 0 1 2` or `--seeds 0,1,2`: split and converted in parse_config
            kwargs.update(nargs="*", type=str)
        elif tp is bool:  # `--quick` alone means true; `--quick false` still works
            kwargs.update(type=conv, nargs="?", const=True)
        else:
            kwargs.update(type=conv)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kwargs)
    return parser


def _type_problem(annotation: Any, value: Any) -> str | None:
    """Why a JSON value does not fit a field annotation (None when it does)."""
    tp, is_tuple = _field_type(annotation)
    optional = type(None) in typing.get_args(annotation)
    if value is None:
        return None if optional else "must not be null"
    items = value if is_tuple else [value]
    if is_tuple and not isinstance(value, list):
        return f"must be a list, got {value!r}"
    for item in items:
        if tp is bool:
            ok = isinstance(item, bool)
        elif tp is int:
            ok = isinstance(item, int) and not isinstance(item, bool)
        elif tp is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
        elif tp is str:
            ok = isinstance(item, str)
        else:
            ok = True  # a type this checker does not know: the dataclass decides
        if not ok:
            return f"must be {'a list of ' if is_tuple else ''}{getattr(tp, '__name__', tp)}, got {item!r}"
    return None


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
        if not isinstance(loaded, dict):
            parser.error(f"config file {config_path}: expected a JSON object of field values, got {type(loaded).__name__}")
        unknown = set(loaded) - names
        if unknown:
            parser.error(f"config file {config_path} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in loaded.items():
            problem = _type_problem(hints[name], value)
            if problem:
                parser.error(f"config file {config_path}: field {name!r} {problem}")
        values.update(loaded)
    values.update(ns)
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        tp, is_tuple = _field_type(hints[name])
        if is_tuple and isinstance(value, list):
            if name in ns:  # command-line tokens: split on commas, convert each item
                conv = _parse_bool if tp is bool else tp
                items = [item for token in value for item in str(token).split(",") if item != ""]
                try:
                    value = [conv(item) for item in items]
                except (ValueError, argparse.ArgumentTypeError) as e:
                    parser.error(f"argument --{name.replace('_', '-')}: invalid value in {' '.join(map(str, ns[name]))!r}: {e}")
            values[name] = tuple(value)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))
