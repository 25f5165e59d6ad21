"""CML traces (JSONL from the simulator) -> token ids and labels for training.

Each line is one example::

    {"task_id": "...", "mode": "async",
     "messages": [{"role": "user", "content": "..."}],
     "tools": [{"type": "function", "function": {"name": ..., "parameters": {...}, "x-latency-ms": 300}}],
     "segments": [{"role": "model",  "text": "[CALL] w1 [HEAD] get_weather(city=\\"Paris\\") [END]"},
                  {"role": "inject", "text": "[INTR] w1 [HEAD] {\\"temp_c\\": 18} [END]"},
                  {"role": "model",  "text": " Paris: 18 C."}],
     "meta": {...}}

Tokenisation rule (the same as the runtime's, token for token):

* prompt = ``tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
  tokenize=False)`` encoded with ``add_special_tokens=False``;
* then **each segment encoded on its own** (``add_special_tokens=False``) and concatenated: the
  runtime injects separately encoded interrupt tokens after sampled tokens, so no BPE merge
  crosses a segment boundary;
* then the EOS token.

Labels are ``-100`` on the prompt and on ``inject`` segments, the token ids on ``model``
segments and on the final EOS: the loss is only on what the model writes.

Example:

```python
>>> from hf_asynclm.testing import tiny_tokenizer
>>> from hf_asynclm.prompting import CML_CHAT_TEMPLATE
>>> from hf_asynclm.training.dataset import tokenize_example
>>> tok = tiny_tokenizer(); tok.chat_template = CML_CHAT_TEMPLATE
>>> ex = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [],
...       "segments": [{"role": "model", "text": "[CALL] w1 [HEAD] get_weather(city=\\"Paris\\") [END] [TRAP] [END]"},
...                    {"role": "inject", "text": "[INTR] w1 [HEAD] {\\"temp_c\\": 18} [END]"},
...                    {"role": "model", "text": " 18 C."}]}
>>> item = tokenize_example(tok, ex)
>>> sorted(item)
['attention_mask', 'input_ids', 'labels']
>>> item["labels"][-1] == tok.eos_token_id
True

```
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: Segment roles: ``model`` (written by the model: trained on) and ``inject`` (runtime: masked).
SEGMENT_ROLES = ("model", "inject")


class ExampleError(ValueError):
    """An example that does not follow the training format."""


class ExampleTooLong(ValueError):
    """An example longer than ``max_length`` tokens (with ``truncate=False``)."""

    def __init__(self, length: int, max_length: int):
        super().__init__(f"example has {length} tokens, more than max_length={max_length}")
        self.length = length
        self.max_length = max_length


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def split_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """``"a.jsonl,b.jsonl"``, a path, or a list of them (strings may hold comma-separated
    paths too, as a repeated CLI option gives them) -> list of paths."""
    if isinstance(paths, Path):
        return [paths]
    items = [paths] if isinstance(paths, str) else list(paths)
    out: list[Path] = []
    for item in items:
        if isinstance(item, Path):
            out.append(item)
        else:
            out += [Path(p.strip()) for p in str(item).split(",") if p.strip()]
    return out


def read_jsonl(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read one or more JSONL files (blank lines skipped). Raises ``ExampleError`` naming the
    file and line of any line that is not a JSON object."""
    examples: list[dict[str, Any]] = []
    for path in split_paths(paths):
        if not path.is_file():
            raise FileNotFoundError(f"no such data file: {path}")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ExampleError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ExampleError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                examples.append(obj)
    return examples


def validate_example(example: dict[str, Any]) -> None:
    """Raise ``ExampleError`` when ``example`` lacks what training needs."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ExampleError("'messages' must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ExampleError("each message needs 'role' and 'content'")
    tools = example.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ExampleError("'tools' must be a list of tool schemas")
    segments = example.get("segments")
    if not isinstance(segments, list) or not segments:
        raise ExampleError("'segments' must be a non-empty list of {role, text}")
    for s in segments:
        if not isinstance(s, dict) or s.get("role") not in SEGMENT_ROLES or not isinstance(s.get("text"), str):
            raise ExampleError(f"each segment needs 'role' in {SEGMENT_ROLES} and a 'text' string, got {s!r:.80}")


# ---------------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------------


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The prompt text exactly as the runtime renders it (chat template, generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template: set it (CML checkpoints use prompting.CML_CHAT_TEMPLATE)")
    return tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
    )


def encode_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the prompt (``add_special_tokens=False``: the template writes BOS)."""
    return list(tokenizer.encode(render_prompt(tokenizer, messages, tools), add_special_tokens=False))


