"""Pre-training of the tiny embedded default, once, into a verified cache.

The continual methods need a base model that already sees and talks (the role LLaVA-1.5's
pre-training plays for the real benchmark). ``ensure_base`` builds the word-level tokenizer from the
benchmark texts, trains the whole tiny LLaVA (vision tower, projector, LLM, from random init) with
the language-modelling loss on the pre-training corpus, and the tiny guidance CLIP with open_clip's
contrastive ``ClipLoss`` on (image, text) pairs of the same corpus.

Cache: ``cache_dir/tiny-base-<key>/`` where ``key`` hashes the model config and the data seed.
Everything is written to a temporary folder and renamed into place (a killed run never leaves a
half cache); ``MANIFEST.json`` lists the sha256 of every file and is checked on every reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.models.config import ModelConfig, PretrainSpec
from pipeline.models.lmm import TEMPLATES, LMM, rows_to_batch

# Bump when the training recipe changes so that old caches are not reused.
PRETRAIN_VERSION = 3  # 2: random LM batches (pool=1); 3: logits at label positions only (other float rounding)
MANIFEST = "MANIFEST.json"
INFO = "info.json"
LMM_DIR = "lmm"
GUIDE_FILE = "guide.safetensors"

FIRST_LOSSES = 5

LogFn = Callable[[dict[str, Any]], None]


@dataclass
class BaseArtifacts:
    """Where a pre-trained base lives: ``lmm_dir`` (model + tokenizer, for ``build_lmm(weights=)``),
    ``guide_file`` (open_clip state dict, for ``build_guide(weights=)``) and the run ``info``."""

    lmm_dir: str
    guide_file: str
    info: dict[str, Any]


def base_key(cfg: ModelConfig, data_seed: int | str) -> str:
    """Hash of everything that changes the pre-trained weights (not logging). The thread count is
    part of it: it changes the order of floating-point reductions, and bases trained with 1 and 2
    threads gave visibly different continual results (README, "Known limitations")."""
    spec = dataclasses.asdict(cfg.pretrain)
    spec.pop("log_every")
    if not spec["stop_after"]:  # only when set: the keys of existing bases stay as they were
        spec.pop("stop_after")
    doc = {
        "version": PRETRAIN_VERSION,
        "image_size": cfg.image_size,
        "template": cfg.template,
        "max_length": cfg.max_length,
        "guide_arch": cfg.guide_arch,
        "tiny": dataclasses.asdict(cfg.tiny),
        "pretrain": spec,
        "data_seed": data_seed,
    }
    if cfg.quick_gelu:  # only when set, so the keys of existing (GELU) bases stay as they were
        doc["guide_quick_gelu"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def ensure_base(cfg: ModelConfig, *, corpus_rows: Callable[[], Iterable[dict]], texts: Callable[[], Iterable[str]],
                cache_dir: str | Path, data_seed: int | str, log: LogFn | None = None) -> BaseArtifacts:
    """Return the pre-trained tiny base for ``cfg``, training it only if no valid cache exists.

    corpus_rows: schema rows with decoded ``image`` (the pre-training corpus; LLaVA-format turns).
    texts: every text of the benchmark (tokenizer vocabulary). ``data_seed`` must identify the
    corpus (seed or a tag of the generator spec): it is part of the cache key.
    A cache whose files do not match their recorded sha256 is reported through ``log``
    (``event: base_cache_invalid``), removed and rebuilt.
    """
    if cfg.kind != "tiny":
        raise ValueError(f"kind: ensure_base pre-trains the tiny default only, not {cfg.kind!r}")
    cfg.validate()
    emit = log or (lambda record: None)
    cache_dir = Path(cache_dir)
    key = base_key(cfg, data_seed)
    final = cache_dir / f"tiny-base-{key}"
    if final.exists():
        problem = verify_base(final)
        if problem is None:
            emit({"event": "base_cache_hit", "path": str(final)})
            return _artifacts(final, reused=True)
        emit({"event": "base_cache_invalid", "path": str(final), "problem": problem})
        shutil.rmtree(final)
    tmp = cache_dir / f".tmp-tiny-base-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        pretrain_into(cfg, corpus_rows, texts, tmp, key=key, data_seed=data_seed, log=emit)
        _write_manifest(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same key first: keep theirs if valid
            if verify_base(final) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _artifacts(final, reused=False)


def load_base(artifacts: BaseArtifacts | dict[str, str] | Sequence[str], cfg: ModelConfig) -> tuple[LMM, Any]:
    """(LMM, Guide) from ``ensure_base`` output, a {lmm_dir, guide_file} dict or a pair of paths."""
    from pipeline.models.build import build_guide, build_lmm

    if isinstance(artifacts, BaseArtifacts):
        lmm_dir, guide_file = artifacts.lmm_dir, artifacts.guide_file
    elif isinstance(artifacts, dict):
        lmm_dir, guide_file = artifacts["lmm_dir"], artifacts["guide_file"]
    else:
        lmm_dir, guide_file = artifacts
    return build_lmm(cfg, weights=str(lmm_dir)), build_guide(cfg, weights=str(guide_file))


def verify_base(folder: str | Path) -> str | None:
    """None if every file listed in the manifest has its recorded sha256 (and nothing is missing
    or extra); otherwise a short description of the first problem."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {type(e).__name__}"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(listed):
        return f"files differ from the manifest: missing {sorted(set(listed) - present)[:3]}, extra {sorted(present - set(listed))[:3]}"
    for rel, digest in sorted(listed.items()):
        if _sha256(folder / rel) != digest:
            return f"sha256 mismatch: {rel}"
    return None


