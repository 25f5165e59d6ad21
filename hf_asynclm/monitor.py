"""The token monitor: CML parsing over token ids, and the ``[INTR]`` mask.

:class:`CMLMonitor` turns the tokens a model samples into CML events (visible text, block
opened, complete block). When every marker is a single token (a CML checkpoint) the markers
are recognised by id, without decoding; other tokens are decoded incrementally (a constant
amount of work per token, whatever the length of the text) and parsed as text, so markers
spelt with several tokens, or glued to neighbours (``"]["``, ``"]\\n"``), work too.

It also masks ``[INTR]``: the model must never write an interrupt. The single token is
masked when there is one; on the text path every token that would complete the string
``[INTR]`` (given the text held back so far) is masked, and nothing else.

Example:

```python
>>> import torch
>>> from hf_asynclm.monitor import CMLMonitor
>>> from hf_asynclm.testing import tiny_tokenizer
>>> tok = tiny_tokenizer()
>>> mon = CMLMonitor(tok)
>>> events = []
>>> for tid in tok.encode('Hi [CALL] w1 [HEAD] get_weather(city="Oslo") [END]'):
...     events += mon.feed_token(tid)
>>> [e.body for e in events if type(e).__name__ == "Block"]
['get_weather(city="Oslo")']
>>> scores = mon.mask_scores(torch.zeros(1, len(tok)))
>>> bool(torch.isinf(scores[0, tok.convert_tokens_to_ids("[INTR]")]))
True

```
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch

from .cml import INTR, MARKERS, CMLEvent, CMLParser, marker_token_ids

logger = logging.getLogger(__name__)

# per-tokenizer cache of raw token strings (a cache, not state: safe to drop at any time)
_VOCAB_CACHE: "weakref.WeakKeyDictionary[Any, _VocabIndex]" = weakref.WeakKeyDictionary()


class _VocabIndex:
    """Raw token strings of a vocabulary, and the ids that complete ``[INTR]`` after a prefix."""

    def __init__(self, tokenizer: Any) -> None:
        size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        # Markers are printable ASCII, which byte-level BPE and SentencePiece both keep as is.
        self.tokens: list[str] = [t if isinstance(t, str) else "" for t in tokens]
        intr_id = tokenizer.get_vocab().get(INTR)
        self.containing = [i for i, t in enumerate(self.tokens) if INTR in t and i != intr_id]
        self._completing: dict[str, list[int]] = {}
        self._starts_word: dict[int, bool] = {}

    def starts_word(self, token_id: int, tokenizer: Any) -> bool:
        """True when the token's text begins with whitespace or a CML marker (a word boundary
        lies before it). Decided once per token id, from the raw token (``Ġ``/``▁``/``Ċ``
        prefixes of byte-level BPE and SentencePiece) or else its decoded text."""
        known = self._starts_word.get(token_id)
        if known is not None:
            return known
        raw = self.tokens[token_id] if 0 <= token_id < len(self.tokens) else ""
        if raw[:1] in _WORD_START_PREFIXES or any(raw.startswith(m) for m in MARKERS):
            value = True
        else:
            text = tokenizer.decode([token_id], skip_special_tokens=False)
            value = bool(text) and (text[0].isspace() or any(text.startswith(m) for m in MARKERS))
        self._starts_word[token_id] = value
        return value

    def completing(self, rest: str) -> list[int]:
        """Ids of tokens whose text starts with ``rest`` (they would complete the marker)."""
        ids = self._completing.get(rest)
        if ids is None:
            ids = [i for i, t in enumerate(self.tokens) if t.startswith(rest)]
            self._completing[rest] = ids
        return ids


# how byte-level BPE ("Ġ" space, "Ċ" newline, "ĉ" tab) and SentencePiece ("▁") spell a leading space
_WORD_START_PREFIXES = frozenset(" \t\n\rĠĊĉ▁")


def _vocab_index(tokenizer: Any) -> _VocabIndex:
    try:
        index = _VOCAB_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _VocabIndex(tokenizer)
    if index is None:
        index = _VocabIndex(tokenizer)
        _VOCAB_CACHE[tokenizer] = index
    return index


class CMLMonitor:
    """Incremental CML monitor over sampled token ids.

    Args:
        tokenizer: the model's tokenizer (``PreTrainedTokenizerBase``).
        mask_text_intr: also mask multi-token spellings of ``[INTR]`` (default True).
    """

    def __init__(self, tokenizer: Any, mask_text_intr: bool = True) -> None:
        self.tokenizer = tokenizer
        self.markers = marker_token_ids(tokenizer)
        self.parser = CMLParser()
        self.mask_text_intr = mask_text_intr
        self._vocab: _VocabIndex | None = None
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or []) - set(self.markers.by_id)
        self._static_banned: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------
    @property
    def in_block(self) -> bool:
        """Inside a block: the critical section where nothing may be injected."""
        return self.parser.in_block

    @property
    def at_safe_point(self) -> bool:
        """Outside any block, with no partial marker or partial character held back."""
        return self.parser.at_safe_point and self._read_offset == len(self._ids)

    def starts_word(self, token_id: int) -> bool:
        """True when a word boundary lies before ``token_id``: its text begins with whitespace,
        or it is (or begins with) a CML marker. Used to hold interrupts back to word boundaries
        (``interrupt_at="word"``)."""
        token_id = int(token_id)
        if token_id in self.markers.by_id:
            return True
        if self._vocab is None:
            self._vocab = _vocab_index(self.tokenizer)
        return self._vocab.starts_word(token_id, self.tokenizer)

    # ------------------------------------------------------------------------------------
    def feed_token(self, token_id: int) -> list[CMLEvent]:
        """Consume one sampled token; return the CML events it completes."""
        token_id = int(token_id)
        marker = self.markers.by_id.get(token_id)
        if marker is not None:
            events = self._flush_decoder()
            events += self.parser.feed(marker)
            return events
        if token_id in self._special_ids:
            return []  # bos/eos/pad and other non-CML specials carry no text
        self._ids.append(token_id)
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return []  # an incomplete character: wait for the next byte(s)
        new_text = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._compact()
        return self.parser.feed(new_text)

    def feed_text(self, text: str) -> list[CMLEvent]:
        """Consume text directly (remote engines that stream text)."""
        return self._flush_decoder() + self.parser.feed(text)

    def reset_context(self) -> None:
        """Injected tokens went in: decode the model's next tokens without the old context."""
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset = 0
        self._read_offset = 0

    def flush(self) -> list[CMLEvent]:
        """End of generation: release held-back text and report an unterminated block."""
        return self._flush_decoder() + self.parser.flush()

    def _flush_decoder(self) -> list[CMLEvent]:
        if self._read_offset == len(self._ids):
            return []
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        full = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        self._ids, self._prefix_offset, self._read_offset = [], 0, 0
        return self.parser.feed(full[len(prefix) :])

    def _compact(self) -> None:
        if self._prefix_offset > 64:
            self._ids = self._ids[self._prefix_offset :]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    # ------------------------------------------------------------------------------------
    def banned_ids(self) -> list[int]:
        """Token ids the model may not sample now (they would write ``[INTR]``)."""
        banned: list[int] = []
        if self.markers.intr is not None:
            banned.append(self.markers.intr)
        if not self.mask_text_intr:
            return banned
        if self._vocab is None:
            self._vocab = _vocab_index(self.tokenizer)
        banned += self._vocab.containing
        tail = self.parser.tail
        if tail and INTR.startswith(tail) and tail != INTR:
            banned += self._vocab.completing(INTR[len(tail) :])
        return banned

    def mask_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Set the scores of :meth:`banned_ids` to ``-inf`` (in place) and return ``scores``."""
        if self._static_banned is None or self._static_banned.device != scores.device:
            static = [self.markers.intr] if self.markers.intr is not None else []
            if self.mask_text_intr:
                if self._vocab is None:
                    self._vocab = _vocab_index(self.tokenizer)
                static += self._vocab.containing
            idx = torch.tensor(static, dtype=torch.long, device=scores.device)
            self._static_banned = idx[idx < scores.shape[-1]]
        if self._static_banned.numel():
            scores[..., self._static_banned] = -float("inf")
        tail = self.parser.tail
        if self.mask_text_intr and tail and INTR.startswith(tail) and tail != INTR:
            assert self._vocab is not None
            completing = self._vocab.completing(INTR[len(tail) :])
            if completing:
                idx = torch.tensor(completing, dtype=torch.long, device=scores.device)
                scores[..., idx[idx < scores.shape[-1]]] = -float("inf")
        return scores


__all__ = ["CMLMonitor", "MARKERS"]
