"""Textual inversion: one new token per defect type, optionally several vectors each.

The text encoder's token embedding is wrapped: the original table stays frozen and untouched, and
the new tokens read their vectors from a small trainable parameter. Every original row is therefore
bit-identical after training by construction (also under ZeRO-3, where a restore-after-step trick
would need gathers), and the export is just that parameter.

Token naming follows diffusers: a token with n vectors is `tok tok_1 ... tok_{n-1}` in the tokenizer,
and prompts say only `tok`; `expand_prompt` spells out the rest.
"""
from __future__ import annotations

import re

import torch
from torch import nn


class LearnedTokenEmbedding(nn.Module):
    """An nn.Embedding whose rows [first_id, first_id + n) come from `learned_vectors`."""

    def __init__(self, base: nn.Embedding, first_id: int, init_vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.learned_vectors = nn.Parameter(init_vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads embedding.weight for dtype/device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base(input_ids)
        n = self.learned_vectors.shape[0]
        offset = input_ids - self.first_id
        is_new = (offset >= 0) & (offset < n)
        learned = self.learned_vectors[offset.clamp(0, n - 1)].to(emb.dtype)
        return torch.where(is_new.unsqueeze(-1), learned, emb)


def token_names(token: str, vectors_per_token: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors_per_token)]


def expand_prompt(prompt: str, tokens: list[str], vectors_per_token: int) -> str:
    """'a pill with sks_scratch' -> 'a pill with sks_scratch sks_scratch_1 ...' for multi-vector tokens."""
    if vectors_per_token == 1:
        return prompt
    for token in tokens:
        prompt = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ".join(token_names(token, vectors_per_token)),
                        prompt)
    return prompt


def _embedding_module(text_encoder: nn.Module) -> nn.Module:
    return text_encoder.get_input_embeddings()


def add_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str], vectors_per_token: int,
               initializer_word: str) -> None:
    """Adds the tokens to the tokenizer and wraps the text encoder's embedding with learned rows."""
    names = [n for t in tokens for n in token_names(t, vectors_per_token)]
    existing = [n for n in names if n in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"The token {existing[0]!r} is already in the tokenizer's vocabulary; choose "
                         "other token names in the data set's caption templates.")
    init_ids = tokenizer(initializer_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"textual_inversion.initializer_word={initializer_word!r} tokenizes to nothing; "
                         "use a plain word such as defect.")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    first_id = ids[0]
    if ids != list(range(first_id, first_id + len(names))):
        raise ValueError("The tokenizer gave the new tokens non-contiguous ids; use a fresh tokenizer.")
    base = _embedding_module(text_encoder)
    if first_id + len(names) > base.num_embeddings:
        text_encoder.resize_token_embeddings(first_id + len(names), mean_resizing=False)
        base = _embedding_module(text_encoder)
    with torch.no_grad():
        init = base.weight[init_ids].float().mean(0)
        base.weight[first_id:first_id + len(names)] = init.to(base.weight.dtype)
    base.requires_grad_(False)
    text_encoder.set_input_embeddings(LearnedTokenEmbedding(base, first_id, init.expand(len(names), -1)))


def learned_embeddings(text_encoder: nn.Module, tokens: list[str], vectors_per_token: int
                       ) -> dict[str, torch.Tensor]:
    """{token: (vectors_per_token, dim)} in fp32, in the order tokens were added."""
    vectors = _embedding_module(text_encoder).learned_vectors.detach().float().cpu()
    return {t: vectors[i * vectors_per_token:(i + 1) * vectors_per_token].clone()
            for i, t in enumerate(tokens)}
