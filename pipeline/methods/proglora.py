"""ProgLoRA: a progressive pool of LoRA blocks, one new block per task, fused by task-aware
allocation weights; task recall protects what every task shares (the cross-modal projector and,
for the dynamic variant, the allocation router).

Paper: Y. Yu et al., "Progressive LoRA for Multimodal Continual Instruction Tuning" (ACL 2025),
Sec. 4 and the appendix. Two registered methods, one per variant of the paper:

``proglora`` (dynamic, no task id at test, Sec. 4.3)
    q(x)    max-pool, over the instruction tokens, of the LLM's input embeddings (the layer
            before the LoRA pool), through LN(W2 SiLU(W1 x + b1) + b2)          (Eq. 5)
    w_n(x)  softmax_n(q(x) . key_n / temperature) over the blocks learned so far (Eq. 6),
            per sample; temperature sqrt(d_llm) as in the reference code
    fused   h = W x + (alpha / r) sum_n w_n(x) B_n A_n x                          (Eq. 7)
    recall  at task i, for phi stored samples of each earlier task p:
            KL(w_p || w_hat), w_hat the current weights, w_p the weights recorded when task p
            ended, zero-padded to the blocks now learned; loss = L_LM + lambda * recall (Eq. 8-9)

``proglora_static`` (the task id is known at test: an explicit oracle, Sec. 4.2)
    w_{p,i} = cos(e_p^v, e_i^v) * cos(e_p^q, e_i^q) * cos(e_p^a, e_i^a), w_{i,i} = 1   (Eq. 3)
            e^v, e^q, e^a: the task's mean image, instruction and answer embeddings
    fused   h = W x + (alpha / r) sum_{p <= i} w_{p,i} B_p A_p x for a sample of task i
    recall  at task i, replay round((1 - w_{p,i}) * phi) stored samples of each earlier task p
            through the LM with task p's fused block; loss = L_A + lambda * L_R

Shared by both: rank 16, alpha 2 * rank (as CoIN's MoELoRA), on q, k, v, o, gate, up, down of
every LLM layer; earlier blocks (and keys) frozen and bit-identical; the multimodal projector
trains on every task (the paper: "only the projection layer and LoRA are updated");
phi = 200, lambda = 2.0.

Choices the paper leaves open (options in ``ProgLoRAOptions``):

* Fusing blocks: Eq. 3 / 7 fuse the blocks' parameters; a LoRA block's parameters act through
  the product B A, so the fusion is of the blocks' weight updates, sum_n w_n B_n A_n, which is
  linear in each block (fusing A and B separately would mix blocks through cross terms).
* Task embeddings (static): the paper encodes texts with BERT and images with a ViT; here the
  frozen guide CLIP, already loaded and downloading nothing, encodes the images, the
  instructions and the answers. They are computed in a pass over the task's training data before
  its first step (``prepare``), since the task's own weights are needed while it trains.
  Negative products are clipped to 0, so the replay count (1 - w) phi stays within [0, phi].
* Which block a replayed sample goes through (static): its own task's fused block, the one it
  is evaluated with, so the recall keeps the shared projector right for that task
  (``recall_block: own``); ``current`` uses the task being learned.
* The router's hidden width d_p (W1: d_p x d_llm) is not given; default 256.
* The pooling of the router's input: max, as the paper says (``query_pool: max``). Where the
  tasks' instructions share most of their tokens, as CoIN-synth's do, the max-pooled inputs are
  nearly parallel across tasks (``benchmarks/router_query.py``: cosine 0.98-0.998) and the router
  gives every sample the same weights; ``query_pool: mean`` is the alternative.
* Keys: each block's key trains with its block and is then frozen with it.
* The KL direction: KL(w_p || w_hat), the direction that stays finite with zero-padded w_p;
  each recall step takes ``recall_batch`` stored samples of every earlier task, cycling.
* The stored samples: the first phi training records of each task (the pipeline's replay
  store, deterministic in the data). Their ids and the weights recorded for them are part of
  the frozen state, and a resumed or later task checks that the store it gets is the same.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import MethodBase
from pipeline.methods.helpers import WrappedLinear, gathered, instruction_tokens, wrap_linears
from pipeline.methods.lora import LLM_LINEAR_TARGETS
from pipeline.methods.protocol import Diagnostics, Generation, ReplayChannel
from pipeline.methods.registry import parse_options, register

IGNORE = -100
RECALL_BLOCKS = ("own", "current")


@dataclass
class ProgLoRAOptions:
    """Config section of ``method: proglora`` / ``method: proglora_static``."""

    rank: int = 16
    alpha: float | None = None  # None = 2 * rank
    replay: int = 200  # phi: stored samples per task
    recall_weight: float = 2.0  # lambda
    recall_batch: int = 8  # stored samples per earlier task in one recall step
    temperature: float | None = None  # dynamic: None = sqrt(d_llm)
    router_hidden: int = 256  # dynamic: d_p
    train_projector: bool = True
    recall_block: str = "own"  # static: "own" | "current"
    query_pool: str = "max"  # dynamic: how the instruction's token embeddings pool into Eq. 5's x: max | mean

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"proglora: rank must be >= 1 (got {self.rank})")
        if self.replay < 0 or self.recall_batch < 1 or self.router_hidden < 1:
            raise ValueError("proglora: replay must be >= 0, recall_batch and router_hidden >= 1 "
                             f"(got {self.replay}, {self.recall_batch}, {self.router_hidden})")
        if self.recall_weight < 0:
            raise ValueError(f"proglora: recall_weight must be >= 0 (got {self.recall_weight})")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"proglora: temperature must be > 0 (got {self.temperature})")
        if self.query_pool not in ("max", "mean"):
            raise ValueError(f"proglora: query_pool must be 'max' or 'mean' (got {self.query_pool!r})")
        if self.recall_block not in RECALL_BLOCKS:
            raise ValueError(f"proglora: recall_block must be one of {RECALL_BLOCKS} (got {self.recall_block!r})")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


def _encode(obj: Any) -> torch.Tensor:
    """A JSON value as a uint8 tensor (names and ids travel in the safetensors state)."""
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


class Block(nn.Module):
    """One task's LoRA block on one linear layer: B A x (A kaiming-uniform, B zero, as peft)."""

    def __init__(self, d_in: int, d_out: int, rank: int, device: Any) -> None:
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False, device=device)
        self.B = nn.Linear(rank, d_out, bias=False, device=device)
        if device is None or torch.device(device).type != "meta":
            nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x.to(self.A.weight.dtype)))


