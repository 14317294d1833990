"""argparse flags generated from the settings tree, so `--help` documents every setting."""

from __future__ import annotations

import argparse
import enum
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from streamer.config import SettingField, Settings, load_settings, setting_fields

# Flags keep their values under these dests so they never collide with a command's own options.
_DEST_PREFIX = "settings__"


def _dest(field: SettingField) -> str:
    return _DEST_PREFIX + "__".join(field.path)


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _metavar(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(annotation)) + "}"
    names = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", SecretStr: "SECRET"}
    return names.get(annotation, "VALUE")


def _show_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def _help(field: SettingField, optional: bool) -> str:
    info = field.info
    default = info.get_default(call_default_factory=True)
    text = f"{info.description} [env {field.env_var}; default {_show_default(default)}"
    if optional:
        text += "; an empty value unsets it"
    # argparse %-formats help strings.
    return (text + "]").replace("%", "%%")


# Shorter names some settings are also known by on the command line.
ALIASES = {"forecast.horizon": ("--horizon",)}


def add_settings_arguments(parser: argparse.ArgumentParser,
                           sections: Collection[str] | None = None) -> None:
    """Add one flag per setting, grouped by section (only ``sections`` when given; top-level
    settings are the section "general"); flags not passed leave no trace."""
    groups: dict[str, Any] = {}
    for field in setting_fields():
        section = field.path[0] if len(field.path) > 1 else "general"
        if sections is not None and section not in sections:
            continue
        if section not in groups:
            description = None
            if section in Settings.model_fields:
                description = Settings.model_fields[section].description
            groups[section] = parser.add_argument_group(f"{section} settings", description)
        group = groups[section]
        names = (field.flag, *ALIASES.get(field.dotted, ()))
        annotation, optional = _strip_optional(field.info.annotation)
        if annotation is bool:
            group.add_argument(
                *names,
                dest=_dest(field),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=_help(field, optional=False),
            )
        else:
            # Values stay strings: pydantic converts and validates them, so a bad flag gets the
            # same message as a bad env var.
            group.add_argument(
                *names,
                dest=_dest(field),
                metavar=_metavar(annotation),
                default=argparse.SUPPRESS,
                help=_help(field, optional),
            )


def settings_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings the user passed as flags, by dotted path."""
    given = vars(namespace)
    return {
        field.dotted: given[_dest(field)] for field in setting_fields() if _dest(field) in given
    }


def settings_from_args(namespace: argparse.Namespace) -> Settings:
    """Settings from env, with the flags the user passed taking precedence; raises ConfigError."""
    return load_settings(settings_overrides(namespace))
