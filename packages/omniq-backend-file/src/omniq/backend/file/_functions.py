"""Import paths of task functions, and the allow-list the worker checks before importing."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from omniq.core.errors import ConfigurationError, OmniQError


class FunctionNotAllowedError(OmniQError):
    """The task names a function outside the worker's allow-list."""


class FunctionImportError(OmniQError):
    """The task's function path does not import or does not name a callable."""


def func_path(func: Callable[..., Any] | str) -> str:
    """``"package.module:qualname"`` for a module-level callable (or a path, checked)."""
    if isinstance(func, str):
        head, sep, name = func.partition(":")
        if not sep or not head or not name:
            raise ConfigurationError(
                f"function path {func!r} must look like 'package.module:function'"
            )
        return func
    target = getattr(func, "__omniq_func__", func)
    module: str | None = getattr(target, "__module__", None)
    qualname: str | None = getattr(target, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise ConfigurationError(
            f"{func!r} is not importable by a worker; define it at module level"
        )
    return f"{module}:{qualname}"


def is_allowed(path: str, allow: Sequence[str] | None) -> bool:
    """``allow`` entries are exact paths (``"app.tasks:send"``) or module prefixes
    (``"app.tasks"`` allows ``app.tasks:*`` and ``app.tasks.sub:*``)."""
    if allow is None:
        return True
    module = path.partition(":")[0]
    for entry in allow:
        if entry == path or (
            ":" not in entry and (module == entry or module.startswith(entry + "."))
        ):
            return True
    return False


def resolve(path: str, allow: Sequence[str] | None = None) -> Callable[..., Any]:
    """Import ``path`` and return the callable; raise FunctionImportError / NotAllowed."""
    if not is_allowed(path, allow):
        raise FunctionNotAllowedError(f"{path} is not in this worker's allow-list")
    obj = import_object(path)
    if not callable(obj):
        raise FunctionImportError(f"{path} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def import_object(path: str) -> Any:
    """The object at ``"package.module:name"`` (FunctionImportError if it does not import)."""
    module_name, _, qualname = path.partition(":")
    if not module_name or not qualname:
        raise FunctionImportError(f"{path!r} is not a 'package.module:function' path")
    try:
        obj: Any = sys.modules.get(module_name) or importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # also a module that fails while importing (SyntaxError, ...):
        # retrying cannot fix it, and it must not escape as an internal worker error
        raise FunctionImportError(f"cannot import {path}: {type(exc).__name__}: {exc}") from exc
    return obj


def is_async(func: Callable[..., Any]) -> bool:
    target = getattr(func, "__wrapped__", func)
    # An object whose __call__ is a coroutine function counts too.
    call = type(target).__call__ if not inspect.isroutine(target) else None
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)