def tokenize_example(
    tokenizer: Any,
    example: dict[str, Any],
    max_length: int | None = None,
    truncate: bool = False,
) -> dict[str, list[int]]:
    """Tokenise one example by the rule of this module.

    Returns ``{"input_ids", "labels", "attention_mask"}`` (lists of ints). An example longer
    than ``max_length`` raises :class:`ExampleTooLong`, or with ``truncate=True`` is cut to
    ``max_length`` tokens (the cut part is lost, EOS included); an example whose prompt alone
    fills ``max_length`` always raises (it would train on nothing).
    """
    validate_example(example)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token")
    input_ids = encode_prompt(tokenizer, example["messages"], example.get("tools"))
    labels = [IGNORE_INDEX] * len(input_ids)
    n_prompt = len(input_ids)
    for seg in example["segments"]:
        ids = list(tokenizer.encode(seg["text"], add_special_tokens=False))
        input_ids += ids
        labels += ids if seg["role"] == "model" else [IGNORE_INDEX] * len(ids)
    input_ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    if max_length is not None and len(input_ids) > max_length:
        if not truncate or n_prompt >= max_length:
            raise ExampleTooLong(len(input_ids), max_length)
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels):
            raise ExampleTooLong(len(input_ids), max_length)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


# ---------------------------------------------------------------------------------------------
# Dataset and collator
# ---------------------------------------------------------------------------------------------


@dataclass
class DatasetStats:
    """What :func:`load_cml_dataset` kept, skipped and truncated."""

    files: list[str] = field(default_factory=list)
    read: int = 0
    kept: int = 0
    too_long: int = 0
    truncated: int = 0
    invalid: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CMLDataset:
    """A list of tokenised examples (a map-style ``torch.utils.data.Dataset``)."""

    def __init__(self, items: list[dict[str, list[int]]], stats: DatasetStats | None = None,
                 examples: list[dict[str, Any]] | None = None):
        self.items = items
        self.stats = stats or DatasetStats(kept=len(items))
        #: the raw examples that were kept (same order as ``items``)
        self.examples = examples or []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        return self.items[idx]


def tokenize_examples(
    tokenizer: Any,
    examples: Iterable[dict[str, Any]],
    max_length: int | None = None,
    truncate: bool = False,
    stats: DatasetStats | None = None,
) -> CMLDataset:
    """Tokenise examples; too-long ones are skipped (or truncated), invalid ones skipped, and
    both counted in the stats and the log."""
    stats = stats or DatasetStats()
    items: list[dict[str, list[int]]] = []
    kept: list[dict[str, Any]] = []
    for ex in examples:
        stats.read += 1
        try:
            item = tokenize_example(tokenizer, ex, max_length=max_length, truncate=False)
        except ExampleTooLong:
            if not truncate:
                stats.too_long += 1
                continue
            try:
                item = tokenize_example(tokenizer, ex, max_length=max_length, truncate=True)
            except ExampleTooLong:
                stats.too_long += 1
                continue
            stats.truncated += 1
        except ExampleError as e:
            stats.invalid += 1
            logger.warning("skipping invalid example %s: %s", ex.get("task_id", f"#{stats.read}"), e)
            continue
        items.append(item)
        kept.append(ex)
        n = len(item["input_ids"])
        stats.tokens += n
        stats.trained_tokens += sum(1 for t in item["labels"] if t != IGNORE_INDEX)
        stats.max_tokens = max(stats.max_tokens, n)
    stats.kept = len(items)
    if stats.too_long:
        logger.warning("skipped %d of %d examples longer than max_length=%s tokens", stats.too_long, stats.read, max_length)
    if stats.truncated:
        logger.warning("truncated %d of %d examples to max_length=%s tokens", stats.truncated, stats.read, max_length)
    if stats.invalid:
        logger.warning("skipped %d invalid examples", stats.invalid)
    logger.info(
        "dataset: %d examples kept of %d, %d tokens (%d trained on), longest %d",
        stats.kept, stats.read, stats.tokens, stats.trained_tokens, stats.max_tokens,
    )
    return CMLDataset(items, stats, kept)