# ---- training --------------------------------------------------------------------------------


def pretrain_into(cfg: ModelConfig, corpus_rows: Callable[[], Iterable[dict]], texts: Callable[[], Iterable[str]],
                  out: Path, *, key: str, data_seed: int | str, log: LogFn) -> dict[str, Any]:
    """The recipe: tokenizer from ``texts``, the LLaVA model (``out/lmm``, model + tokenizer) and
    the guide (``out/guide.safetensors``) pre-trained on ``corpus_rows``; ``out/info.json`` and
    the returned dict record the losses and times."""
    from safetensors.torch import save_file

    emit = log

    from pipeline.models.build import build_lmm
    from pipeline.models.guide import build_clip
    from pipeline.models.tokenizer import build_tokenizer

    spec = cfg.pretrain
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.num_threads)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        tokenizer = build_tokenizer(itertools.chain(_template_texts(cfg), texts()), vocab_max=cfg.tiny.vocab_max)
        rows = list(corpus_rows())
        if not rows:
            raise ValueError("the pre-training corpus is empty")
        torch.manual_seed(spec.seed)
        lmm = build_lmm(cfg, tokenizer=tokenizer)
        lmm_info = train_lmm(lmm, rows, spec, emit)
        lmm.model.save_pretrained(str(out / LMM_DIR))
        tokenizer.save_pretrained(str(out / LMM_DIR))
        torch.manual_seed(spec.seed + 1)
        clip = build_clip(cfg)
        guide_info = train_guide(clip, lmm.guide_inputs, rows, spec, emit)
        save_file({k: v.detach().contiguous().clone() for k, v in clip.state_dict().items()}, str(out / GUIDE_FILE))
        info = {
            "key": key,
            "data_seed": data_seed,
            "version": PRETRAIN_VERSION,
            "corpus_rows": len(rows),
            "vocab_size": len(tokenizer),
            "torch_threads": spec.num_threads,
            "lmm": lmm_info,
            "guide": guide_info,
            "wall_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
        }
        (out / INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        return info
    finally:
        torch.set_num_threads(threads)


def train_lmm(lmm: LMM, rows: Sequence[dict], spec: PretrainSpec, emit: LogFn) -> dict[str, Any]:
    """Train every parameter of ``lmm.model`` with the LM loss; leaves it frozen again."""
    # Tokenise and normalise the corpus once; steps only pad (CPU time goes to the model).
    # Batches are drawn at random (pool=1: no length bucketing). Length buckets are nearly
    # single-task batches on the CoIN-synth corpus, and with them the base learned the skills far
    # more slowly (same 1000 steps: ImageNet 6% vs 29%, mean over tasks 18% vs 22%, measured).
    seqs, labels = lmm.encode(rows_to_batch(list(rows)), train=True)
    pixels = lmm.pixels([r["image"] for r in rows])  # (N, 3, S, S)
    model = lmm.model
    model.train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(idx: np.ndarray) -> torch.Tensor:
        batch = lmm.pad([seqs[i] for i in idx], [labels[i] for i in idx], left=False)
        embeds = lmm.embed(batch["input_ids"], pixels[torch.from_numpy(idx)])
        return lmm.lm_loss(embeds, batch["attention_mask"], batch["labels"])

    losses = _loop("lmm", spec.lmm_steps, spec, params, spec.lr, emit, step,
                   _batches([len(x) for x in seqs], spec.batch_size, spec.lmm_steps, spec.seed, pool=1))
    model.eval().requires_grad_(False)
    return {"steps": spec.lmm_steps, "params": sum(p.numel() for p in params), **losses,
            "corpus_exact_match": _exact_match(lmm, rows[:64])}


def train_guide(clip: torch.nn.Module, inputs: Any, rows: Sequence[dict], spec: PretrainSpec, emit: LogFn
                ) -> dict[str, Any]:
    """Contrastive (CLIP) training of the whole guide on (image, text) pairs of the corpus."""
    from open_clip.loss import ClipLoss

    pixels = inputs.pixels([r["image"] for r in rows])  # (N, 3, Sg, Sg), prepared once
    tokens = inputs.tokenize([_guide_text(r, spec.guide_text) for r in rows])  # (N, Lc)
    clip.train().requires_grad_(True)
    params = [p for p in clip.parameters() if p.requires_grad]
    loss_fn = ClipLoss()

    def step(idx: np.ndarray) -> torch.Tensor:
        i = torch.from_numpy(idx)
        image = clip.encode_image(pixels[i], normalize=True)
        text = clip.encode_text(tokens[i], normalize=True)
        return loss_fn(image, text, clip.logit_scale.exp())

    def clamp() -> None:  # as in open_clip training: temperature at most 100
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))

    batches = _batches([1] * len(rows), spec.batch_size, spec.guide_steps, spec.seed)
    losses = _loop("guide", spec.guide_steps, spec, params, spec.guide_lr, emit, step, batches, after_step=clamp)
    clip.eval().requires_grad_(False)
    return {"steps": spec.guide_steps, "params": sum(p.numel() for p in params), **losses,
            "retrieval_top1": _retrieval_top1(clip, pixels[:64], tokens[:64])}