class PoolLinear(WrappedLinear):
    """A frozen linear layer of the LLM plus the method's pool of blocks for it: W x + scale *
    sum_n w[b, n] BLK_n(x), with the per-sample weights the method set for this call. The blocks
    belong to the method's module tree (not registered here), so the base model's state is
    unchanged and the method's state holds only its own tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        m = self._method
        w = m._weights
        if w is None:
            return out
        delta = 0
        for n in range(w.shape[1]):
            blk = m.blocks[n][self.target]
            delta = delta + w[:, n].view(-1, *([1] * (x.dim() - 1))).to(x.dtype) * blk(x).to(x.dtype)
        return out + m.scale * delta


class Router(nn.Module):
    """Eq. 5: LN(W2 SiLU(W1 x + b1) + b2)."""

    def __init__(self, d: int, hidden: int, device: Any) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, hidden, device=device)
        self.w2 = nn.Linear(hidden, d, device=device)
        self.norm = nn.LayerNorm(d, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.w2(F.silu(self.w1(x))))


class ProgLoRA(MethodBase):
    """The dynamic variant; ``ProgLoRAStatic`` below is the oracle one. See the module docstring.

    State: ``blocks.<t>.<target>.{A,B}.weight`` per task, ``projector.*`` (the LMM's multimodal
    projector, shared), ``meta.names`` (task names), ``store.<t>.ids`` (stored sample ids), and
    per variant ``keys.<t>``, ``router.*``, ``recall.<t>.weights`` (dynamic) or
    ``static.embeddings`` (static)."""

    options_class: ClassVar[type] = ProgLoRAOptions
    dynamic: ClassVar[bool] = True
    replay_current: ClassVar[bool] = True
    sweep_space: ClassVar[dict[str, Any]] = {
        "rank": {"choice": [8, 16]}, "recall_weight": {"choice": [0.5, 2.0, 4.0]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
    }

    @classmethod
    def stored_samples(cls, options: dict[str, Any] | None) -> int:
        return parse_options(cls.name, options, cls.options_class).replay

    def __init__(self, options: dict[str, Any] | None, lmm: Any, guide: Any) -> None:
        super().__init__(options, lmm, guide)
        self.opts: ProgLoRAOptions
        o = self.opts
        self.scale = float(o.alpha) / o.rank
        table = lmm.model.get_input_embeddings().weight
        self._device = table.device
        self.d_llm = int(table.shape[1])
        self.temperature = o.temperature or math.sqrt(self.d_llm)
        self._targets = self._wrap(lmm.model)
        self.blocks = nn.ModuleList()
        self.keys = nn.ParameterList()
        self.router = Router(self.d_llm, o.router_hidden, self._device) if self.dynamic else None
        self.projector = lmm.model.model.multi_modal_projector
        self.projector.requires_grad_(False)
        self.names: list[str] = []
        self.store_ids: dict[int, list[str]] = {}
        self.recalled: dict[int, torch.Tensor] = {}  # dynamic: task -> (n_stored, t + 1) weights
        self.embeddings: dict[int, torch.Tensor] = {}  # static: task -> (3, d_guide)
        self.current: int | None = None
        self._weights: torch.Tensor | None = None
        self._replay: ReplayChannel | None = None
        self._cursor: dict[str, int] = {}
        if self.router is not None:
            self.router.requires_grad_(False)

    # ------------------------------------------------------------------ injection
    def _wrap(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Wrap every targeted LLM linear in a ``PoolLinear``; returns target -> (d_in, d_out)."""
        return wrap_linears(model, LLM_LINEAR_TARGETS, lambda mod, target: PoolLinear(mod, target, self), "proglora")

    # ------------------------------------------------------------------ tasks
    @property
    def num_tasks(self) -> int:
        return len(self.blocks)

    def _new_task(self, name: str) -> None:
        r = self.opts.rank
        self.blocks.append(nn.ModuleDict({t: Block(i, o, r, self._device) for t, (i, o) in self._targets.items()}))
        if self.dynamic:
            key = torch.empty(self.d_llm, device=self._device)
            if self._device.type != "meta":
                nn.init.normal_(key, std=1.0)
            self.keys.append(nn.Parameter(key))
        self.names.append(name)

    def begin_task(self, task_index: int, task_name: str = "") -> None:
        """Add task ``task_index``'s block (``num_tasks - 1`` resumes it); only it, its key, the
        router (dynamic) and the projector train."""
        if task_index == self.num_tasks:
            self._new_task(task_name or f"task{task_index}")
        elif task_index != self.num_tasks - 1:
            raise ValueError(f"proglora: begin_task({task_index}) with {self.num_tasks} tasks learned")
        for t, blk in enumerate(self.blocks):
            blk.requires_grad_(t == task_index)
        for t, key in enumerate(self.keys):
            key.requires_grad_(t == task_index)
        if self.router is not None:
            self.router.requires_grad_(True)
        self.projector.requires_grad_(self.opts.train_projector)
        self.current = task_index

    def end_task(self, task_index: int) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.current = None

    def attach_replay(self, channel: ReplayChannel) -> None:
        """The stored samples: every earlier task's must be the store it was learned with."""
        self._replay = channel
        self._cursor = {t: 0 for t in channel.tasks}
        for t, name in enumerate(self.names):
            if t in self.store_ids and name in channel.rows:
                got = [str(r["id"]) for r in channel.rows[name]]
                if got != self.store_ids[t]:
                    raise RuntimeError(f"proglora: the stored samples of task {name!r} are not the ones it was "
                                       f"learned with ({len(got)} rows now, {len(self.store_ids[t])} then; first "
                                       f"ids {got[:3]} vs {self.store_ids[t][:3]}): its training data changed")

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        with gathered(self.parameters()):
            out = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        out["meta.names"] = _encode(self.names)
        for t, ids in self.store_ids.items():
            out[f"store.{t}.ids"] = _encode(ids)
        for t, w in self.recalled.items():
            out[f"recall.{t}.weights"] = w.detach().cpu().contiguous().clone()
        if self.embeddings:
            out["static.embeddings"] = torch.stack([self.embeddings[t] for t in sorted(self.embeddings)]).cpu()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        names = _decode(tensors.pop("meta.names")) if "meta.names" in tensors else []
        while self.num_tasks < len(names):
            self._new_task(names[self.num_tasks])
        self.names = list(names)
        self.store_ids = {int(k.split(".")[1]): _decode(tensors.pop(k)) for k in list(tensors) if k.startswith("store.")}
        self.recalled = {int(k.split(".")[1]): tensors.pop(k).clone() for k in list(tensors) if k.startswith("recall.")}
        emb = tensors.pop("static.embeddings", None)
        self.embeddings = {} if emb is None else {t: emb[t].clone() for t in range(len(emb))}
        with gathered(self.parameters(), modifier_rank=0):
            self.load_state_dict(tensors, strict=True)
        for p in self.parameters():
            p.requires_grad_(False)

    def task_keys(self, task_index: int) -> list[str]:
        mine = (f"blocks.{task_index}.", f"store.{task_index}.", f"recall.{task_index}.")
        return sorted(k for k in self.state_tensors() if k.startswith(mine) or k == f"keys.{task_index}")

    # ------------------------------------------------------------------ inputs
    def _embeds(self, batch: dict[str, Any], grad: bool) -> torch.Tensor:
        """The LMM's input embeddings; with gradient to the projector while it trains."""
        if grad and self.opts.train_projector and self.current is not None:
            return self.lmm.embed(batch["input_ids"], batch["pixel_values"])
        with torch.no_grad():
            return self.lmm.embed(batch["input_ids"], batch["pixel_values"])

    def query_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, d_llm): the max (``query_pool: mean``: the mean) over the instruction tokens of the
        LLM's token embeddings (no image tokens, no padding, no answer tokens), the input of Eq. 5."""
        tok, keep = instruction_tokens(self.lmm, batch, self._device)
        if self.opts.query_pool == "mean":
            k = keep.unsqueeze(-1).to(tok.dtype)
            return (tok * k).sum(dim=1) / k.sum(dim=1).clamp(min=1.0)
        tok = tok.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        return tok.max(dim=1).values

    def allocation_logits(self, batch: dict[str, Any], upto: int) -> torch.Tensor:
        """(B, upto + 1) q . key_n / temperature over blocks 0..upto (Eq. 5-6, before the softmax)."""
        q = self.router(self.query_features(batch))
        keys = torch.stack([self.keys[n] for n in range(upto + 1)])
        return q @ keys.T / self.temperature

    def dynamic_weights(self, batch: dict[str, Any], upto: int) -> torch.Tensor:
        """(B, upto + 1) softmax(q . key_n / temperature) over blocks 0..upto (Eq. 6)."""
        return torch.softmax(self.allocation_logits(batch, upto), dim=-1)

    # ------------------------------------------------------------------ the fused forward
    def _lm_loss(self, batch: dict[str, Any], weights: torch.Tensor) -> torch.Tensor:
        embeds = self._embeds(batch, grad=True)
        self._weights = weights
        try:
            return self.lmm.lm_loss(embeds, batch["attention_mask"], batch["labels"])
        finally:
            self._weights = None

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.current is None:
            raise RuntimeError("proglora: begin_task before training")
        i = self.current
        weights = self.dynamic_weights(batch, i)
        lm = self._lm_loss(batch, weights)
        recall = self._recall_loss(i)
        loss = lm if recall is None else lm + self.opts.recall_weight * recall
        logs = {"loss": loss.item(), "lm_loss": lm.item()}
        if recall is not None:
            logs["recall_loss"] = recall.item()
        return loss, logs

    def _next_rows(self, task: str, n: int, limit: int) -> tuple[list[int], list[dict[str, Any]]]:
        """``n`` of the first ``limit`` stored rows of ``task`` (indices and rows), cycling in a
        fixed order."""
        store = self._replay.rows[task][:limit]
        i = self._cursor.get(task, 0)
        self._cursor[task] = (i + n) % len(store)
        idx = [(i + j) % len(store) for j in range(min(n, len(store)))]
        return idx, [store[k] for k in idx]

    def _recall_loss(self, i: int) -> torch.Tensor | None:
        """Eq. 8: KL(w_p || w_hat) on stored samples of every earlier task p, summed over p."""
        if self._replay is None or self.opts.recall_weight == 0:
            return None
        total = None
        for p in range(i):
            name = self.names[p]
            if p not in self.recalled or name not in self._replay.rows:
                continue
            idx, rows = self._next_rows(name, self.opts.recall_batch, len(self.recalled[p]))
            batch = self._replay.collate(rows)
            log_w_hat = torch.log_softmax(self.allocation_logits(batch, i), dim=-1)
            target = F.pad(self.recalled[p][idx].to(log_w_hat), (0, i - p))
            kl = F.kl_div(log_w_hat, target, reduction="batchmean")
            total = kl if total is None else total + kl
        return total

    def consolidate(self, task_index: int, batches: Iterable[dict[str, Any]], mean_over_workers: Any = None) -> None:
        """Record which samples task ``task_index`` stores and (dynamic) the weights it gives them."""
        name = self.names[task_index]
        if self._replay is None or name not in self._replay.rows:
            return
        rows = self._replay.rows[name]
        self.store_ids[task_index] = [str(r["id"]) for r in rows]
        if self.dynamic:
            out = []
            with torch.no_grad():
                for start in range(0, len(rows), 32):
                    out.append(self.dynamic_weights(self._replay.collate(rows[start:start + 32]), task_index).cpu())
            self.recalled[task_index] = torch.cat(out)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        if not self.num_tasks:
            raise RuntimeError("proglora: no task learned yet")
        weights = self.dynamic_weights(batch, self.num_tasks - 1)
        return self._generate(batch, weights, max_new_tokens)

    def _generate(self, batch: dict[str, Any], weights: torch.Tensor, max_new_tokens: int) -> Generation:
        embeds = self._embeds(batch, grad=False)
        self._weights = weights
        try:
            texts = self.lmm.generate(embeds, batch["attention_mask"], max_new_tokens)
        finally:
            self._weights = None
        # ``selected``: the block of largest weight; ``scores``: every block's weight
        return Generation(texts=texts, selected=weights.argmax(dim=1, keepdim=True).tolist(), scores=weights.cpu())

    @classmethod
    def diagnostics(cls, predictions: dict[str, list[dict[str, Any]]], learned: list[str], out_dir: Path
                    ) -> Diagnostics | None:
        """Mean allocation weight of each block for each test task (the paper's Fig. 6)."""
        from pipeline.figures import heatmap

        tasks = [t for t in predictions if predictions[t] and predictions[t][0].get("scores")]
        if not tasks:
            return None
        width = len(predictions[tasks[0]][0]["scores"])
        mean = [[sum(r["scores"][j] for r in predictions[t]) / len(predictions[t]) for j in range(width)] for t in tasks]
        (out_dir / "allocation_weights.json").write_text(json.dumps({"tasks": tasks, "blocks": learned[:width],
                                                                     "mean_weight": mean}, indent=2))
        fig = heatmap(mean, rows=tasks, cols=learned[:width], fmt="{:.2f}", path=out_dir / "allocation_weights.png",
                      title=f"{cls.name}: mean allocation weight of each task's block", xlabel="LoRA block (task)",
                      ylabel="test task")
        own = [mean[k][learned.index(t)] for k, t in enumerate(tasks) if t in learned[:width]]
        summary = {"own_block_weight_mean": sum(own) / len(own)} if own else {}
        return Diagnostics(summary=summary, files=[out_dir / "allocation_weights.json", fig],
                           lines=[f"{cls.name}: mean weight of a test sample's own task block "
                                  f"{summary['own_block_weight_mean']:.3f}"] if own else [])


