"""The help text of ``python pipeline/main.py tune``: the search-space syntax, the objectives,
searches and schedulers, the configured method's default space and every method's.

Wired as the ``tune`` subparser's epilog (``formatter_class=argparse.RawDescriptionHelpFormatter``)::

    sub.add_parser("tune", ..., epilog=tune_help_epilog(), formatter_class=RawDescriptionHelpFormatter)
"""

from __future__ import annotations

from typing import Any

import yaml

from stages.tune.objective import _OBJECTIVES, OBJECTIVE_NAMES
from stages.tune.sweep import SCHEDULERS, SEARCHES

# (entry, what it means): one example per form, as in pipeline/configs/*.yaml
_FORMS = (
    ("k: {choice: [1, 2, 3, 4]}", "one of the values (sampled; every one with search grid)"),
    ("M: {grid: [5, 10, 20]}", "every value, always (a Tune grid_search)"),
    ("lam: {uniform: [0.3, 0.7]}", "a float, uniform in [low, high]"),
    ("temperature: {loguniform: [0.01, 1.0]}", "a float, log-uniform in [low, high], 0 < low"),
    ("fuse_all_until: {randint: [1, 3]}", "an integer in [low, high], both included"),
    ("train.lr: 0.003", "a plain value: the same in every trial"),
)
_SEARCH_HELP = {"random": "samples choices and ranges, enumerates grids (seed: tune.seed or seed)",
                "grid": "enumerates every choice and grid (no ranges)",
                "optuna": "Optuna's sampler (needs the optuna package; no grid)"}
_SCHEDULER_HELP = {"fifo": "every trial runs all tasks",
                   "asha": "stops poor trials from tune.grace_period tasks on, keeping the best\n"
                           "          1/tune.reduction_factor at each rung (time attribute: tasks learned)"}


def format_space(space: dict[str, Any]) -> str:
    """A space as one line of YAML flow style: ``{k: {choice: [1, 2]}, train.lr: 0.01}``."""
    return yaml.safe_dump(space, default_flow_style=True, sort_keys=False, width=1 << 20).strip()


def _method_space_lines(name: str) -> list[str]:
    from pipeline.methods.registry import UnknownMethod, default_sweep_space

    try:
        space = default_sweep_space(name)
    except UnknownMethod as exc:
        return [f"  ({exc})"]
    if not space:
        return [f"  none: {name} declares no default space; a sweep of it needs tune.space"]
    return [f"  {key}: {format_space(spec) if isinstance(spec, dict) else spec}" for key, spec in space.items()]


def tune_help_epilog(method_name: str | None = None) -> str:
    """The ``tune --help`` epilog; the default space shown is ``method_name``'s (default: the
    method of pipeline/configs/default.yaml)."""
    from pipeline.methods.registry import default_sweep_space, registered_methods

    where = "the method given"
    if method_name is None:
        from pipeline.config import load_config

        method_name, where = load_config(None).method.name, "the method of pipeline/configs/default.yaml"
    width = max(len(entry) for entry, _ in _FORMS) + 2
    lines = ["search space (tune.space), one entry per parameter:"]
    lines += [f"  {entry:<{width}}{meaning}" for entry, meaning in _FORMS]
    lines += [
        "  Keys without a dot are method options (k = method.options.k, checked against the method's",
        "  options); dotted keys are config paths from the root (train.lr, method.lr, train.epochs).",
        "  A non-empty tune.space, given in the config file (tune: {space: {...}}) or as an override",
        "  (\"tune.space={k: {grid: [1, 2]}, temperature: {loguniform: [0.01, 1.0]}}\"), replaces the",
        "  method's default space; an empty one means the default below. tune.overrides={...} sets",
        "  config values for every trial.",
        "",
        "objective (tune.objective, case-insensitive; default Avg):",
        "  " + ", ".join(f"{n} ({_OBJECTIVES[n.lower()][1]})" for n in OBJECTIVE_NAMES),
        "  After the first task Avg, M, B and BWT are undefined: Last stands in for Avg and M, 0 for B, BWT.",
        "",
        "search (tune.search):",
        *(f"  {s:<8}{_SEARCH_HELP.get(s, '')}" for s in SEARCHES),
        "scheduler (tune.scheduler):",
        *(f"  {s:<8}{_SCHEDULER_HELP.get(s, '')}" for s in SCHEDULERS),
        "",
        f"default space of {method_name} ({where}):",
        *_method_space_lines(method_name),
        "",
        "default spaces of the registered methods (--method NAME or method.name=NAME):",
    ]
    names = registered_methods()
    pad = max(len(n) for n in names) + 2 if names else 0
    for name in names:
        space = default_sweep_space(name)
        lines.append(f"  {name:<{pad}}{format_space(space) if space else 'none (needs tune.space)'}")
    lines += ["", "examples:",
              "  python pipeline/main.py tune --dry-run                       # the plan of the default sweep",
              "  python pipeline/main.py tune --method lora tune.num_samples=8",
              "  python pipeline/main.py tune --resume --output runs/tune-... # after a crash"]
    return "\n".join(lines)
