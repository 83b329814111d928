"""The method registry: name -> method class. It knows no method.

A method module registers its class with ``@register("name")``. The built-in methods are the
modules ``pipeline/methods/__init__.py`` imports (one line each); a user's method outside the
repository is a file or module named in the config's ``method.plugins`` and loaded by
``load_plugins`` (in the driver and again in every Ray worker that rebuilds the config).

Method options are validated here and only here (``parse_options``), when a config is loaded and
when a method is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

_REGISTRY: dict[str, type] = {}
_PLUGINS: dict[str, str] = {}  # plugin spec -> module name it was loaded as


class UnknownMethod(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown method"


def register(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register("modalprompt")`` makes the method selectable by name (and sets
    the class's ``name``)."""

    def deco(cls: type) -> type:
        known = _REGISTRY.get(name)
        if known is not None and known is not cls and (known.__module__, known.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise ValueError(f"continual method {name!r} is registered twice ({known.__module__} and {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def load_plugins(plugins: list[str] | tuple[str, ...] | None) -> None:
    """Import the modules of ``method.plugins``: a ``.py`` file path, or a module name on the path.
    Importing runs their ``@register`` lines. Loading the same plugin twice is a no-op."""
    for spec in plugins or ():
        if spec in _PLUGINS:
            continue
        if spec.endswith(".py") or "/" in spec:
            path = Path(spec).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"method.plugins: {spec}: no such file")
            name = f"coin_method_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            if name not in sys.modules:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            name = spec
            importlib.import_module(spec)
        _PLUGINS[spec] = name


def registered_methods() -> list[str]:
    _builtin()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    """The class registered as ``name`` (UnknownMethod, naming the registered ones, if none)."""
    _builtin()
    if name not in _REGISTRY:
        raise UnknownMethod(f"unknown continual method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def parse_options(method_name: str, options: dict[str, Any] | None, cls: type | None) -> Any:
    """Build the options dataclass ``cls`` from a method's config section (None: no options).

    Unknown keys are an error (a typo such as ``temprature`` must not silently fall back to the
    default); ranges are checked by ``cls.__post_init__``.
    """
    options = dict(options or {})
    if cls is None:
        if options:
            raise ValueError(f"method {method_name!r}: takes no options (got {sorted(options)})")
        return None
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"method {method_name!r}: unknown option(s) {unknown}; allowed options: {sorted(allowed)}")
    return cls(**options)


def validate_method_options(name: str, options: dict[str, Any] | None) -> None:
    """Check a config's method name and options without building anything (no models needed),
    so that a misspelt option fails when the config is loaded, not on a training worker."""
    cls = method_class(name)
    parse_options(name, options, getattr(cls, "options_class", None))


def build_method(name: str, options: dict[str, Any], lmm: Any, guide: Any) -> Any:
    """Build the method called ``name`` with its config ``options`` on a built LMM and guide."""
    return method_class(name)(options, lmm, guide)


def default_sweep_space(name: str) -> dict[str, Any]:
    """The method's own Ray Tune search space (empty: the method declares none)."""
    return dict(getattr(method_class(name), "sweep_space", None) or {})


def _builtin() -> None:
    # the package's __init__ imports the built-in method modules; importing it runs their
    # @register lines (already done whenever anything under pipeline.methods was imported)
    importlib.import_module("pipeline.methods")
