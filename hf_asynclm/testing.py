"""Tiny models and tokenizers for tests, docs and examples (no download, built in a second).

Example:

```python
>>> from hf_asynclm.testing import tiny_tokenizer, tiny_llama
>>> tok = tiny_tokenizer()
>>> model = tiny_llama(tok)
>>> model.config.vocab_size == len(tok)
True

```
"""

from __future__ import annotations

import functools
from typing import Any

from .cml import MARKERS

_CORPUS = [
    "The weather in Paris is mild today. Let me check the flights and the hotels for you.",
    'get_weather(city="Paris") get_flights(origin="NYC", destination="LAX", date="2026-11-25")',
    '{"temp_c": 18, "condition": "sunny"} {"flights": [{"code": "AF12", "price": 420.5}]}',
    "error: TimeoutError: tool did not return within 1.0 s. error: KeyError: unknown tool",
    "I found 3 hotels. The answer is 42. Book it on Thursday at 10:30. Done!",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ()[]{}<>=,.:;'\"_-+*/\\|!?@#$%^&~`",
    "user assistant system tool call result answer wait sum add multiply city date name price",
]


@functools.lru_cache(maxsize=4)
def _build_tokenizer(with_markers: bool, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|bos|>", "<|eos|>"] + (list(MARKERS) if with_markers else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def tiny_tokenizer(with_markers: bool = True, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on a few lines; CML markers as special tokens by default.

    Without markers (``with_markers=False``) the markers are spelt with several tokens, which
    exercises the text path of the monitor. Each call returns a fresh copy.
    """
    import copy

    return copy.deepcopy(_build_tokenizer(with_markers, vocab_size))


def tiny_llama(tokenizer: Any, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised Llama with a few thousand parameters, sized to ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_gemma3(tokenizer: Any, seed: int = 0, sliding_window: int = 8, **overrides: Any) -> Any:
    """A randomly initialised Gemma 3 text model whose sliding window is ``sliding_window`` tokens."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


class ScriptedPolicy:
    """A logits processor that forces a model to write a fixed script, token by token.

    The script is a list of text pieces, each encoded on its own (so CML markers stay single
    tokens); after the last token it forces EOS. The runtime's injections do not disturb it:
    it moves on once the token it forced is in the sequence; a token the runtime dropped to put
    interrupts before a word is forced again, while a dropped EOS (the runtime waits for owed
    results instead of ending) counts as written, so the script goes on after it. A token the
    sequence showed and no longer shows (the runtime looked a token ahead and took it back) is
    forced again. Used by tests and by the oracle benchmark policy to
    drive a real model's forward passes with a known CML schedule.

    Example:

    ```python
    >>> import torch
    >>> from hf_asynclm.testing import ScriptedPolicy, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> policy = ScriptedPolicy(tok, ["Hi", " [TRAP] [END]"])
    >>> scores = policy(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, len(tok)))
    >>> int(scores.argmax()) == tok.encode("Hi", add_special_tokens=False)[0]
    True

    ```
    """

    def __init__(self, tokenizer: Any, pieces: list[str] | str, eos: bool = True) -> None:
        if isinstance(pieces, str):
            pieces = [pieces]
        self.tokens: list[int] = []
        for piece in pieces:
            self.tokens += tokenizer.encode(piece, add_special_tokens=False)
        if eos:
            self.tokens.append(tokenizer.eos_token_id)
        self.eos_token_id = tokenizer.eos_token_id
        self.position = 0
        self._forced_at: tuple[int, int] | None = None  # (index it would take, token) of the last forced token
        # each step on that was taken because the forced token was seen in the sequence: (its
        # index, the token, the position before); undone when the sequence no longer shows it (the
        # runtime looked a token ahead and took it back)
        self._kept: list[tuple[int, int, int]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        while self._kept:
            at, token, before = self._kept[-1]
            if input_ids.shape[1] > at and int(input_ids[0, at]) == token:
                break
            self._kept.pop()
            self.position = before
        if self._forced_at is not None:
            at, previous = self._forced_at
            if previous == self.eos_token_id:
                self.position += 1  # an EOS the runtime drained: on to the next one
            elif input_ids.shape[1] > at and int(input_ids[0, at]) == previous:
                self._kept.append((at, previous, self.position))
                self.position += 1  # kept: on to the next one
        target = self.tokens[min(self.position, len(self.tokens) - 1)]
        self._forced_at = (input_ids.shape[1], target)
        forced = torch.full_like(scores, -float("inf"))
        forced[..., target] = 0.0
        return forced
