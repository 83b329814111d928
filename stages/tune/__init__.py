"""Ray Tune sweep over continual-method options: ``python pipeline/main.py tune --config FILE``.

Each trial runs the whole stage DAG with the trial's values applied to the experiment config, in
its own run directory ``DIR/trials/<trial id>/``, and reports to Tune after every evaluate(t)
stage (``tasks_learned = t``), so ASHA can stop bad trials after a few tasks.

The modules:

- ``space``      the search space (``tune.space``): syntax, parsing, checks; an empty space is
                 the method's own default (its class's ``sweep_space``)
- ``objective``  the objective (``tune.objective``), its mode, what a trial reports
- ``sweep``      ``Sweep``: the fixed settings of a sweep, their checks, the dry-run report
- ``trial``      the trial function and the actor that runs the trial's pipeline
- ``driver``     ``run_tune``: the Tuner, search and scheduler, the directory, resume, leaks
- ``report``     the results table, the plot, the best trial and its config, MLflow artifacts
- ``cli``        the ``tune --help`` epilog
"""

from stages.tune.cli import tune_help_epilog
from stages.tune.driver import check_leaks, default_sweep_dir, make_scheduler, make_search, run_tune, sweep_state
from stages.tune.objective import OBJECTIVE_KEY, TIME_ATTR, Objective, report_metrics, resolve_objective
from stages.tune.report import (
    best_config_yaml,
    best_row,
    collect_rows,
    finish_sweep,
    format_table,
    plot_objective,
    write_table,
)
from stages.tune.space import (
    SPACE_FORMS,
    Param,
    apply_values,
    default_space,
    grid_size,
    parse_param,
    parse_space,
    set_path,
    trial_count,
    validate_space,
)
from stages.tune.sweep import Sweep, asha_rungs, describe, trial_bundle
from stages.tune.trial import PipelineHost, run_trial, train_losses, trial_dir

__all__ = [
    "OBJECTIVE_KEY", "Objective", "Param", "PipelineHost", "SPACE_FORMS", "Sweep", "TIME_ATTR", "apply_values",
    "asha_rungs", "best_config_yaml", "best_row", "check_leaks", "collect_rows", "default_space",
    "default_sweep_dir", "describe", "finish_sweep", "format_table", "grid_size", "make_scheduler", "make_search",
    "parse_param", "parse_space", "plot_objective", "report_metrics", "resolve_objective", "run_trial", "run_tune",
    "set_path", "sweep_state", "train_losses", "trial_bundle", "trial_count", "trial_dir", "tune_help_epilog",
    "validate_space", "write_table",
]
