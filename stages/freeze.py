"""freeze(t): store the method state after task t with a per-tensor sha256 manifest and check the
freeze invariant: every earlier task's frozen tensors are bit-identical to their manifests.

Works on tensors only (no model is built), so it is cheap even for LLaVA-1.5-7B runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from stages.common import load_state, save_state
from stages.rundir import sha256_file

from stages.artifacts import MANIFEST_FILE, META_FILE, STATE_FILE


class FreezeInvariantError(RuntimeError):
    pass


def tensor_sha256(t: torch.Tensor) -> str:
    """Hash of a tensor's exact bits plus its dtype and shape."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_freeze_stage(
    stage_dir: Path,
    *,
    trained_state: Path,
    train_meta: dict[str, Any],
    task_index: int,
    task_name: str,
    earlier_manifests: dict[int, Path],
) -> dict[str, Any]:
    """Write ``method_state.safetensors`` and ``manifest.json``; raise FreezeInvariantError if a
    tensor of an earlier task differs from its frozen manifest."""
    tensors = load_state(trained_state)
    hashes = {name: tensor_sha256(t) for name, t in sorted(tensors.items())}
    task_keys: dict[str, list[str]] = train_meta.get("task_keys", {})
    own = task_keys.get(str(task_index), [])
    missing = [k for k in own if k not in hashes]
    if missing:
        raise FreezeInvariantError(f"freeze({task_name}): task tensors {missing} are not in the method state")

    violations = []
    checked = 0
    for earlier, manifest_path in sorted(earlier_manifests.items()):
        manifest = json.loads(Path(manifest_path).read_text())
        for key in manifest["task_keys"].get(str(earlier), []):
            checked += 1
            frozen = manifest["tensors"][key]
            now = hashes.get(key)
            if now != frozen:
                violations.append(f"task {earlier} tensor {key!r}: {frozen[:12]} -> {(now or 'missing')[:12]}")
    if violations:
        raise FreezeInvariantError(
            f"freeze({task_name}): {len(violations)} frozen tensor(s) of earlier tasks changed:\n  "
            + "\n  ".join(violations[:20])
        )

    out_state = stage_dir / STATE_FILE
    save_state(tensors, out_state, metadata={"task_index": str(task_index), "task": task_name})
    manifest = {
        "task_index": task_index,
        "task": task_name,
        "state_file": STATE_FILE,
        "state_sha256": sha256_file(out_state),
        "tensors": hashes,
        "task_keys": {str(task_index): own, **{k: v for k, v in task_keys.items() if k != str(task_index)}},
        "num_tensors": len(hashes),
        "num_params": int(sum(t.numel() for t in tensors.values())),
    }
    (stage_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return {"tensors": len(hashes), "params": manifest["num_params"], "frozen_checked": checked}


def run(ctx, stage, stage_dir: Path, run_id: str) -> dict[str, Any]:
    train_dir = ctx.rundir.stage_dir(next(s for s in ctx.stages if s.kind == "train"
                                          and s.task_index == stage.task_index).id)
    earlier = {s.task_index: ctx.rundir.stage_dir(s.id) / MANIFEST_FILE
               for s in ctx.stages if s.kind == "freeze" and s.task_index < stage.task_index}
    result = run_freeze_stage(
        stage_dir, trained_state=train_dir / STATE_FILE,
        train_meta=json.loads((train_dir / META_FILE).read_text()),
        task_index=stage.task_index, task_name=stage.task_name, earlier_manifests=earlier,
    )
    ctx.tracker.log_artifact(run_id, stage_dir / STATE_FILE, "state")
    ctx.tracker.log_artifact(run_id, stage_dir / MANIFEST_FILE, "state")
    ctx.log_numbers(run_id, result)
    return result
