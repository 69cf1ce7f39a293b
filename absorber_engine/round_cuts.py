"""Where a stream's rounds may end early: the token ids the scheduler cuts a round's X after, and
the shortest X worth a delta of its own.

A round's X is n tokens by default, whatever they hold. With `round_cut` set, the scheduler ends X
after the first token whose text contains it (a paragraph or document break, say), or that
completes it with the token before, once X holds at least `min_cut` tokens, so one round absorbs
one document and, with memory_slots > 1, one delta holds it: a rank-4 delta of 32 steps keeps about
one document, and several documents with the same kinds of facts in one delta mix (docs/recall.md,
"A delta per round").
"""

from __future__ import annotations

import math

import torch

from .config import AbsorberConfig
from .errors import ConfigError


def kv_bytes(model_config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values for `tokens` positions across every layer."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return 2 * model_config.num_hidden_layers * heads * head_dim * tokens * torch.tensor([], dtype=dtype).element_size()


def vocabulary_texts(tokenizer) -> list[str]:
    """Each id's text as it reads after other text (about a second for SmolLM2's 49,152). A
    SentencePiece-style decoder drops the space that opens a text ("▁Next" alone reads "Next"), so
    there a cut that starts with a space was in no token: each id is read after a newline's ids,
    and that newline cut off."""
    alone = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    anchor = tokenizer.encode("\n", add_special_tokens=False)
    lead, word = tokenizer.decode(anchor), tokenizer.encode("a", add_special_tokens=False)
    if not anchor or tokenizer.decode(anchor + word) == lead + tokenizer.decode(word):
        return alone                        # byte-level BPE: a token reads alone as it reads anywhere
    after = tokenizer.batch_decode([anchor + [i] for i in range(len(tokenizer))])
    return [t[len(lead):] if t.startswith(lead) else a for t, a in zip(after, alone)]


def boundary_ids(texts: list[str], text: str) -> list[int]:
    """Every vocabulary id whose text (`texts`: vocabulary_texts()) contains `text`: a break can merge
    with the spaces or newlines around it into one token ("\\n\\n", "\\n\\n   ", " \\n\\n" are
    different ids)."""
    return [i for i, s in enumerate(texts) if text in s]


def boundary_pairs(texts: list[str], text: str) -> list[tuple[int, int]]:
    """Every (first, second) pair of ids whose texts, one after the other, complete `text` in the
    second without either holding it whole: a text's tokens are not one token per break. SmolLM2
    reads "ends.\\n\\n" as its "\\n\\n" token, but "ends.\\n\\nNext" as "\\n", "\\n" (and "\\r\\n\\r\\n" as
    "\\r\\n\\r", "\\n"), so a stream absorbed as one text was never cut. A break spread over three
    tokens or more is not found."""
    pairs = []
    for k in range(1, len(text)):
        firsts = [i for i, s in enumerate(texts) if s.endswith(text[:k]) and text not in s]
        seconds = [i for i, s in enumerate(texts) if s.startswith(text[k:]) and text not in s]
        pairs += [(a, b) for a in firsts for b in seconds]
    return sorted(set(pairs))


def delta_min_tokens(cfg: AbsorberConfig, shapes: dict, model_config, dtype: torch.dtype) -> int:
    """Tokens whose KV takes as many bytes as one delta as trained (fp32 A and B): a round shorter
    than that would keep a delta about as large as the tokens it replaced. SmolLM2-135M at rank 4:
    86. A bank holds its deltas in half that (session.BANK_DTYPE); the cuts were measured at 86."""
    delta = 4 * cfg.rank * sum(n_in + n_out for n_in, n_out in shapes.values())
    return max(1, math.ceil(delta / kv_bytes(model_config, 1, dtype)))


def scheduler_cuts(cfg: AbsorberConfig, tokenizer, runner) -> tuple[list[int], list[tuple[int, int]], int]:
    """(cut_after, cut_pairs, min_cut) for the scheduler; ([], [], 1) when the config sets no round_cut."""
    if not cfg.round_cut:
        return [], [], 1
    if tokenizer is None:
        raise ConfigError(f"round_cut ({cfg.round_cut!r}) is text: it needs an engine with a tokenizer")
    texts = vocabulary_texts(tokenizer)
    ids = [i for i in boundary_ids(texts, cfg.round_cut) if i < runner.vocab_size]
    pairs = [(a, b) for a, b in boundary_pairs(texts, cfg.round_cut) if max(a, b) < runner.vocab_size]
    if not ids and not pairs:
        raise ConfigError(f"no token of this vocabulary, nor two in a row, hold round_cut ({cfg.round_cut!r}): "
                          "no round could ever be cut there")
    least = cfg.round_cut_min
    if least is None:
        least = delta_min_tokens(cfg, runner.shapes, runner.model.config, runner.dtype)
    return ids, pairs, least
