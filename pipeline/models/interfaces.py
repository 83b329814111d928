"""What continual methods and stages may rely on from a built LMM and guidance encoder.

``pipeline.models.build_lmm`` returns an object satisfying ``LMMLike`` and
``pipeline.models.build_guide`` one satisfying ``GuideLike``. The same code path serves the tiny
embedded-default model and LLaVA-1.5-7B: both are transformers ``LlavaForConditionalGeneration``.

Batch produced by ``LMMLike.collate(rows, train=...)`` (rows are a Ray Data batch in the
columns of ``pipeline.data.schema``, including the decoded ``image``):

    input_ids      LongTensor (B, L)     chat-templated text with the image placeholder tokens;
                                         train: right-padded prompt+answers; eval: left-padded
                                         prompt only (ready for batched greedy generation)
    attention_mask LongTensor (B, L)
    labels         LongTensor (B, L)     train only: -100 everywhere except assistant answer
                                         tokens (every gpt turn) and their end-of-turn token
    pixel_values   FloatTensor (B, 3, S, S)   normalised for the LMM's vision tower
    guide_pixels   FloatTensor (B, 3, Sg, Sg) normalised for the guidance CLIP
    guide_text     LongTensor (B, Lc)    CLIP-tokenised ``instruction`` (question + instruction
                                         text only: no chat template, no answer)
    ids            list[str]             record id / question_id
    tasks          list[str]             task name per sample (methods must not read this at
                                         test time unless they are oracle variants)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class LMMLike(Protocol):
    model: nn.Module  # transformers LlavaForConditionalGeneration, frozen (requires_grad False)
    tokenizer: Any
    image_size: int
    hidden_size: int  # d_llm: width of the language model's token embeddings

    def collate(self, rows: dict[str, Any], *, train: bool) -> dict[str, Any]: ...

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, L, d_llm) input embeddings with image features merged into the placeholder
        positions exactly as LlavaForConditionalGeneration does."""
        ...

    def insert_prefix(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        prefix: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Insert ``prefix`` (B, P, d_llm) right after each row's BOS token (works for left- and
        right-padded rows); attention 1 and label -100 on prefix positions."""
        ...

    def lm_loss(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of the language model over label positions."""
        ...

    def generate(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
    ) -> list[str]:
        """Greedy decoding from left-padded input embeddings; returns stripped answer texts."""
        ...


class GuideLike(Protocol):
    dim: int  # d_guide: CLIP joint embedding width

    def encode_image(self, guide_pixels: torch.Tensor) -> torch.Tensor:
        """(B, d_guide) projected CLIP image embeddings (frozen, no grad)."""
        ...

    def encode_text(self, guide_text: torch.Tensor) -> torch.Tensor:
        """(B, d_guide) CLIP text features of the tokenised instruction (pooled or projected, see ``model.guide_text_feature``)."""
        ...
