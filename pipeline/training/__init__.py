"""Training one task: the loop every trainer runs (the Ray Train worker, the contract tests)."""

from pipeline.training.loop import FitJob, FitResult, TorchEngine, fit, run_steps

__all__ = ["FitJob", "FitResult", "TorchEngine", "fit", "run_steps"]
