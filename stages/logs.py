"""What reaches the terminal. The pipeline's own lines (``print_line``) go to the terminal and to
``<run dir>/run.log``; the libraries' logs (Ray, Ray Data, Ray Train, MLflow, Python warnings) go to
``run.log`` only, unless the run is verbose (``--verbose``). Ray's worker processes keep their own
logs in Ray's session folder (``--verbose`` forwards them to the terminal)."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from pipeline.redaction import redact
from stages.artifacts import RUN_LOG

LIBRARY_LOGGERS = ("ray", "mlflow", "py.warnings", "alembic", "urllib3", "filelock", "fsspec", "s3fs", "botocore",
                   "deepspeed", "torch", "transformers")
QUIET_RAYLET = "PYTHON worker processes have been started"
_lock = threading.Lock()
_sinks: list["LogCapture"] = []


class RedactingFormatter(logging.Formatter):
    """Library log records as the run log keeps them, credentials masked (``pipeline.redaction``)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def emit(line: str) -> None:
    """A pipeline line: the terminal (one write per line) and every open run log, credentials
    masked."""
    line = redact(line)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    with _lock:
        for sink in _sinks:
            sink.write(line)


class LogCapture:
    def __init__(self, root: Path, verbose: bool) -> None:
        self.path = Path(root) / RUN_LOG
        self.fh = open(self.path, "a", buffering=1)
        self.handler = logging.StreamHandler(self.fh)
        self.handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.verbose = verbose
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        logging.captureWarnings(True)
        for name in LIBRARY_LOGGERS:
            self._redirect(logging.getLogger(name))
        with _lock:
            _sinks.append(self)

    def _redirect(self, logger: logging.Logger) -> None:
        self._saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        if not self.verbose:  # its own terminal handlers (Ray's, MLflow's) off; not to the root logger's
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = False
        logger.addHandler(self.handler)  # levels stay as the libraries set them

    def quiet_ray_notices(self) -> None:
        """The Ray driver prints what the raylet pushes to it on stdout, log_to_driver or not. Its
        "N PYTHON worker processes have been started" notice (a run keeps more actors than CPUs
        on a small machine: expected) goes to the run log; every other message still shows."""
        if self.verbose:
            return
        import ray._private.worker as ray_worker

        original = ray_worker.print_to_stdstream
        if getattr(original, "coin_quiet", False):
            return

        def filtered(data, ignore_prefix):
            lines = data.get("lines") or []
            if data.get("pid") == "raylet" and lines and all(QUIET_RAYLET in str(x) for x in lines):
                for x in lines:
                    for s in list(_sinks):
                        s.write(redact(f"(raylet) {x}"))
                return
            original(data, ignore_prefix)

        filtered.coin_quiet = True
        ray_worker.print_to_stdstream = filtered

    def quiet_more(self) -> None:
        """Again, after ``ray.init`` and Ray Data's first use (they add their own handlers)."""
        for name in list(logging.Logger.manager.loggerDict):
            if name.split(".")[0] in LIBRARY_LOGGERS and name not in LIBRARY_LOGGERS:
                logger = logging.getLogger(name)
                if logger.handlers and self.handler not in logger.handlers:
                    self._redirect(logger)

    def write(self, line: str) -> None:
        try:
            self.fh.write(line + "\n")
        except ValueError:  # closed
            pass

    def close(self) -> None:
        with _lock:
            if self in _sinks:
                _sinks.remove(self)
        for logger, handlers, propagate, level in reversed(self._saved):
            logger.removeHandler(self.handler)
            for h in handlers:
                if h not in logger.handlers:
                    logger.addHandler(h)
            logger.propagate, logger.level = propagate, level
        logging.captureWarnings(False)
        self.fh.close()


def capture_logs(root: Path, verbose: bool = False) -> LogCapture:
    return LogCapture(root, verbose)