def _loop(phase: str, steps: int, spec: PretrainSpec, params: list, lr: float, emit: LogFn,
          loss_of: Callable[[np.ndarray], torch.Tensor], batches: Iterator[np.ndarray],
          after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay (to 10%), gradient clipping at 1.0."""
    # fused: one kernel per step instead of several passes over the (49408 x d) CLIP token table.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98), fused=True)
    warm = max(1, min(spec.warmup_steps, steps // 5))

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses: list[float] = []
    start = last = time.perf_counter()
    cpu = time.process_time()
    for step, idx in enumerate(batches, 1):
        if spec.stop_after and step > spec.stop_after:
            break
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        if step % spec.log_every == 0 or step == steps or step == spec.stop_after:
            now = time.perf_counter()
            done = spec.log_every if step % spec.log_every == 0 else step % spec.log_every
            emit({"phase": phase, "step": step, "steps": steps, "loss": round(losses[-1], 4),
                  "lr": sched.get_last_lr()[0], "samples_per_s": round(done * spec.batch_size / (now - last), 1)})
            last = now
    tail = losses[-20:]
    return {
        "first_loss": round(losses[0], 4) if losses else None,
        "first_losses": [round(x, 6) for x in losses[:FIRST_LOSSES]],  # replayed by the staleness check
        "steps_run": len(losses),
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,  # mean of the last 20 steps
        "train_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(time.process_time() - cpu, 2),  # process CPU time (all threads)
    }


def _batches(lengths: Sequence[int], batch_size: int, steps: int, seed: int, pool: int = 16
             ) -> Iterator[np.ndarray]:
    """``steps`` index batches over reshuffled epochs, length-bucketed: each epoch is cut into pools
    of ``pool`` batches, sorted by length inside a pool, and the batches are shuffled again, so
    padding stays small while batch composition stays random."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    size = min(batch_size, n)
    lengths = np.asarray(lengths)
    made = 0
    while made < steps:
        order = rng.permutation(n)
        epoch = []
        for p in range(0, n, size * pool):
            chunk = order[p:p + size * pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch += [chunk[s:s + size] for s in range(0, len(chunk) - size + 1, size)]
        for k in rng.permutation(len(epoch)):
            if made == steps:
                return
            yield epoch[k]
            made += 1


@torch.no_grad()
def _exact_match(lmm: LMM, rows: Sequence[dict]) -> float:
    """Share of rows whose greedy answer to the first turn equals the first gpt turn (sanity)."""
    if not rows:
        return 0.0
    batch = lmm.collate(rows_to_batch(list(rows)), train=False)
    answers = lmm.generate(lmm.embed(batch["input_ids"], batch["pixel_values"]), batch["attention_mask"],
                           lmm.max_new_tokens)
    gold = [str(list(r["gpt_turns"])[0]).strip() for r in rows]
    return round(float(np.mean([a == g for a, g in zip(answers, gold)])), 4)


@torch.no_grad()
def _retrieval_top1(clip: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
    """Image->text top-1 accuracy within a batch (sanity; duplicate texts count as misses)."""
    image = clip.encode_image(pixels, normalize=True)
    text = clip.encode_text(tokens, normalize=True)
    hits = (image @ text.T).argmax(dim=1) == torch.arange(len(pixels))
    return round(float(hits.float().mean()), 4)


def _guide_text(row: dict, mode: str) -> str:
    if mode == "instruction":
        return str(row["instruction"])
    turns = [t for pair in zip(list(row["human_turns"]), list(row["gpt_turns"])) for t in pair]
    return " ".join(str(t) for t in turns)


def _template_texts(cfg: ModelConfig) -> list[str]:
    """The template's own words, so that they are always in the vocabulary."""
    t = TEMPLATES[cfg.template]
    return [t.system, t.first_user.format(image="", q=""), t.user.format(q=""), t.assistant]


# ---- cache files -----------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    listed = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": listed}, indent=2, sort_keys=True))


def _artifacts(folder: Path, *, reused: bool) -> BaseArtifacts:
    info = json.loads((folder / INFO).read_text())
    info.update(reused=reused, path=str(folder))
    return BaseArtifacts(lmm_dir=str(folder / LMM_DIR), guide_file=str(folder / GUIDE_FILE), info=info)
