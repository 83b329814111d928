"""``LMM``: the frozen base model (transformers ``LlavaForConditionalGeneration``) behind ``LMMLike``.

One code path for the tiny embedded default and LLaVA-1.5: chat templating and label masking
(``collate``), image-feature merging (``embed``), prefix insertion for prompt methods
(``insert_prefix``), the language-modelling loss (``lm_loss``) and greedy batched generation
(``generate``). The transformers model is used through its public methods only (no patching).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.models.config import ModelConfig
from pipeline.models.frozen import FrozenFeatures
from pipeline.models.guide import CLIP_MEAN, CLIP_STD, GuideInputs, normalize_images

IGNORE = -100


@dataclass(frozen=True)
class ChatTemplate:
    """Conversation layout. A rendered conversation is
    ``system + first_user + assistant + answer + (user + assistant + answer)*``; in eval mode it ends
    after ``assistant``. ``{image}`` is the image placeholder token, ``{eos}`` the tokenizer's EOS."""

    system: str
    first_user: str
    user: str
    assistant: str
    answer: str


TEMPLATES: dict[str, ChatTemplate] = {
    # Short template for the tiny model: fewer tokens per sample, same structure as LLaVA's v1.
    "tiny": ChatTemplate("", "USER: {image} {q}", " USER: {q}", " ASSISTANT:", " {a}{eos}"),
    # LLaVA-1.5 "v1" (conv_vicuna_v1): sep " " after user turns, sep2 "</s>" after answers.
    "llava_v1": ChatTemplate(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions. ",
        "USER: {image}\n{q}",
        "USER: {q}",
        " ASSISTANT:",
        " {a}{eos}",
    ),
}


def render(template: ChatTemplate, human: Sequence[str], gpt: Sequence[str], image: str, eos: str
           ) -> tuple[str, list[tuple[int, int]], int]:
    """Render a conversation; return (text, answer character spans, start of the last assistant tag).

    With ``len(gpt) == len(human)`` every answer is rendered (training); with one answer fewer the
    text ends with the assistant tag (the prompt for the next answer).
    """
    text, spans, tag = template.system, [], 0
    for i, q in enumerate(human):
        text += (template.first_user.format(image=image, q=q) if i == 0 else template.user.format(q=q))
        tag = len(text)
        text += template.assistant
        if i < len(gpt):
            start = len(text)
            text += template.answer.format(a=gpt[i], eos=eos)
            spans.append((start, len(text)))
    return text, spans, tag


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """A list of schema rows -> a columnar batch (the shape Ray Data hands to ``collate``)."""
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def _as_list(value: Any) -> list[Any]:
    return list(value.tolist() if isinstance(value, np.ndarray) and value.dtype != object else value)


