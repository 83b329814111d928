"""The names of what stages write, defined once (a stage's files live in ``stages/<id>/``)."""

STATE_FILE = "method_state.safetensors"  # train (final state) and freeze (the frozen state)
META_FILE = "train_meta.json"  # train: the final checkpoint's metadata
PROGRESS_FILE = "progress.jsonl"  # train: one row per logged step
SKIPPED_FILE = "skipped_records.json"  # train: records skipped under data.on_bad: skip
REPLAY_STORE_FILE = "replay_store.json"  # train: ids of the stored samples a replaying method got, per task
RAY_TRAIN_DIR = "ray_train"  # train: Ray Train's storage (checkpoints of a fit)
MANIFEST_FILE = "manifest.json"  # freeze: sha256 per tensor, per task
DATA_REPORT = "data_report.json"  # data: counts and every bad record
BASE_FILE = "base.json"  # base: where the base models are
PREDICTIONS_DIR = "predictions"  # evaluate: predictions/<task>.jsonl (LLaVA answer-file records)
SCORES_FILE = "scores.json"  # evaluate: score per task

# the run directory's own results
RESULTS_FILE = "results.json"
MATRIX_JSON = "accuracy_matrix.json"
MATRIX_CSV = "accuracy_matrix.csv"
MATRIX_PNG = "accuracy_matrix.png"
RUN_LOG = "run.log"
DONE_FILE = "DONE.json"  # a stage's completion marker (sha256 of every output)
ERROR_FILE = "ERROR.txt"  # a failed stage's traceback  # everything the run printed, and Ray's driver-side logs