register("proglora")(ProgLoRA)


class ProgLoRAStatic(ProgLoRA):
    """The oracle variant: the task id is known at test (``task_id_at_test``); weights from the
    tasks' mean embeddings (Eq. 3), replay-based task recall."""

    task_id_at_test: ClassVar[bool] = True
    dynamic: ClassVar[bool] = False
    sweep_space: ClassVar[dict[str, Any]] = {
        "rank": {"choice": [8, 16]}, "recall_weight": {"choice": [0.5, 2.0, 4.0]},
        "replay": {"choice": [50, 200]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
    }

    # ------------------------------------------------------------------ task embeddings
    def prepare(self, task_index: int, batches: Iterable[dict[str, Any]], mean_over_workers: Any = None) -> None:
        """e^v, e^q, e^a of task ``task_index``: the mean normalised guide embeddings of its
        images, instructions and answers (answers decoded from the training labels). A task
        whose embeddings are already known (a resumed stage restored them) is not embedded again."""
        if task_index in self.embeddings:
            return
        sums = torch.zeros(3, int(self.guide.dim))
        count = torch.zeros(())
        tok = self.lmm.tokenizer
        with torch.no_grad():
            for batch in batches:
                answers = []
                for ids, lab in zip(batch["input_ids"], batch["labels"]):
                    answers.append(tok.decode(ids[lab.to(ids.device) != IGNORE].tolist(), skip_special_tokens=True).strip())
                text = self.lmm.guide_inputs.tokenize(answers).to(batch["guide_text"].device)
                feats = [self.guide.encode_image(batch["guide_pixels"]), self.guide.encode_text(batch["guide_text"]),
                         self.guide.encode_text(text)]
                sums += torch.stack([F.normalize(f.float(), dim=-1).sum(0).cpu() for f in feats])
                count += len(answers)
        if mean_over_workers is not None:
            sums, count = mean_over_workers(sums), mean_over_workers(count)
        if float(count) == 0:
            raise RuntimeError(f"proglora_static: task {task_index} has no training data to embed")
        self.embeddings[task_index] = sums / count

    def static_weights(self, i: int) -> torch.Tensor:
        """(i + 1,) w_{p,i} for p <= i (Eq. 3), w_{i,i} = 1, clipped to [0, 1]."""
        e_i = self.embeddings[i]
        out = []
        for p in range(i):
            e_p = self.embeddings[p]
            out.append(float(torch.prod(F.cosine_similarity(e_p, e_i, dim=-1))))
        return torch.tensor(out + [1.0]).clamp(0.0, 1.0)

    def replay_counts(self, i: int) -> dict[int, int]:
        """Stored samples of each earlier task p replayed while task i trains: round((1 - w) phi)."""
        w = self.static_weights(i)
        return {p: int(round((1.0 - float(w[p])) * self.opts.replay)) for p in range(i)}

    def _task_weights(self, task: int, n: int) -> torch.Tensor:
        w = self.static_weights(task).to(self._device)
        return w.unsqueeze(0).expand(n, -1)

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.current is None:
            raise RuntimeError("proglora_static: begin_task before training")
        i = self.current
        if i not in self.embeddings:
            raise RuntimeError(f"proglora_static: task {i} was not prepared (its embeddings are missing)")
        n = batch["input_ids"].shape[0]
        lm = self._lm_loss(batch, self._task_weights(i, n))
        recall, replayed = self._replay_loss(i)
        loss = lm if recall is None else lm + self.opts.recall_weight * recall
        logs = {"loss": loss.item(), "lm_loss": lm.item()}
        if recall is not None:
            logs["recall_loss"] = recall.item()
            logs["replayed"] = float(replayed)
        return loss, logs

    def _replay_loss(self, i: int) -> tuple[torch.Tensor | None, int]:
        """L_R: the LM loss on replayed samples of the earlier tasks, each through its own task's
        fused block (``recall_block: own``) or the current one."""
        if self._replay is None or self.opts.recall_weight == 0:
            return None, 0
        total, replayed = None, 0
        for p, count in self.replay_counts(i).items():
            name = self.names[p]
            if count == 0 or name not in self._replay.rows:
                continue
            _, rows = self._next_rows(name, self.opts.recall_batch, count)
            batch = self._replay.collate(rows)
            block = p if self.opts.recall_block == "own" else i
            weights = F.pad(self._task_weights(block, len(rows)), (0, i - block))
            loss = self._lm_loss(batch, weights)
            total = loss if total is None else total + loss
            replayed += len(rows)
        return total, replayed

    def consolidate(self, task_index: int, batches: Iterable[dict[str, Any]], mean_over_workers: Any = None) -> None:
        name = self.names[task_index]
        if self._replay is not None and name in self._replay.rows:
            self.store_ids[task_index] = [str(r["id"]) for r in self._replay.rows[name]]

    def task_keys(self, task_index: int) -> list[str]:
        return sorted(k for k in self.state_tensors() if k.startswith((f"blocks.{task_index}.", f"store.{task_index}.")))

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int) -> Generation:
        """Each sample through its own task's fused block: the task id comes from the batch."""
        if not self.num_tasks:
            raise RuntimeError("proglora_static: no task learned yet")
        rows = []
        for name in batch["tasks"]:
            if name not in self.names:
                raise ValueError(f"proglora_static: test sample of task {name!r}, which was not learned "
                                 f"(learned: {self.names})")
            t = self.names.index(name)
            rows.append(F.pad(self.static_weights(t), (0, self.num_tasks - 1 - t)))
        return self._generate(batch, torch.stack(rows).to(self._device), max_new_tokens)


register("proglora_static")(ProgLoRAStatic)
