"""Load role settings from TOML files and environment variables into validated dataclasses.

Each role declares its settings as a flat dataclass whose fields carry `help` metadata and whose
`__post_init__` checks values with messages that say how to fix them (the PEFT config habit).
This module only does the plumbing: read the file, apply `PREFIX_FIELD` environment overrides,
coerce types, and refuse unknown keys with a "did you mean" hint instead of ignoring typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

from flora.errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text (shown by `flora ... --help-config` and in docs)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a TOML or environment value to the field's declared type, or explain why not."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"setting '{name}' must not be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"expected text, got {type(value).__name__}")
            return str(value)
        if tp is Path:
            return Path(str(value)).expanduser()
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [coerce(name, item.strip() if isinstance(item, str) else item, item_tp) for item in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError("expected a table")
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting '{name}': {exc}") from None
    return value


def from_mapping(cls: type[T], values: dict[str, Any], *, source: str = "settings") -> T:
    """Build `cls` from a flat mapping, refusing unknown keys with a suggestion."""
    types_by_name = _field_types(cls)
    unknown = [key for key in values if key not in types_by_name]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, types_by_name, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown setting(s) in {source}: {', '.join(hints)}. Valid settings: {', '.join(sorted(types_by_name))}."
        )
    kwargs = {key: coerce(key, value, types_by_name[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required setting is missing
        raise ConfigError(f"{source}: {exc}") from None


def env_overrides(cls: type, prefix: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Collect `PREFIX_FIELD=value` variables for the fields of `cls` (e.g. FLORA_CLIENT_BROKER_URL)."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for key, value in environ.items():
        if key.startswith(prefix):
            name = key[len(prefix) :].lower()
            if name in names:
                found[name] = value
    return found


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    *,
    env_prefix: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> T:
    """File, then environment, then explicit overrides (CLI flags): later sources win."""
    values: dict[str, Any] = {}
    source = "settings"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing TOML file")
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if env_prefix:
        values.update(env_overrides(cls, env_prefix, environ))
    if overrides:
        values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(cls, values, source=source)


def to_toml(obj: Any) -> str:
    """Render a flat settings dataclass as TOML (used by the demo and `provision` to write configs)."""
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        help_text = f.metadata.get("help")
        if help_text:
            lines.append(f"# {help_text}")
        lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def describe(cls: type) -> str:
    """One line per setting with its default and help, for `--help-config`."""
    out = []
    for f in dataclasses.fields(cls):
        # Defaults are shown as they would be written in the TOML file (not Python reprs like PosixPath(...)).
        if f.default is not dataclasses.MISSING:
            default = "(unset)" if f.default is None else toml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = toml_value(f.default_factory())
        else:
            default = "(required)"
        out.append(f"  {f.name:<28} {default:<24} {f.metadata.get('help', '')}")
    return "\n".join(out)
