"""User code named in a federation spec: ``package.module:attr`` import paths, and factories with arguments.

Naming code by import path (as setuptools entry points and Flower's ``module:attr`` app references do)
keeps a federation spec a plain data file: the spec says which function to call with which keyword
arguments; the function lives in the user's own package (or beside the spec, see ``python_path``).
Importing it runs that code: a spec is as trusted as the code it names.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedgradnorm.data.base import DataError

_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class FactoryError(ValueError):
    """An import path that does not name something importable."""


def is_ref(text: str) -> bool:
    """Whether ``text`` has the form ``package.module:attr``."""
    return bool(_REF.match(text))


def resolve(ref: str) -> Any:
    """The object ``package.module:attr`` names (``attr`` may be dotted: ``module:Class.method``)."""
    if not is_ref(ref):
        raise FactoryError(f"{ref!r} is not an import path of the form package.module:attr")
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise FactoryError(f"{ref}: cannot import module {module_name!r} ({err})") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FactoryError(f"{ref}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


@dataclass(frozen=True)
class Factory:
    """A callable named by import path, and the keyword arguments to call it with."""

    ref: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_ref(self.ref):
            raise FactoryError(f"{self.ref!r} is not an import path of the form package.module:attr")
        try:
            json.dumps(dict(self.kwargs), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise FactoryError(f"{self.ref}: keyword arguments must be plain JSON values ({err})") from err

    def __call__(self, **extra: Any) -> Any:
        fn = resolve(self.ref)
        if not callable(fn):
            raise FactoryError(f"{self.ref} is not callable")
        try:
            return fn(**{**self.kwargs, **extra})
        except (FactoryError, DataError):  # already say what and where
            raise
        except Exception as err:  # the user's code: say which call failed, and how
            raise FactoryError(f"{self.ref}(**{dict(self.kwargs)}) failed: {type(err).__name__}: {err}") from err

    def describe(self) -> dict[str, Any]:
        return {"factory": self.ref, "kwargs": dict(self.kwargs)}