class LMM:
    """Frozen LLaVA wrapper implementing ``pipeline.models.interfaces.LMMLike``.

    Attributes: ``model`` (LlavaForConditionalGeneration, eval, requires_grad False), ``tokenizer``,
    ``image_size`` (S), ``hidden_size`` (d_llm), ``num_image_tokens`` (N), ``guide_inputs``,
    ``stats`` (Counter: ``truncated`` / ``no_target`` rows seen by ``collate``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: ModelConfig,
                 guide_inputs: GuideInputs | None = None, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.guide_inputs = guide_inputs
        self.template = TEMPLATES[cfg.template]
        self.max_length = cfg.max_length
        self.max_new_tokens = cfg.max_new_tokens
        config = model.config
        vision = config.vision_config
        self.image_size = int(vision.image_size)
        self.hidden_size = int(config.text_config.hidden_size)
        # "default" drops CLS before projection; "full" keeps it (one more placeholder token).
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        self.num_image_tokens = (self.image_size // int(vision.patch_size)) ** 2 + extra
        self.image_token_id = int(config.image_token_id)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.stats: Counter[str] = Counter()
        self.frozen = FrozenFeatures()  # the inference actor's per-sample feature cache hooks in here
        self.min_new_tokens = 0  # benchmarks fix the answer length (> 0: no answer stops before it)
        if tokenizer is not None:
            token_id = tokenizer.convert_tokens_to_ids("<image>")
            if token_id != self.image_token_id:
                raise ValueError(f"tokenizer's <image> id {token_id} != model image_token_id {self.image_token_id}")
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if self.max_length <= self.num_image_tokens:
                raise ValueError(f"max_length={self.max_length} <= {self.num_image_tokens} image tokens")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- batching ----------------------------------------------------------------------------

    def collate(self, rows: dict[str, Any], *, train: bool) -> dict[str, Any]:
        """Schema rows (columnar) -> model batch (see ``interfaces`` for keys and shapes).

        train: right-padded full conversations, labels on every answer and its EOS.
        eval: left-padded prompts of the first human turn, ending with the assistant tag.
        """
        ids = [str(x) for x in _as_list(rows["id"])]
        seqs, labels = self.encode(rows, train=train)
        batch = self.pad(seqs, labels if train else None, left=not train)
        batch["pixel_values"] = self.pixels(rows["image"])
        if self.guide_inputs is not None:
            batch["guide_pixels"] = self.guide_inputs.pixels(rows["image"])
            batch["guide_text"] = self.guide_inputs.tokenize([str(x) for x in _as_list(rows["instruction"])])
        batch["ids"] = ids
        batch["tasks"] = [str(x) for x in _as_list(rows["task"])] if "task" in rows else [""] * len(ids)
        return batch

    def pixels(self, images: Any) -> torch.Tensor:
        """uint8 (B, S', S', 3) -> (B, 3, S, S) float32 normalised for the vision tower."""
        return normalize_images(images, self.image_size, self.image_mean, self.image_std)

    def encode(self, rows: dict[str, Any], *, train: bool) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and labels per row (unpadded, image placeholder expanded, truncated)."""
        if self.tokenizer is None:
            raise RuntimeError("this LMM has no tokenizer (meta build): it cannot collate")
        human_col = [_as_list(h) for h in rows["human_turns"]]
        gpt_col = [_as_list(g) for g in rows["gpt_turns"]]
        ids = [str(x) for x in _as_list(rows["id"])]
        texts, spans, tags = [], [], []
        for rid, human, gpt in zip(ids, human_col, gpt_col):
            if not human:
                raise ValueError(f"record {rid}: no human turn")
            if train and len(gpt) != len(human):
                raise ValueError(f"record {rid}: {len(human)} human turns but {len(gpt)} gpt turns")
            h, g = (human, gpt) if train else (human[:1], [])
            text, span, tag = render(self.template, h, g, "<image>", self.tokenizer.eos_token)
            texts.append(text), spans.append(span), tags.append(tag)
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        seqs, labels = [], []
        for i, rid in enumerate(ids):
            seq, lab = self._encode_row(rid, enc["input_ids"][i], enc["offset_mapping"][i], spans[i], tags[i], train)
            seqs.append(seq), labels.append(lab)
        return seqs, labels

    def _encode_row(self, rid: str, tokens: list[int], offsets: list[tuple[int, int]],
                    spans: list[tuple[int, int]], tag: int, train: bool) -> tuple[list[int], list[int]]:
        """Expand the image placeholder, mask labels outside answers, truncate safely."""
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not tokens or tokens[0] != bos):
            tokens, offsets = [bos, *tokens], [(0, 0), *offsets]
        where = [j for j, t in enumerate(tokens) if t == self.image_token_id]
        if len(where) != 1:
            raise ValueError(f"record {rid}: expected one <image> placeholder, found {len(where)} "
                             "(remove '<image>' from turn texts; the template adds it)")
        j, n = where[0], self.num_image_tokens
        # A token is a target when its characters overlap an answer span (" Paris", "</s>");
        # special tokens added by the tokenizer have empty offsets and never are.
        labels = [t if e > s and any(s < end and e > start for start, end in spans) else IGNORE
                  for t, (s, e) in zip(tokens, offsets)]
        tokens = tokens[:j] + [self.image_token_id] * n + tokens[j + 1:]
        labels = labels[:j] + [IGNORE] * n + labels[j + 1:]
        offsets = offsets[:j] + [offsets[j]] * n + offsets[j + 1:]
        image_end, total = j + n, len(tokens)
        if total <= self.max_length:
            return tokens, labels
        self.stats["truncated"] += 1
        if train:  # cut the end: later answers go first, the image and the question stay
            keep = self.max_length
            if keep <= image_end:
                raise ValueError(f"record {rid}: max_length={self.max_length} would cut image tokens")
            tokens, labels = tokens[:keep], labels[:keep]
            if all(x == IGNORE for x in labels):
                if self.cfg.on_overflow == "raise":
                    raise ValueError(f"record {rid}: {total} tokens; no answer token is left within "
                                     f"max_length={self.max_length} (raise model.max_length or set "
                                     "model.on_overflow='count')")
                self.stats["no_target"] += 1
            return tokens, labels
        # eval: drop the end of the question but keep the assistant tag the answer must follow
        n_tag = sum(1 for s, _ in offsets if s >= tag)
        keep = self.max_length - n_tag
        if keep <= image_end:
            raise ValueError(f"record {rid}: max_length={self.max_length} would cut image tokens")
        return tokens[:keep] + tokens[-n_tag:], labels[:keep] + labels[-n_tag:]

    def pad(self, seqs: list[list[int]], labels: list[list[int]] | None, *, left: bool) -> dict[str, Any]:
        """Pad to the longest row: (B, L) input_ids / attention_mask (+ labels, -100 on padding)."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
            if labels is not None:
                lab[i, sl] = torch.tensor(labels[i])
        out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            out["labels"] = lab
        return out

    # ---- model -------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + (B, 3, S, S) pixels -> (B, L, d_llm) input embeddings, image features
        scattered into the placeholder positions exactly as ``LlavaModel.forward`` does
        (``LlavaModel.get_image_features`` = the projector over ``vision_features``)."""
        image = self.model.model.multi_modal_projector(self.vision_features(pixel_values))
        return self.embed_image_features(input_ids, image)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, N, d_vision): the frozen vision tower's features that the
        multimodal projector takes (the configured ``vision_feature_layer``, CLS dropped under the
        "default" strategy), as ``LlavaModel.get_image_features`` selects them before projecting.
        ``embed_image_features(ids, projector(vision_features(px)))`` equals ``embed(ids, px)``.
        A batch bound by the inference actor is served from its feature cache (``frozen``)."""
        return self.frozen.get(pixel_values, lambda: self._vision_features(pixel_values))

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        tower = self.model.model.vision_tower
        vision_dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(self.device, vision_dtype), output_hidden_states=True, return_dict=True)
        layers = config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else list(layers)
        picked = [out.hidden_states[i] for i in layers]
        if config.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return torch.cat(picked, dim=-1)

    def embed_image_features(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + (B, N, d_llm) projected image features -> (B, L, d_llm) input embeddings,
        the features scattered into the placeholder positions as ``LlavaModel.forward`` does."""
        input_ids = input_ids.to(self.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        features = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)  # (B*N, d_llm)
        mask = self.model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(mask, features)

    def insert_prefix(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                      prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Insert ``prefix`` (B, P, d) right after each row's BOS (its first attended position).

        (B, L, d), (B, L), (B, L) -> (B, L+P, d), (B, L+P), (B, L+P). Padding stays where it was
        (left-padded rows stay left-padded); prefix positions get attention 1 and label -100.
        Differentiable w.r.t. ``prefix`` and ``embeds``.
        """
        b, length, d = embeds.shape
        p = prefix.shape[1]
        mask = attention_mask.to(embeds.device)
        bos = mask.argmax(dim=1, keepdim=True)  # first 1 of each row
        pos = torch.arange(length, device=embeds.device).unsqueeze(0)
        old_to_new = pos + (pos > bos).long() * p  # (B, L): tokens after the BOS shift by P
        prefix_pos = bos + 1 + torch.arange(p, device=embeds.device).unsqueeze(0)  # (B, P)
        out = embeds.new_zeros(b, length + p, d)
        out = out.scatter(1, old_to_new.unsqueeze(-1).expand(-1, -1, d), embeds)
        out = out.scatter(1, prefix_pos.unsqueeze(-1).expand(-1, -1, d), prefix.to(embeds.dtype))
        new_mask = mask.new_ones(b, length + p).scatter(1, old_to_new, mask)
        new_labels = None
        if labels is not None:
            labels = labels.to(embeds.device)
            new_labels = labels.new_full((b, length + p), IGNORE).scatter(1, old_to_new, labels)
        return out, new_mask, new_labels

    def lm_logits(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, V) next-token logits. Positions follow the attention mask, so
        left-padded rows get the same positions as unpadded ones."""
        mask = attention_mask.to(embeds.device)
        return self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask)).logits

    def lm_loss(self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over label positions (labels[:, t] is predicted at t-1).

        Logits are computed at label positions only: the same loss as the model's own ``labels=``
        path, without the (B, L, V) logits of every position (8% of positions carry a label in the
        CoIN-synth pre-training corpus; for LLaVA-1.5 the full logits are B x L x 32000 floats).
        """
        mask, labels = attention_mask.to(embeds.device), labels.to(embeds.device)
        target = labels[:, 1:]
        keep = target != IGNORE
        if not bool(keep.any()):  # e.g. only overflowed rows: no NaN, no signal
            return embeds.sum() * 0.0
        hidden = self.model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                                  use_cache=False).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        return nn.functional.cross_entropy(logits.float(), target[keep])

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
        """Greedy decoding from left-padded (B, L, d) embeddings; returns B stripped answers
        (new tokens only, cut at the first EOS)."""
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            return [""] * embeds.shape[0]
        tok = self.tokenizer
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  min_new_tokens=min(self.min_new_tokens, max_new_tokens) or None,
                                  eos_token_id=tok.eos_token_id, pad_token_id=self.pad_id,
                                  bos_token_id=tok.bos_token_id)
        out = self.model.generate(inputs_embeds=embeds.to(self.dtype), attention_mask=attention_mask.to(self.device),
                                  generation_config=config)
        texts = []
        for row in out.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
        return texts


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) attention mask -> (B, L) position ids counting attended tokens only."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)
