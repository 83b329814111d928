"""The run directory: one folder per pipeline run, one sub-folder per stage, completion markers.

Layout::

    DIR/run.json                 experiment name, config fingerprint, created-at, git commit
    DIR/config.yaml              the fully resolved config
    DIR/stages/<stage-id>/       everything a stage writes
    DIR/stages/<stage-id>/DONE.json   completion marker: sha256 of every output file, wall time,
                                      stage results; written last, atomically
    DIR/results.json             the run's summary (written at the end)
    DIR/invocations.jsonl        one line per command that used the directory: start, wall time, outcome

A stage counts as complete only when its marker exists AND every file listed in it still has
the recorded sha256. Re-running the same command on the same directory skips complete stages
and redoes the others (their partial outputs are moved aside to ``<stage-id>.incomplete-N``, never
silently deleted). A directory that holds a run of a different config is refused once any of its
stages has a completion marker: stages never overwrite another run's outputs. One in which no
stage finished (e.g. a run that stopped on a config or data error) is taken over: everything in
it is moved to ``DIR/replaced-N/`` (kept, not deleted, the MLflow store included) and the new
run starts there. ``DIR/run.lock`` is held (flock) by the process using the directory; a
directory in use is never taken over, nor resumed by a second process.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from stages.artifacts import DONE_FILE


class RunDirError(RuntimeError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunDir:
    """A pipeline run's directory. ``open`` creates it or checks it belongs to this config."""

    LOCK = "run.lock"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self._lock_file = None  # the open run.lock, flock-ed; released when this object goes

    @classmethod
    def open(cls, root: Path, *, name: str, fingerprint: str, config: dict[str, Any], repo: Path,
             log: Callable[[str], None] = print, lock_wait_s: float = 10.0,
             extends: Callable[[list[str]], str] | None = None) -> "RunDir":
        """``lock_wait_s``: how long to wait for ``run.lock`` of a run of the same config (a
        driver or sweep trial that was just stopped may take a moment to exit).

        ``extends(tasks)``: this config's fingerprint cut to ``tasks`` (``ExperimentConfig.
        extension_view``). A directory holding a run of this same config with fewer tasks (its
        task list a prefix of this one's) is extended: its finished stages are kept, the stages
        of the new tasks run (and the data check again, over every task)."""
        rd = cls(root)
        meta_path = rd.root / "run.json"
        if meta_path.exists():
            locked = rd._lock()
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") != fingerprint and extends is not None and rd._extend(
                    meta, fingerprint, config, extends, locked, log):
                meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                deadline = time.time() + lock_wait_s
                while not locked and time.time() < deadline:
                    time.sleep(0.2)
                    locked = rd._lock()
                if not locked:  # two drivers would run the same stages into the same folders
                    raise RunDirError(
                        f"{rd.root}: this run is in progress in another process (it holds {rd.root / cls.LOCK}); "
                        "wait for it to end, or stop it, before resuming"
                    )
                return rd
            differs = f"(fingerprint {meta.get('fingerprint')} != {fingerprint})"
            finished = rd.finished_stages()
            if finished:
                raise RunDirError(
                    f"{rd.root} holds a run of a different configuration {differs} with finished stages "
                    f"({', '.join(finished[:3])}{', ...' if len(finished) > 3 else ''}); "
                    "choose another --output directory (stages never overwrite another run's outputs)"
                )
            if not locked:
                raise RunDirError(
                    f"{rd.root} holds a run of a different configuration {differs} that another process "
                    f"is using (it holds {rd.root / cls.LOCK}); choose another --output directory"
                )
            aside = rd._set_aside()
            log(f"run directory {rd.root}: taking over from a run of a different configuration {differs} "
                f"in which no stage finished; its files are kept in {aside}")
        elif rd.root.exists() and any(p.name != cls.LOCK for p in rd.root.iterdir()):
            raise RunDirError(f"{rd.root} exists, is not empty and is not a pipeline run directory")
        rd.root.mkdir(parents=True, exist_ok=True)
        rd._lock()
        (rd.root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        write_json_atomic(
            meta_path,
            {"name": name, "fingerprint": fingerprint, "created": time.time(), "git_commit": git_commit(repo)},
        )
        return rd

    def _extend(self, meta: dict[str, Any], fingerprint: str, config: dict[str, Any],
                extends: Callable[[list[str]], str], locked: bool, log: Callable[[str], None]) -> bool:
        """Make this directory's run (fewer tasks, same config otherwise) the run of ``config``."""
        old_cfg_file = self.root / "config.yaml"
        if not old_cfg_file.exists():
            return False
        old_tasks = list((yaml.safe_load(old_cfg_file.read_text()) or {}).get("tasks") or [])
        new_tasks = list(config.get("tasks") or [])
        if not old_tasks or len(new_tasks) <= len(old_tasks) or new_tasks[: len(old_tasks)] != old_tasks:
            return False
        if extends(old_tasks) != meta.get("fingerprint"):
            return False
        if not locked:
            raise RunDirError(f"{self.root}: this run is in progress in another process (it holds "
                              f"{self.root / self.LOCK}); wait for it to end before extending it")
        n = len(meta.get("extensions", [])) + 1
        data = self.stage_dir("00-data")
        if data.exists():  # the data check runs again, over every task
            data.rename(data.with_name(f"00-data.before-extension-{n}"))
        old_cfg_file.rename(self.root / f"config.before-extension-{n}.yaml")
        old_cfg_file.write_text(yaml.safe_dump(config, sort_keys=False))
        meta = {**meta, "fingerprint": fingerprint, "extensions": [
            *meta.get("extensions", []),
            {"from_fingerprint": meta.get("fingerprint"), "from_tasks": old_tasks, "to_tasks": new_tasks,
             "at": time.time()}]}
        write_json_atomic(self.root / "run.json", meta)
        log(f"run directory {self.root}: extending a finished run of {len(old_tasks)} task(s) with "
            f"{', '.join(new_tasks[len(old_tasks):])}; its finished stages are kept")
        return True

    def finished_stages(self) -> list[str]:
        """Stages with a completion marker (verified or not: a damaged one still counts)."""
        stages = self.root / "stages"
        return sorted({p.relative_to(stages).parts[0] for p in stages.rglob(DONE_FILE)}) if stages.is_dir() else []

    def _lock(self) -> bool:
        """Hold ``DIR/run.lock`` for as long as this object lives; False if another process (or
        another RunDir object) holds it. A filesystem without flock support counts as not held."""
        if self._lock_file is not None:
            return True
        fh = open(self.root / self.LOCK, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return False
        except OSError:  # e.g. ENOLCK on a shared filesystem without locks: nothing to go by
            fh.close()
            return True
        self._lock_file = fh
        return True

    def _set_aside(self) -> Path:
        """Move everything of the replaced run (but the lock and earlier replaced runs) to replaced-N/."""
        n = 1
        while (self.root / f"replaced-{n}").exists():
            n += 1
        aside = self.root / f"replaced-{n}"
        entries = [p for p in self.root.iterdir() if p.name != self.LOCK and not p.name.startswith("replaced-")]
        aside.mkdir()
        for p in entries:
            p.rename(aside / p.name)
        return aside

    # --- invocations ----------------------------------------------------------------------------
    INVOCATIONS = "invocations.jsonl"

    def invocations(self) -> list[dict[str, Any]]:
        """One record per earlier command that used this directory (first run and each resume)."""
        path = self.root / self.INVOCATIONS
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:  # a line cut short (a driver killed mid-write, a full disk) is left out
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("wall_s"), (int, float)):
                out.append(rec)
        return out

    def record_invocation(self, *, started: float, wall_s: float, outcome: str) -> None:
        """Append this command's wall time and how it ended (``finished``, ``failed``, ``stopped``).
        A driver killed with SIGKILL writes nothing, so its time is not counted."""
        path = self.root / self.INVOCATIONS
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        line = json.dumps({"started": started, "wall_s": round(wall_s, 2), "outcome": outcome}) + "\n"
        with open(path, "a") as fh:
            fh.write(("\n" if torn else "") + line)  # a torn last line (killed mid-write) stays alone
            fh.flush()
            os.fsync(fh.fileno())

    # --- stages -------------------------------------------------------------------------------
    def stage_dir(self, stage_id: str) -> Path:
        return self.root / "stages" / stage_id

    def marker(self, stage_id: str) -> Path:
        return self.stage_dir(stage_id) / DONE_FILE

    def completed(self, stage_id: str) -> dict[str, Any] | None:
        """The stage's marker if the stage is complete and its outputs verify, else None.

        A marker whose files no longer match their checksums raises: that is damage to a
        finished stage, not an unfinished stage, and must not be papered over.
        """
        path = self.marker(stage_id)
        if not path.exists():
            return None
        marker = json.loads(path.read_text())
        for rel, digest in marker.get("files", {}).items():
            f = self.stage_dir(stage_id) / rel
            if not f.exists() or sha256_file(f) != digest:
                raise RunDirError(
                    f"stage {stage_id}: output {f} is missing or does not match the sha256 recorded "
                    f"in {path}; the finished stage was modified. Restore it or remove {path} to redo the stage."
                )
        return marker

    def begin(self, stage_id: str) -> Path:
        """Prepare a clean directory for a stage that is not complete (partial outputs kept aside)."""
        d = self.stage_dir(stage_id)
        if d.exists() and any(d.iterdir()):
            n = 1
            while d.with_name(f"{d.name}.incomplete-{n}").exists():
                n += 1
            d.rename(d.with_name(f"{d.name}.incomplete-{n}"))
        d.mkdir(parents=True, exist_ok=True)
        return d

    def complete(self, stage_id: str, *, wall_s: float, result: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the completion marker listing every file of the stage with its sha256."""
        d = self.stage_dir(stage_id)
        files = {
            str(p.relative_to(d)): sha256_file(p)
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != DONE_FILE
        }
        marker = {"stage": stage_id, "files": files, "wall_s": wall_s, "result": result or {}, "finished": time.time()}
        write_json_atomic(self.marker(stage_id), marker)
        return marker

    def clear_incomplete_storage(self, path: Path) -> None:
        """Remove a stage's own scratch storage (e.g. Ray Train's run folder) before a redo."""
        if path.exists():
            shutil.rmtree(path)
