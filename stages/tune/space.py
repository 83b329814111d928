"""The search space of a sweep (``tune.space``): its syntax, parsing and checks.

One entry per parameter::

    k: {choice: [1, 2, 3, 4]}            # sampled (random search) / enumerated (search: grid)
    M: {grid: [5, 10, 20]}               # always enumerated (a Tune grid_search)
    temperature: {loguniform: [0.01, 1.0]}
    lam: {uniform: [0.3, 0.7]}
    fuse_all_until: {randint: [1, 3]}    # integers, both ends included
    train.lr: 0.003                      # a plain value: the same for every trial

Keys without a dot are method options (``k`` means ``method.options.k``); keys with a dot are
paths from the config root. Every key and value is checked before anything runs (errors name
``tune.space.<key>``); method options are checked against the method's options dataclass.

An empty ``tune.space`` means the method's own default space: its class's ``sweep_space``
(``pipeline.methods.registry.default_sweep_space``); a method that declares none needs a
``tune.space``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, config_from_dict

SPACE_FORMS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Param:
    """One swept parameter: its key in ``tune.space``, config path, domain form and values."""

    key: str
    path: str  # dotted path from the config root
    kind: str  # choice | grid | uniform | loguniform | randint | value
    values: tuple[Any, ...]

    @property
    def where(self) -> str:
        return f"tune.space.{self.key}"

    def is_grid(self, search: str) -> bool:
        return self.kind == "grid" or (self.kind == "choice" and search == "grid")

    def domain(self, search: str) -> Any:
        """The Ray Tune domain for this parameter (``tune`` imported lazily)."""
        from ray import tune

        if self.is_grid(search):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper bound is exclusive
        return self.values[0]

    def samples(self) -> list[Any]:
        """Values that stand for the domain when checking it: every listed value, range ends
        (as the sampled type: floats for uniform/loguniform)."""
        if self.kind in ("uniform", "loguniform"):
            return [float(v) for v in self.values]
        return list(self.values)

    def describe(self, search: str, key_width: int = 14, path_width: int = 28) -> str:
        form = "grid" if self.is_grid(search) else self.kind
        vals = ", ".join(repr(v) for v in self.values)
        shown = {"value": vals, "randint": f"[{vals}] (inclusive)"}.get(self.kind, f"[{vals}]")
        return f"{self.key:<{key_width}} -> {self.path:<{path_width}} {form} {shown}"

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "path": self.path, "kind": self.kind, "values": list(self.values)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Param":
        return cls(key=d["key"], path=d["path"], kind=d["kind"], values=tuple(d["values"]))


def param_path(key: str) -> str:
    """``k`` -> ``method.options.k``; a dotted key is already a path from the config root."""
    return key if "." in key else f"method.options.{key}"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_param(key: Any, spec: Any) -> Param:
    """One ``tune.space`` entry -> Param; ConfigError naming ``tune.space.<key>`` if malformed."""
    where = f"tune.space.{key}"
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{where}: parameter names are non-empty (dotted) strings")
    path = param_path(key)
    if isinstance(spec, list):
        raise ConfigError(f"{where}: a bare list is ambiguous; write {{choice: [...]}} or {{grid: [...]}}")
    if not isinstance(spec, dict):
        return Param(key, path, "value", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in SPACE_FORMS:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(SPACE_FORMS)}: ...}} or a plain value, got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        if any(isinstance(v, (dict, list)) for v in args):
            raise ConfigError(f"{where}: {kind} values must be scalars, got {args!r}")
        return Param(key, path, kind, tuple(args))
    if len(args) != 2 or not all(is_number(v) for v in args):
        raise ConfigError(f"{where}: {kind} needs [low, high] (two numbers), got {args!r}")
    lo, hi = args
    if kind == "randint":
        if not all(isinstance(v, int) for v in args) or lo > hi:
            raise ConfigError(f"{where}: randint needs integers low <= high, got {args!r}")
    elif lo >= hi:
        raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs 0 < low < high, got {args!r}")
    return Param(key, path, kind, (lo, hi))


def default_space(method: str) -> dict[str, Any]:
    """The method's own default space (its class's ``sweep_space``); ConfigError if it has none."""
    from pipeline.methods.registry import UnknownMethod, default_sweep_space

    try:
        space = default_sweep_space(method)
    except UnknownMethod as exc:
        raise ConfigError(f"tune.space: {exc}") from None
    if not space:
        raise ConfigError(
            f"tune.space: method {method!r} declares no default sweep space (its class sets no sweep_space); "
            "give one in the config (tune: {space: {...}}) or as an override, e.g. "
            "\"tune.space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}}\" (python pipeline/main.py tune --help "
            "explains the syntax)")
    return space


def parse_space(space: dict[str, Any] | None, search: str = "random", *, method: str | None = None) -> list[Param]:
    """``tune.space`` -> parameters; checks forms and duplicate paths. An empty space is the
    default space of ``method`` (ConfigError when no method is given or it declares none)."""
    if not space:
        if method is None:
            raise ConfigError("tune.space: empty, and no method whose default space could stand in")
        space = default_space(method)
    params = [parse_param(k, v) for k, v in dict(space).items()]
    seen: dict[str, str] = {}
    for p in params:
        if p.path in seen:
            raise ConfigError(f"{p.where}: same parameter as tune.space.{seen[p.path]} ({p.path})")
        seen[p.path] = p.key
        if search == "grid" and p.kind in ("uniform", "loguniform", "randint"):
            raise ConfigError(f"{p.where}: search 'grid' enumerates values; a {p.kind} range has none "
                              "(use choice/grid, or search: random)")
        if search == "optuna" and p.kind == "grid":
            raise ConfigError(f"{p.where}: grid is not supported by search 'optuna' (use choice)")
    if not any(p.kind != "value" for p in params):
        raise ConfigError("tune.space: nothing to sweep (every entry is a plain value)")
    return params


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested config dict (creating sections; a non-section is an error)."""
    node = tree
    keys = path.split(".")
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: {'.'.join(keys[: i + 1])} is not a config section")
        node = child
    node[keys[-1]] = value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of config dict ``base`` with ``values`` ({dotted path: value}) set."""
    tree = json.loads(json.dumps(base, default=str))
    for path, value in values.items():
        set_path(tree, path, value)
    return tree


def options_class(method: str) -> type | None:
    """The method's options dataclass (its class's ``options_class``; None: no options)."""
    from pipeline.methods.registry import method_class

    return getattr(method_class(method), "options_class", None)


def _check_option(cfg: dict[str, Any], p: Param, value: Any) -> None:
    """Check a method-option value with the method's options dataclass (names, types, ranges)."""
    method = cfg["method"]["name"]
    cls = options_class(method)
    if cls is None:
        return
    name = p.path.split(".", 2)[2]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ConfigError(f"{p.where}: method {method!r} has no option {name!r} (options: {sorted(fields)})")
    hint = typing.get_type_hints(cls).get(name)
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    ints = int in args and float not in args
    if ints and p.kind in ("uniform", "loguniform"):
        raise ConfigError(f"{p.where}: {method} option {name!r} is an integer; {p.kind} gives floats "
                          "(use randint or choice)")
    options = dict(cfg["method"].get("options") or {})
    try:
        cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{p.where}: value {value!r} is invalid: {exc}") from None


def validate_space(params: list[Param], base: dict[str, Any]) -> None:
    """Apply every listed value / range end of every parameter to the experiment config and
    validate the result; ConfigError names ``tune.space.<key>``."""
    for p in params:
        for value in p.samples():
            tree = apply_values(base, {p.path: value})
            if p.path.startswith("method.options."):  # first: its messages say more about options
                _check_option(tree, p, value)
            try:
                config_from_dict(tree)
            except ConfigError as exc:
                raise ConfigError(f"{p.where}: value {value!r} -> {exc}") from None


def grid_size(params: list[Param], search: str) -> int:
    """Number of grid points (1 without grids)."""
    return math.prod(len(p.values) for p in params if p.is_grid(search))


def trial_count(params: list[Param], search: str, num_samples: int) -> int:
    """Trials the search will run: num_samples x every grid (Tune's BasicVariantGenerator)."""
    return num_samples * (grid_size(params, search) if search != "optuna" else 1)
