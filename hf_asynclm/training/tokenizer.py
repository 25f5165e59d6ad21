"""A small byte-level BPE tokenizer for CML models trained from scratch.

Design (why a *small* vocabulary):

A tiny model must copy values it has never seen (city names, flight codes, numbers) from the
request into call arguments and from interrupts into the answer. With a large BPE vocabulary
(FACTS: 1,500 tokens) frequent values become single tokens and the model memorises them: the
copy does not transfer to new values. With a few hundred tokens the merges only cover what
is frequent *as a string* across the whole corpus (the JSON and call syntax, tool and argument
names, common words), while a random value falls apart into bytes and short pieces: copying
becomes a per-piece skill that generalises to any new value. Digits are always split one per
token (``Digits(individual_digits=True)`` before ``ByteLevel``), so numbers are copied and
compared digit by digit and ``18`` / ``180`` / ``1800`` share their pieces.

Spaces are isolated too (one ``Ġ`` token, never merged into the next word). Plain byte-level
BPE learns ``ĠMu`` for `` Mu`` after a space but ``Mu`` after a quote, so the same value is
spelt with different tokens in the request (`` Muzen``), the call (``city="Muzen"``) and the
interrupt; with isolated spaces a value has the same tokens in every context, and copying it
is an identity map over tokens (what attention copy heads do well). It costs ~14 % more tokens.

Measured on 600 traces of the simulator (``hf-asynclm data build``, random syllable names),
mean tokens per trace (prompt + trace): vocabulary 300 (bytes and a few merges) 519, 512: 378,
800: 371, 1,500: 367 -- and at 1,500 training names become single tokens (``Toubrezo``), the
memorisation FACTS describes. 512 is the default: past it the sequences barely shorten, while
the scaffolding (``get``, ``_``, ``weather``, ``="``, ``")``) is merged already and values stay
pieces of 1-3 characters (``Te`` ``dep`` ``in``). 512 also keeps the embedding small next to a
3.5-5 M-parameter model.

Special tokens (each a single token, never split, never merged): ``<|pad|>``, ``<|bos|>``,
``<|eos|>``, the five CML markers and the role tags of :data:`~hf_asynclm.prompting.CML_CHAT_TEMPLATE`
(``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|tool|>``). The byte alphabet is always
complete, so any text (any language, any byte) encodes and decodes exactly.

Example:

```python
>>> from hf_asynclm.training.tokenizer import build_cml_tokenizer
>>> tok = build_cml_tokenizer(['[CALL] w1 [HEAD] get_weather(city="Paris") [END] 18 C'] * 20, vocab_size=300)
>>> tok.convert_ids_to_tokens(tok.encode("[CALL] 2026", add_special_tokens=False))
['[CALL]', 'Ġ', '2', '0', '2', '6']
>>> tok.decode(tok.encode('[TRAP] [END] x="Tbilisi"', add_special_tokens=False))
'[TRAP] [END] x="Tbilisi"'

```
"""

from __future__ import annotations

import logging
from typing import Iterable

from ..cml import MARKERS
from ..prompting import CML_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
#: Role tags written by :data:`~hf_asynclm.prompting.CML_CHAT_TEMPLATE` (``<|{{ role }}|>``).
ROLE_TAGS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
#: All special tokens, in id order: pad=0, bos=1, eos=2, the markers, the role tags.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, *MARKERS, *ROLE_TAGS)

#: Default vocabulary: 256 bytes + 12 special tokens + ~244 merges. See the module docstring.
DEFAULT_VOCAB_SIZE = 512


def build_cml_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 4,
    max_token_length: int | None = 16,
    isolate_spaces: bool = True,
    digit_group: int = 1,
):
    """Train a byte-level BPE tokenizer on ``texts`` for a CML model trained from scratch.

    Args:
        texts: the training text (prompts, model text, interrupts). Values in it should be
            varied (random names, codes): frequent strings become merges.
        vocab_size: total size including the 256 byte tokens and the 12 special tokens;
            300-800 keeps copying a per-piece skill (see the module docstring).
        min_frequency: a pair must occur at least this often to be merged, so that a value
            seen only a few times is never learnt as a unit.
        max_token_length: longest merged token, in characters (None: unlimited).
        isolate_spaces: a space is always its own token (see the module docstring).
        digit_group: digits are cut into runs of at most this many, left to right, before the
            merges (1: one digit per token; 2: ``2026`` -> ``20`` ``26``). Any number is cut the
            same way wherever it appears, so copying stays an identity map over tokens.

    Returns:
        a ``PreTrainedTokenizerFast`` with bos/eos/pad set, the markers and role tags as
        special tokens and ``chat_template = CML_CHAT_TEMPLATE``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_fixed = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size must be at least {n_fixed} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")

    tok = Tokenizer(models.BPE(unk_token=None))
    if digit_group < 1:
        raise ValueError(f"digit_group must be at least 1, got {digit_group}")
    if digit_group == 1:
        steps = [pre_tokenizers.Digits(individual_digits=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(r"\d{1,%d}" % digit_group), behavior="isolated")]
    if isolate_spaces:
        steps.append(pre_tokenizers.Split(Regex(" "), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    fast.chat_template = CML_CHAT_TEMPLATE
    logger.info("trained a byte-level BPE tokenizer: %d tokens (asked for %d)", len(fast), vocab_size)
    return fast


def _iter_texts(texts: Iterable[str]):
    for t in texts:
        if t:
            yield t


__all__ = ["build_cml_tokenizer", "SPECIAL_TOKENS", "ROLE_TAGS", "DEFAULT_VOCAB_SIZE"]