def load_cml_dataset(
    tokenizer: Any,
    paths: str | Path | Iterable[str | Path],
    max_length: int | None = None,
    truncate: bool = False,
) -> CMLDataset:
    """Read JSONL file(s) and tokenise them (see :func:`tokenize_examples`)."""
    files = split_paths(paths)
    examples = read_jsonl(files)
    stats = DatasetStats(files=[str(p) for p in files])
    return tokenize_examples(tokenizer, examples, max_length=max_length, truncate=truncate, stats=stats)


class CMLCollator:
    """Pads a batch on the right: ``input_ids`` with the pad id, ``labels`` with -100,
    ``attention_mask`` with 0. Returns int64 tensors.

    ``pad_to_multiple_of`` rounds the batch's length up (never past ``max_length``, unless an example is longer), so that
    a run sees few tensor shapes: CPU kernels cache per shape, and a long run over hundreds of lengths slows down. The
    extra positions are masked, so the loss does not change.

    Example:

    ```python
    >>> collate = CMLCollator(pad_token_id=0, pad_to_multiple_of=8)
    >>> batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    >>> batch["input_ids"].tolist()
    [[5, 6, 7, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]]
    >>> batch["attention_mask"][0].tolist()
    [1, 1, 1, 0, 0, 0, 0, 0]

    ```
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, max_length: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens, got {pad_to_multiple_of}")
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        longest = max(len(b["input_ids"]) for b in batch)
        n = longest
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
            if self.max_length is not None:
                n = max(longest, min(n, self.max_length))  # no padding past what the model takes
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.as_tensor(b["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(b["labels"], dtype=torch.long)
            mask[i, :k] = torch.as_tensor(b.get("attention_mask", [1] * k), dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Texts (for training a tokenizer) and summaries
# ---------------------------------------------------------------------------------------------


def example_texts(example: dict[str, Any]) -> Iterable[str]:
    """The text of an example, roughly as the chat template lays it out (for tokenizer training)."""
    for t in example.get("tools") or []:
        f = t.get("function", t) if isinstance(t, dict) else {}
        props = ((f.get("parameters") or {}).get("properties") or {}) if isinstance(f, dict) else {}
        line = f"{f.get('name', '')}({', '.join(props)})"
        if "x-latency-ms" in f:
            line += f" ~{f['x-latency-ms']}ms"
        yield line + "\n"
    for m in example.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            yield m["content"] + "\n"
    for s in example.get("segments") or []:
        if isinstance(s, dict) and isinstance(s.get("text"), str):
            yield s["text"]


def summarize_meta(examples: Sequence[dict[str, Any]], top: int = 10) -> dict[str, Any]:
    """A short summary of the traces: ``{"mode": {mode: count}, "meta": {key: summary}}``, where
    ``meta`` covers the simulator's ``meta`` fields and the traces' ``source`` and ``category``:
    value counts for strings and booleans with at most ``top`` distinct values (count and
    number of distinct values otherwise), count/mean/min/max for numbers, a count for the rest."""
    summary: dict[str, Any] = {}
    modes = Counter(str(ex["mode"]) for ex in examples if "mode" in ex)
    if modes:
        summary["mode"] = dict(modes.most_common(top))
    values: dict[str, list[Any]] = {}
    for ex in examples:
        for key in ("source", "category"):  # top-level fields of the traces, shown with meta
            if key in ex:
                values.setdefault(key, []).append(ex[key])
        meta = ex.get("meta")
        if isinstance(meta, dict):
            for k, v in meta.items():
                values.setdefault(str(k), []).append(v)
    meta_summary: dict[str, Any] = {}
    for k, vs in values.items():
        nums = [v for v in vs if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and len(nums) == len(vs):
            meta_summary[k] = {
                "count": len(nums), "mean": sum(nums) / len(nums), "min": min(nums), "max": max(nums),
            }
        elif all(isinstance(v, (str, bool)) or v is None for v in vs):
            counts = Counter(str(v) for v in vs)
            if len(counts) <= top:
                meta_summary[k] = dict(counts.most_common())
            else:  # free text (answers, ids): how many, not which
                meta_summary[k] = {"count": len(vs), "distinct": len(counts)}
        else:
            meta_summary[k] = {"count": len(vs)}
    if meta_summary:
        summary["meta"] = meta_summary
    return summary


__all__ = [
    "IGNORE_INDEX",
    "CMLCollator",
    "CMLDataset",
    "DatasetStats",
    "ExampleError",
    "ExampleTooLong",
    "encode_prompt",
    "example_texts",
    "load_cml_dataset",
    "read_jsonl",
    "render_prompt",
    "summarize_meta",
    "tokenize_example",
    "tokenize_examples",
    "validate_example",
]
