"""The stage kinds: kind -> module. A module has ``run(ctx, stage, stage_dir, run_id) -> result``
(the stage's work; ``result`` goes into its DONE.json marker) and may have ``done(ctx, stage,
marker, skipped)`` (called in stage order once the stage is complete, also when an earlier
invocation completed it). Adding a stage kind = one module and one line here."""

from stages import base, data, evaluate, freeze, train

STAGE_KINDS = {
    "data": data,
    "base": base,
    "train": train,
    "freeze": freeze,
    "evaluate": evaluate,
}
