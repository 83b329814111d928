"""Entry point: ``python pipeline/main.py [run] [--config FILE] [--method NAME] [--output DIR]
[--dry-run] [key=value ...]`` and the subcommands ``metrics``, ``score``, ``check-data``, ``tune``.

With no arguments it runs the embedded default end to end (ModalPrompt on the generated
CoIN-synth benchmark with the tiny LLaVA model, local Ray started in-process, local MLflow store
in the run directory). The same command works under
``ray job submit --working-dir . -- python pipeline/main.py ...`` against a running cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# ``python pipeline/main.py`` puts pipeline/ on sys.path; the packages live one level up.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from pipeline.process_env import setup_process_env  # noqa: E402

SUBCOMMANDS = ("run", "metrics", "score", "check-data", "tune", "pretrain")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: pipeline/configs/default.yaml)")
    p.add_argument("--method", help="shortcut for method.name=NAME")
    p.add_argument("--output", help="run directory (default: runs/<name>-<config hash>)")
    p.add_argument("--dry-run", action="store_true", help="print the stage DAG and parameter counts; run nothing")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own logs on the terminal (they are always in <run dir>/run.log)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-3 method.options.k=2")


def build_parser(tune_help: bool = False) -> argparse.ArgumentParser:
    """``tune_help``: build the tune command's help text, which loads the method registry (only for
    ``tune --help``: every other command starts without importing the methods)."""
    from pipeline.data.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="python pipeline/main.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run an experiment's stage DAG (the default command)")
    _add_run_args(run)
    run.add_argument("--seeds", help="run the experiment once per seed, e.g. 0,1,2, and report each metric's mean "
                                     "and spread (one MLflow parent run, the seed runs nested under it)")
    run.set_defaults(func=cmd_run)
    tune = sub.add_parser("tune", help="Ray Tune sweep over a method's options (its own default space, or tune.space)",
                          epilog=_tune_epilog() if tune_help else None, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(tune)
    tune.add_argument("--resume", action="store_true", help="resume an interrupted sweep in --output")
    tune.set_defaults(func=cmd_tune)
    pre = sub.add_parser("pretrain", help="rebuild the shipped base (pipeline/assets/coin-synth-base) by the "
                                          "project's recipe: CoIN-synth corpus, LLaVA model, guide CLIP, BASE.json")
    pre.add_argument("--config", help="experiment YAML the recipe is merged over (default: the default config)")
    pre.add_argument("--recipe", help="recipe YAML (default: pipeline/configs/base_recipe.yaml)")
    pre.add_argument("--output", help="base folder to write (default: pipeline/assets/coin-synth-base)")
    pre.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation recorded in BASE.json")
    pre.add_argument("overrides", nargs="*", help="dotted overrides on top of the recipe, e.g. model.pretrain.lmm_steps=100")
    pre.set_defaults(func=cmd_pretrain)
    add_subcommands(sub)
    return parser


def _tune_epilog() -> str:
    try:
        from stages.tune.cli import tune_help_epilog
    except ImportError:  # the tune package being absent must not break the other commands' --help
        return ""
    return tune_help_epilog()


def load_experiment(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, list(args.overrides or []), method=args.method)


def cmd_run(args: argparse.Namespace) -> int:
    from stages.runner import PipelineRun, format_results

    cfg = load_experiment(args)
    if args.seeds:
        return _run_seeds(cfg, args)
    run = PipelineRun(cfg, Path(args.output) if args.output else None, verbose=args.verbose)
    if args.dry_run:
        from stages.dryrun import dry_run_report

        print(dry_run_report(cfg, run))
        return 0
    results = run.run()
    print()
    print(format_results(results))
    return 0


def _run_seeds(cfg, args: argparse.Namespace) -> int:
    from stages.seeds import default_seeds_dir, format_summary, parse_seeds, run_seeds, seed_config

    seeds = parse_seeds(args.seeds)
    if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides or []):
        from pipeline.config import ConfigError

        raise ConfigError("seed=...: give the seeds with --seeds alone")
    if args.dry_run:
        from stages.dryrun import dry_run_report
        from stages.runner import PipelineRun

        directory = Path(args.output) if args.output else default_seeds_dir(cfg, seeds)
        first = seed_config(cfg, seeds[0], None)
        print(f"seeds {', '.join(map(str, seeds))}: one run each in {directory}/seed-<s>/; the first:")
        print(dry_run_report(first, PipelineRun(first, directory / f"seed-{seeds[0]}")))
        return 0
    summary = run_seeds(cfg, seeds, Path(args.output) if args.output else None, verbose=args.verbose)
    print()
    print(format_summary(summary))
    print(f"summary: {Path(summary['run_dirs'][str(seeds[0])]).parent}/seeds_summary.json")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from stages.tune import run_tune

    cfg = load_experiment(args)
    return run_tune(cfg, Path(args.output) if args.output else None, resume=args.resume, dry_run=args.dry_run)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import ConfigError, load_config, merge, parse_overrides
    from pipeline.models.shipped import RECIPE_CONFIG, SHIPPED_BASE
    from stages.pretrain import build_shipped_base

    recipe_file = Path(args.recipe) if args.recipe else RECIPE_CONFIG
    if not recipe_file.exists():
        raise ConfigError(f"recipe file {recipe_file} does not exist")
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{recipe_file}: top level must be a mapping")
    cfg = load_config(args.config, merge(recipe, parse_overrides(list(args.overrides or []))))
    out = Path(args.output) if args.output else SHIPPED_BASE
    # the terminal shows the recipe's own progress: no save progress bars, no accelerator notice
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    if not _has_cuda():  # instead of DeepSpeed's "Setting accelerator to CPU" warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    words = ["pretrain", *(f"--{k} {v}" for k, v in (("config", args.config), ("recipe", args.recipe),
                                                     ("output", args.output)) if v), *(args.overrides or [])]
    command = "python pipeline/main.py " + " ".join(words + (["--no-zero-shot"] if args.no_zero_shot else []))
    meta = build_shipped_base(cfg, out, command=command, zero_shot=not args.no_zero_shot)
    print(f"base written to {out} ({meta['size_mb']} MB, {meta['wall_s']:.0f} s)")
    if "zero_shot" in meta:
        print("zero-shot: " + "  ".join(f"{t} {v:.1f}" for t, v in meta["zero_shot"]["scores"].items())
              + f"  Last {meta['zero_shot']['last']:.2f}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """argparse stops collecting positionals at the first option, so ``... train.lr=1e-3 --method
    lora epochs=2`` would reject ``epochs=2``: key=value words anywhere on a run or tune command
    line are overrides, in the order given."""
    parser = build_parser(tune_help=bool(argv) and argv[0] == "tune" and ("-h" in argv or "--help" in argv))
    args, extra = parser.parse_known_args(argv)
    extra = [e for e in extra if e != "--"]
    if extra:
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    # nothing downloads weights; DeepSpeed's CPU op: one build folder and one ninja per virtualenv
    # (``make setup`` prebuilds it into the same place)
    setup_process_env()
    args = parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume (completed stages are kept)", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line (PIPELINE_DEBUG=1 for the traceback)
        if _is_user_error(exc) and not os.environ.get("PIPELINE_DEBUG"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: Exception) -> bool:
    from pipeline.config import ConfigError
    from pipeline.data.coin import DataError
    from pipeline.data.storage import StorageError
    from stages.rundir import RunDirError

    return isinstance(exc, (ConfigError, DataError, RunDirError, FileNotFoundError, StorageError))


if __name__ == "__main__":
    sys.exit(main())
