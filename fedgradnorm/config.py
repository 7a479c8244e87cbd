"""Frozen dataclass configuration from command-line flags or ``FEDGRADNORM_*`` environment variables.

Every field of a config dataclass becomes a flag (``round_timeout`` -> ``--round-timeout``) and an
environment variable (``FEDGRADNORM_ROUND_TIMEOUT``). A flag given on the command line wins over
the variable, the variable over the field's default. A value that does not parse fails fast with
a message naming the flag or variable; the dataclass's own ``__post_init__`` checks the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
ENV_PREFIX = "FEDGRADNORM_"


class ConfigError(ValueError):
    pass


def setting(default: Any, help: str, *, hidden: bool = False, secret: bool = False) -> Any:
    """A config field with its help sentence (and unit), declared once beside its default.
    ``hidden``: a benchmark or test switch, left out of ``--help``; ``secret``: never shown."""
    return dataclasses.field(default=default, repr=not secret, metadata={"help": help, "hidden": hidden})


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _parse(kind: Any, text: str, source: str) -> Any:
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return text
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{source}: {text!r} is not a valid {name}") from None


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type[DataclassInstance],
    helps: Mapping[str, str] | None = None,
    *,
    choices: Mapping[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
) -> None:
    """One flag per field (but ``skip``), with default None so that unset flags fall through to the
    environment. A boolean is a switch (``--insecure``; ``--insecure false`` also works); a field
    in ``choices`` lists its values in the help and refuses others."""
    helps = helps or {}
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "(secret)" if not f.repr else repr(default)
        sentence = f.metadata.get("help") or helps.get(f.name, f.name.replace("_", " "))
        text = f"{sentence} [env {env_name(f.name)}; default {shown}]"
        if f.metadata.get("hidden"):
            text = argparse.SUPPRESS
        extra: dict[str, Any] = {}
        kind = hints[f.name]
        if kind is bool:
            extra = {"nargs": "?", "const": "true"}
        values = choices.get(f.name) or (typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ())
        if values:
            extra["choices"] = list(values)
        else:
            extra["metavar"] = f.name.upper()
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=text, **extra)


def build(cls: type[T], args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> T:
    """The config from flags, then environment, then defaults; ConfigError on a bad value."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is not None:
            values[f.name] = _parse(hints[f.name], str(raw), flag_name(f.name))
        elif env_name(f.name) in env:
            values[f.name] = _parse(hints[f.name], env[env_name(f.name)], env_name(f.name))
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from e
