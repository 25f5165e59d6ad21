"""Publish CML checkpoints to the Hugging Face Hub and get them back.

:func:`publish_checkpoint` checks that a folder is a loadable checkpoint, renders its model card
(``model_cards/cml_model_card.md``) from the training record the folder carries
(``cml_training.json``), creates the repo and pushes folder and card in **one commit**.
:func:`resolve_checkpoint` turns a local folder or a Hub repo id into a local folder, through
the ``huggingface_hub`` cache (offline mode honoured).

Both speak to ``huggingface_hub`` only (2.x), so they work with any Hub-compatible endpoint.
The endpoint is, in order: the ``endpoint=`` argument, the ``HF_ENDPOINT`` environment
variable *as it is when the function is called* (``huggingface_hub`` itself reads it once, at
import time), then ``huggingface_hub``'s default (``https://huggingface.co``).

Errors say what to do: they are :class:`HubError` (an ``OSError``) for repo, network, cache
and token problems, and :class:`InvalidCheckpointError` (a ``ValueError``) for a folder that is
not a checkpoint.

Example:

```python
>>> import tempfile
>>> from hf_asynclm.hub import InvalidCheckpointError, check_checkpoint_folder
>>> with tempfile.TemporaryDirectory() as empty:
...     try:
...         check_checkpoint_folder(empty)
...     except InvalidCheckpointError as err:
...         print(str(err).split(":")[0])
not a checkpoint folder

>>> from hf_asynclm.hub import publish_checkpoint, resolve_checkpoint
>>> url = publish_checkpoint("out/cml-tiny", "my-org/cml-tiny")  # doctest: +SKIP
>>> folder = resolve_checkpoint("my-org/cml-tiny")  # doctest: +SKIP

```
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .cml import CALL, END, HEAD, INTR, MARKERS, TRAP, format_call, format_interrupt, format_trap

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_TEMPLATE_NAME",
    "CheckpointInfo",
    "DEFAULT_IGNORE_PATTERNS",
    "DEFAULT_TAGS",
    "HubError",
    "InvalidCheckpointError",
    "TRAINING_RECORD",
    "check_checkpoint_folder",
    "publish_checkpoint",
    "read_training_record",
    "render_model_card",
    "resolve_checkpoint",
]

#: Name of the training record a checkpoint folder may carry (see :func:`read_training_record`).
TRAINING_RECORD = "cml_training.json"
#: File name of the model card template under ``model_cards/``.
CARD_TEMPLATE_NAME = "cml_model_card.md"
#: Tags every published CML checkpoint carries (``card_data["tags"]`` adds to them).
DEFAULT_TAGS: tuple[str, ...] = ("asynclm", "cml", "function-calling")
#: Files of a training run that are not part of a checkpoint and are not uploaded.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    ".git/*",
    "**/.git/*",
    ".cache/*",
    "**/.cache/*",
    "__pycache__/*",
    "**/__pycache__/*",
    "checkpoint-*/*",
    "runs/*",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "*.lock",
    ".DS_Store",
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_REPO_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")


class HubError(OSError):
    """A Hub operation failed; the message says why and what to do (repo, token, network, cache)."""


class InvalidCheckpointError(ValueError):
    """A folder is not a checkpoint that ``from_pretrained`` can load."""


# ---------------------------------------------------------------------------------------------
# Checkpoint folders
# ---------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What :func:`check_checkpoint_folder` found in a checkpoint folder.

    Attributes:
        folder: The folder (absolute).
        kind: ``"model"`` (``config.json`` + weights) or ``"adapter"`` (a PEFT adapter).
        weights: Weight files (``*.safetensors``), relative to ``folder``.
        tokenizer_files: Tokenizer files present.
        has_cml_markers: Whether the tokenizer files name the five CML markers.
        config: ``config.json`` (empty for an adapter without one).
        adapter_config: ``adapter_config.json`` (empty for a full model).
        num_parameters: Parameter count read from the safetensors headers (None if unreadable).
        dtypes: Tensor dtypes found in the safetensors headers.
    """

    folder: Path
    kind: str
    weights: list[str]
    tokenizer_files: list[str]
    has_cml_markers: bool
    config: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    num_parameters: int | None = None
    dtypes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InvalidCheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise InvalidCheckpointError(f"{path} must hold a JSON object")
    return data


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (tensor names -> dtype/shape), without loading tensors."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(fh.read(size))
        return header if isinstance(header, dict) else None
    except (OSError, struct.error, ValueError):
        return None


def check_checkpoint_folder(folder: str | os.PathLike[str]) -> CheckpointInfo:
    """Check that ``folder`` is a checkpoint ``from_pretrained`` can load, and describe it.

    A checkpoint is either a full model (``config.json`` and ``*.safetensors`` weights; a
    sharded ``model.safetensors.index.json`` must find all its shards) or a PEFT adapter
    (``adapter_config.json`` and ``adapter_model.safetensors``), and in both cases tokenizer
    files (``tokenizer.json`` or ``tokenizer_config.json``...). A tokenizer without the CML
    markers is allowed but logged as a warning.

    Args:
        folder: The folder to check.

    Returns:
        What was found.

    Raises:
        InvalidCheckpointError: What is missing, and how to produce it.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_asynclm.testing import tiny_llama, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tiny_llama(tok).save_pretrained(d)
    ...     _ = tok.save_pretrained(d)
    ...     info = check_checkpoint_folder(d)
    >>> info.kind, info.weights, info.has_cml_markers
    ('model', ['model.safetensors'], True)

    ```
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InvalidCheckpointError(f"not a checkpoint folder: {path} does not exist or is not a folder")
    path = path.resolve()
    names = {p.name for p in path.iterdir() if p.is_file()}
    has_config = "config.json" in names
    has_adapter = "adapter_config.json" in names
    if not (has_config or has_adapter):
        raise InvalidCheckpointError(
            f"not a checkpoint folder: {path} has neither config.json (a model) nor adapter_config.json "
            "(a PEFT adapter); save one with model.save_pretrained(folder)"
        )
    kind = "adapter" if has_adapter else "model"
    weights = sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*.safetensors")
        if p.is_file() and not any(part.startswith(("checkpoint-", ".")) for part in p.relative_to(path).parts[:-1])
    )
    if kind == "adapter":
        weights = [w for w in weights if Path(w).name.startswith("adapter_model")]
    if not weights:
        legacy = sorted(
            n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")) and "optimizer" not in n
        )
        hint = (
            f" (found {', '.join(legacy)}: re-save with save_pretrained(folder, safe_serialization=True))"
            if legacy else " (save the model with save_pretrained(folder))"
        )
        expected = "adapter_model.safetensors" if kind == "adapter" else "*.safetensors weights"
        raise InvalidCheckpointError(f"not a checkpoint folder: {path} has no {expected}{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise InvalidCheckpointError(
                f"not a checkpoint folder: {index.name} lists shards that are missing: {', '.join(missing)}"
            )
    tokenizer_files = [n for n in _TOKENIZER_FILES if n in names]
    if not ({"tokenizer.json", "tokenizer_config.json"} & set(tokenizer_files)):
        raise InvalidCheckpointError(
            f"not a checkpoint folder: {path} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(folder)"
        )
    text = "".join(
        (path / n).read_text(encoding="utf-8", errors="replace")
        for n in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")
        if n in names
    )
    has_markers = all(json.dumps(m)[1:-1] in text for m in MARKERS)
    if not has_markers:
        logger.warning(
            "%s: the tokenizer does not define the CML markers %s as tokens; was it trained for CML? "
            "(hf_asynclm.cml.add_cml_tokens adds them)", path, " ".join(MARKERS)
        )
    num_params: int | None = 0
    dtypes: set[str] = set()
    for w in weights:
        header = _safetensors_header(path / w)
        if header is None:
            num_params = None
            break
        for name, meta in header.items():
            if name != "__metadata__" and isinstance(meta, dict):
                num_params += math.prod(meta.get("shape", []))  # type: ignore[operator]
                dtypes.add(str(meta.get("dtype")))
    return CheckpointInfo(
        folder=path,
        kind=kind,
        weights=weights,
        tokenizer_files=tokenizer_files,
        has_cml_markers=has_markers,
        config=_read_json(path / "config.json") if has_config else {},
        adapter_config=_read_json(path / "adapter_config.json") if has_adapter else {},
        num_parameters=num_params,
        dtypes=sorted(dtypes),
    )


def read_training_record(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``cml_training.json`` from a checkpoint folder (``{}`` when there is none).

    :func:`hf_asynclm.training.train` writes it (``"format": "hf-asynclm/cml-training/1"``);
    it may also be written or completed by hand. Every field is optional; unknown fields are
    ignored. The fields the model card uses:

    - ``model_name`` (str): title of the card (default: the repo name).
    - ``description`` (str): a paragraph under the title.
    - ``base_model`` (str): Hub id of the model that was fine-tuned (card metadata
      ``base_model``; a local path is left out of the metadata with a warning; for an adapter
      the default is ``adapter_config.json``'s ``base_model_name_or_path`` when that is a Hub id).
    - ``license`` (str), ``language`` (str or list): card metadata.
    - ``datasets`` (list of str): Hub dataset ids used for training (card metadata and the
      "Training data" section).
    - ``data`` (dict): training data, shown as a table, e.g. ``{"sources": ["bfcl:parallel",
      "synthetic"], "num_traces": 20000, "values": "random syllable names"}``. Without it the
      trainer's ``data_files`` (names only), ``examples`` and ``dataset`` counts
      (``read``, ``kept``, ``too_long``, ``truncated``, ``tokens``, ``trained_tokens``...) are shown.
    - ``simulator`` (dict): simulator settings of paper §4, shown as a table, e.g.
      ``{"call_time_ms": [1, 1000], "token_time_ms": [5, 30], "scheduling": "LPT", "seed": 0}``;
      or the trainer's summary of the traces, ``{"mode": {mode: count}, "meta": {key: {"mean",
      "min", "max", ...} or {value: count}}}``.
    - ``training`` (dict): hyper-parameters and run facts, shown as a table, e.g.
      ``{"steps": 1500, "learning_rate": 0.002, "batch_size": 32, "lora_r": null,
      "hardware": "2-core CPU", "train_seconds": 2280, "final_loss": 0.10}``. Without it the
      trainer's ``mode``, ``steps``, ``epochs``, ``final_train_loss``, ``mean_train_loss``,
      ``train_time_s``, ``parameters``, ``trainable_parameters``, ``vocab_size`` and from its
      ``config``: ``preset``, ``learning_rate``, ``max_steps``, ``num_epochs``, ``batch_size``,
      ``grad_accum``, ``max_length``, ``warmup``, ``lr_scheduler``, ``weight_decay``, ``seed``,
      ``model_dtype``, ``lora`` (and ``lora_r``, ``lora_alpha``, ``lora_dropout``,
      ``merge_lora`` when ``lora`` is on) are shown.
    - ``metrics`` (dict ``name -> value``, or list of ``{"name", "value", "dataset"?,
      "notes"?}``): evaluation results, shown as a table.
    - ``limitations`` (list of str): added to the card's limitations.
    - ``tags`` (list of str): extra Hub tags.
    - ``runtime`` (dict): settings the checkpoint was trained for, which
      :meth:`AsyncLM.from_pretrained <hf_asynclm.AsyncLM.from_pretrained>` uses unless told
      otherwise: ``interrupt_at`` (``"token"``, ``"word"``, ``"sentence"`` or ``"sentence-eager"``), ``constrain_calls``
      (``"off"``, ``"schema"`` or ``"grounded"``), ``no_repeat_calls``, ``complete_names`` and ``quote_numbers``
      (bools); the trainer writes ``"word"`` (``"sentence"`` when asked, for paced traces) and ``"schema"``
      (and ``no_repeat_calls`` / ``complete_names`` / ``quote_numbers`` when asked), see
      :data:`hf_asynclm.training.train.RUNTIME_DEFAULTS`.

    Args:
        folder: The checkpoint folder.

    Returns:
        The record, as a dict.

    Raises:
        InvalidCheckpointError: The file exists but is not a JSON object.

    Example:

    ```python
    >>> import json, tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (pathlib.Path(d) / "cml_training.json").write_text(json.dumps({"metrics": {"accuracy": 0.27}}))
    ...     read_training_record(d)["metrics"]
    {'accuracy': 0.27}

    ```
    """
    path = Path(folder) / TRAINING_RECORD
    return _read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def _default_template() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards" / CARD_TEMPLATE_NAME, here.parent / "model_cards" / CARD_TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"model card template {CARD_TEMPLATE_NAME} not found next to the package; pass template=<path>"
    )


def _fmt(value: Any) -> str:
    """A table cell: numbers compact, lists joined, ``|`` escaped."""
    if isinstance(value, bool) or value is None:
        text = "—" if value is None else str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)):
        is_range = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        text = (" – " if is_range else ", ").join(_fmt(v) for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(table: Any) -> list[tuple[str, str]]:
    if not isinstance(table, Mapping):
        return []
    return [(str(k), _fmt(v)) for k, v in table.items()]


def _is_hub_id(name: Any) -> bool:
    """A Hub repo id (``org/name``), not a local path that happens to look like one."""
    return (
        isinstance(name, str) and bool(_REPO_ID.match(name)) and ".." not in name and not Path(name).exists()
    )


# what the trainer's record (``"format": "hf-asynclm/cml-training/1"``) holds, shown in the card
_RUN_KEYS = ("mode", "steps", "epochs", "final_train_loss", "mean_train_loss", "train_time_s", "parameters",
             "trainable_parameters", "vocab_size")
_CONFIG_KEYS = ("preset", "learning_rate", "max_steps", "num_epochs", "batch_size", "grad_accum", "max_length",
                "warmup", "lr_scheduler", "weight_decay", "seed", "model_dtype", "lora", "lora_r", "lora_alpha",
                "lora_dropout", "merge_lora")
_DATASET_KEYS = ("read", "kept", "too_long", "truncated", "invalid", "tokens", "trained_tokens", "max_tokens")


def _training_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    if isinstance(record.get("training"), Mapping):
        return _rows(record["training"])
    table = {k: record[k] for k in _RUN_KEYS if record.get(k) is not None}
    averaged = record.get("averaged_from")
    if isinstance(averaged, Sequence) and not isinstance(averaged, str) and averaged:  # hf-asynclm average
        table["averaged from"] = ", ".join(
            f"{Path(str(a.get('path', '?'))).name} (weight {_fmt(round(float(a.get('weight', 0)), 4))})"
            for a in averaged if isinstance(a, Mapping)
        )
    config = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    lora = bool(config.get("lora"))
    table.update({
        k: config[k] for k in _CONFIG_KEYS
        if config.get(k) is not None and (lora or not k.startswith(("lora_", "merge_lora")))
    })
    return _rows(table)


def _data_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    if isinstance(record.get("data"), Mapping):
        return _rows(record["data"])
    table: dict[str, Any] = {}
    if record.get("data_files"):
        table["files"] = [Path(str(f)).name for f in record["data_files"]]
    if record.get("examples") is not None:
        table["examples"] = record["examples"]
    stats = record.get("dataset") if isinstance(record.get("dataset"), Mapping) else {}
    for key in _DATASET_KEYS:  # zero counts (nothing truncated...) are left out, read/kept are not
        if stats.get(key) is not None and (stats[key] or key in ("read", "kept")):
            table[f"examples {key}" if key in ("read", "kept") else key] = stats[key]
    return _rows(table)


def _simulator_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Settings (a flat dict) or the trainer's summary (``{"mode": {...}, "meta": {key: stats}}``)."""
    sim = record.get("simulator")
    if not isinstance(sim, Mapping):
        return []
    if not ({"mode", "meta"} >= set(sim) and sim):
        return _rows(sim)
    rows = []
    if isinstance(sim.get("mode"), Mapping):
        rows.append(("calling modes in the traces", _fmt(sim["mode"])))
    for key, value in (sim.get("meta") or {}).items():
        if isinstance(value, Mapping) and {"mean", "min", "max"} <= set(value):
            value = f"mean {_fmt(value['mean'])} (min {_fmt(value['min'])}, max {_fmt(value['max'])})"
        rows.append((str(key), _fmt(value)))
    return rows


def _stage_rows(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per stage of a multi-stage run (``record["stages"]``, each a dict with ``name``
    and, where recorded, ``steps``, ``examples``, ``train_time_s``, ``data_files``)."""
    stages = record.get("stages")
    if not isinstance(stages, Sequence) or isinstance(stages, str):
        return []
    rows = []
    for i, st in enumerate(stages, 1):
        if not isinstance(st, Mapping):
            continue
        files = st.get("data_files")
        if not isinstance(files, Sequence) or isinstance(files, str):
            files = [files] if files else []
        rows.append({
            "name": _fmt(st.get("name", f"stage {i}")),
            "steps": _fmt(st.get("steps", "")),
            "examples": _fmt(st.get("examples", "")),
            "time": _fmt(st.get("train_time_s", "")),
            "files": _fmt(", ".join(Path(str(f)).name for f in files)),
        })
    return rows


def _total_train_time(record: Mapping[str, Any]) -> str | None:
    """``"7167.5 s (119.5 min)"`` from ``train_time_s_total`` (multi-stage runs), else None."""
    total = record.get("train_time_s_total")
    if isinstance(total, bool) or not isinstance(total, (int, float)):
        return None
    return f"{float(total):.1f} s ({float(total) / 60:.1f} min)"


def _metric_rows(metrics: Any) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    if isinstance(metrics, Mapping):
        metrics = [{"name": k, "value": v} for k, v in metrics.items()]
    if isinstance(metrics, Sequence) and not isinstance(metrics, str):
        for m in metrics:
            if isinstance(m, Mapping) and "name" in m:
                rows.append({
                    "name": _fmt(m["name"]),
                    "value": _fmt(m.get("value")),
                    "dataset": _fmt(m.get("dataset", "")),
                    "notes": _fmt(m.get("notes", "")),
                })
    return rows


def _human_count(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _cml_example() -> str:
    """A short CML trace written with the protocol's own formatters (so the card never drifts)."""
    return "\n".join([
        "I'll check both cities at once. " + format_call('get_weather(city="Paris")', "w1")
        + " " + format_call('get_weather(city="Oslo")', "w2") + " " + format_trap(),
        format_interrupt("w2", '{"temp_c": 4, "condition": "snow"}'),
        format_interrupt("w1", '{"temp_c": 18, "condition": "sunny"}'),
        "Paris is sunny at 18 °C; Oslo has snow at 4 °C.",
    ])


def render_model_card(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    card_data: Mapping[str, Any] | None = None,
    template: str | os.PathLike[str] | None = None,
    info: CheckpointInfo | None = None,
) -> Any:
    """Render the model card (README.md) of a checkpoint folder.

    Metadata (YAML header): ``library_name: transformers``, ``pipeline_tag: text-generation``,
    tags ``asynclm``/``cml``/``function-calling`` (plus ``card_data["tags"]``), ``base_model``,
    ``license``, ``language``, ``datasets``; ``card_data`` overrides what
    ``cml_training.json`` (see :func:`read_training_record`) says. The body comes from the
    Jinja template ``model_cards/cml_model_card.md``.

    Args:
        folder: The checkpoint folder.
        repo_id: Where it will live (``org/name``): used in the usage examples.
        card_data: Extra or overriding metadata (``ModelCardData`` fields, e.g. ``license``).
        template: Another Jinja template (path).
        info: The result of :func:`check_checkpoint_folder`, if already computed.

    Returns:
        A ``huggingface_hub.ModelCard``; ``str(card)`` is the README text.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_asynclm.testing import tiny_llama, tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tiny_llama(tok).save_pretrained(d)
    ...     _ = tok.save_pretrained(d)
    ...     card = render_model_card(d, "org/cml-tiny", card_data={"license": "apache-2.0"})
    >>> card.data.library_name, card.data.license, card.data.tags
    ('transformers', 'apache-2.0', ['asynclm', 'cml', 'function-calling'])
    >>> "AsyncLM.from_pretrained(\\"org/cml-tiny\\"" in card.text
    True

    ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = info or check_checkpoint_folder(folder)
    record = read_training_record(info.folder)
    overrides = dict(card_data or {})

    # base_model must be a Hub id in the metadata (a local path is useless there, and leaks paths)
    base_model = record.get("base_model") if _is_hub_id(record.get("base_model")) else None
    if base_model is None and _is_hub_id(info.adapter_config.get("base_model_name_or_path")):
        base_model = info.adapter_config["base_model_name_or_path"]
    if base_model is None and record.get("base_model") and "base_model" not in overrides:
        logger.warning(
            "base model %r of %s is not a Hub id: set card_data={'base_model': 'org/name'}",
            record["base_model"], repo_id,
        )
    extra_tags = overrides.pop("tags", None) or []
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *record.get("tags", []), *extra_tags]))
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": tags,
        "base_model": base_model,
        "license": record.get("license"),
        "language": record.get("language"),
        "datasets": record.get("datasets"),
    }
    meta.update(overrides)
    if info.kind == "adapter" and "peft" not in meta["tags"]:
        meta["tags"].append("peft")
    if not meta.get("license"):
        logger.warning(
            "no license for %s: set card_data={'license': ...} or 'license' in %s", repo_id, TRAINING_RECORD
        )
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})

    cfg = info.config
    architecture = (cfg.get("architectures") or [cfg.get("model_type")])[0] if cfg else None
    limitations = [
        "The model was tuned on simulated traces: tool latencies, interrupt timing and the tools "
        "themselves are synthetic, and real tools may be answered differently.",
        "Calls are only as good as the emitted arguments: validate them (hf_asynclm checks them "
        "against each tool's JSON schema, and never evaluates model output).",
        "Copying values out of interrupts (binding each result to the right call) is the hardest "
        "skill for small models; check answers that combine several results.",
        "Without the hf_asynclm runtime (plain generate) the model writes [CALL] blocks that nobody "
        "executes and then waits ([TRAP]) for results that never come.",
        *[str(x) for x in record.get("limitations", [])],
    ]
    runtime = record.get("runtime") if isinstance(record.get("runtime"), dict) else {}
    template_path = Path(template) if template is not None else _default_template()
    card = ModelCard.from_template(
        data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=record.get("model_name") or repo_id.split("/")[-1],
        description=record.get("description"),
        is_adapter=info.kind == "adapter",
        architecture=architecture,
        num_parameters=_human_count(info.num_parameters),
        dtypes=", ".join(info.dtypes) or None,
        has_cml_markers=info.has_cml_markers,
        markers={"call": CALL, "intr": INTR, "trap": TRAP, "head": HEAD, "end": END},
        data_rows=_data_rows(record),
        dataset_ids=list(record.get("datasets") or []),
        simulator_rows=_simulator_rows(record),
        training_rows=_training_rows(record),
        stage_rows=_stage_rows(record),
        total_train_time=_total_train_time(record),
        metric_rows=_metric_rows(record.get("metrics")),
        cml_example=_cml_example(),
        limitations=limitations,
        interrupt_at=runtime.get("interrupt_at"),
        constrain_calls=runtime.get("constrain_calls"),
        no_repeat_calls=runtime.get("no_repeat_calls") is True,
        complete_names=runtime.get("complete_names") is True,
        quote_numbers=runtime.get("quote_numbers") is True,
        plan_layout=runtime.get("plan_layout"),
    )
    return card


# ---------------------------------------------------------------------------------------------
# Hub access
# ---------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), read now and as ``huggingface_hub`` read it."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    chosen = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return chosen.rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the HTTP client under ``huggingface_hub`` for "could not talk to the server"."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _token_hint(token: str | bool | None) -> str:
    if token:
        return "the token given was rejected or has no access to it"
    return "pass a token (token=..., CLI --token), set HF_TOKEN, or run `hf auth login`"


def _server_message(err: Exception) -> str:
    response = getattr(err, "response", None)
    msg = getattr(err, "server_message", None)
    if not msg and response is not None:
        msg = response.headers.get("X-Error-Message")
    return f" (server said: {msg})" if msg else ""


def publish_checkpoint(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    card_data: dict[str, Any] | None = None,
    commit_message: str = "Upload CML checkpoint with hf-asynclm",
    template: str | os.PathLike[str] | None = None,
    ignore_patterns: Iterable[str] = DEFAULT_IGNORE_PATTERNS,
) -> str:
    """Publish a CML checkpoint folder to the Hub, with a rendered model card, in one commit.

    Steps: :func:`check_checkpoint_folder`; :func:`render_model_card` (metadata and tables
    from ``cml_training.json``, see :func:`read_training_record`); ``create_repo(repo_id,
    exist_ok=True, private=private)``; ``create_branch`` when ``revision`` is a branch other
    than ``main``; then one ``create_commit`` holding every file of the folder (minus
    ``ignore_patterns``: trainer state, intermediate ``checkpoint-*`` folders) and
    ``README.md``. The folder on disk is not modified; a ``README.md`` in it is replaced by
    the rendered card in the upload. Re-publishing unchanged files uploads nothing for them.

    Args:
        folder: The checkpoint folder (``save_pretrained`` output, model or PEFT adapter).
        repo_id: ``org/name`` (or ``name`` for the token's own namespace).
        token: A write token; ``None`` uses ``HF_TOKEN`` or the ``hf auth login`` token,
            ``False`` sends none.
        endpoint: The Hub URL; default ``HF_ENDPOINT`` (read now), then huggingface.co.
        private: Create the repo private (no effect on an existing repo).
        revision: Branch to commit to (created from ``main`` if missing).
        card_data: Extra or overriding card metadata, e.g. ``{"license": "apache-2.0"}``.
        commit_message: The commit title.
        template: Another model card template (Jinja, see ``model_cards/cml_model_card.md``).
        ignore_patterns: Glob patterns of files not to upload.

    Returns:
        The repo URL (e.g. ``https://huggingface.co/org/name``).

    Raises:
        InvalidCheckpointError: ``folder`` is not a checkpoint.
        HubError: Offline mode, Hub unreachable, missing or insufficient token, server error.

    Example:

    ```python
    >>> publish_checkpoint("out/cml-tiny", "my-org/cml-tiny", private=True)  # doctest: +SKIP
    'https://huggingface.co/my-org/cml-tiny'

    ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import filter_repo_objects

    info = check_checkpoint_folder(folder)
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidCheckpointError(f"invalid repo id {repo_id!r}: use ORG/NAME (letters, digits, '-', '_', '.')")
    url_base = _endpoint(endpoint)
    if _offline():
        raise HubError(
            f"cannot publish {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach {url_base}"
        )
    card = render_model_card(info.folder, repo_id, card_data=card_data, template=template, info=info)

    files = sorted(p.relative_to(info.folder).as_posix() for p in info.folder.rglob("*") if p.is_file())
    files = [f for f in filter_repo_objects(files, ignore_patterns=list(ignore_patterns)) if f != "README.md"]
    if (info.folder / "README.md").is_file():
        logger.info("%s/README.md is replaced by the rendered model card in the upload", info.folder)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(info.folder / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))

    api = HfApi(endpoint=url_base, token=token)
    where = f"{url_base}/{repo_id}"
    try:
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        logger.info("uploading %d files of %s to %s (revision %s)", len(operations), info.folder, where,
                    revision or constants.DEFAULT_REVISION)
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision
        )
    except _transport_errors() as err:
        raise HubError(
            f"cannot reach {url_base} to publish {repo_id} ({type(err).__name__}: {err}); "
            "check the network, or the endpoint (--endpoint / HF_ENDPOINT)"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"not allowed to publish to {where} (HTTP {status}): publishing needs a write token with access "
                f"to '{repo_id.split('/')[0]}'; {_token_hint(token)}{_server_message(err)}"
            ) from err
        raise HubError(f"publishing {repo_id} to {url_base} failed: {err}") from err
    logger.info("published %s at %s", repo_id, commit.commit_url)
    return str(repo_url)


def resolve_checkpoint(
    path_or_repo: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    endpoint: str | None = None,
) -> Path:
    """A local checkpoint folder for a folder path or a Hub repo id.

    An existing folder is returned as it is (resolved); it must hold ``config.json`` or
    ``adapter_config.json``. Anything else must be a repo id (``org/name``): its snapshot is
    downloaded into (or found in) the ``huggingface_hub`` cache with ``snapshot_download``
    and the snapshot folder is returned. With ``local_files_only`` (default: the
    ``HF_HUB_OFFLINE`` environment variable) nothing is downloaded and the cached snapshot must
    exist.

    Args:
        path_or_repo: A local folder, or ``org/name`` on the Hub.
        revision: Branch, tag or commit (default ``main``).
        token: Token for private or gated repos; ``None`` uses ``HF_TOKEN`` / ``hf auth login``.
        cache_dir: Hub cache folder (default ``HF_HUB_CACHE``).
        local_files_only: Use the cache only; ``None`` follows ``HF_HUB_OFFLINE``.
        endpoint: The Hub URL; default ``HF_ENDPOINT`` (read now), then huggingface.co.

    Returns:
        The checkpoint folder.

    Raises:
        InvalidCheckpointError: A local folder that is not a checkpoint, or a string that is
            neither a folder nor a repo id.
        HubError: Repo or revision not found, no access (token), offline without a cached
            copy, Hub unreachable without a cached copy.

    Example:

    ```python
    >>> import tempfile
    >>> from hf_asynclm.testing import tiny_llama, tiny_tokenizer
    >>> with tempfile.TemporaryDirectory() as d:
    ...     tiny_llama(tiny_tokenizer()).save_pretrained(d)
    ...     resolve_checkpoint(d) == Path(d).resolve()
    True
    >>> resolve_checkpoint("my-org/cml-tiny", revision="v1")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--my-org--cml-tiny/snapshots/1f2e...')

    ```
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    raw = os.fspath(path_or_repo)
    local = Path(raw).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InvalidCheckpointError(f"{local} is a file, not a checkpoint folder")
        if not ((local / "config.json").is_file() or (local / "adapter_config.json").is_file()):
            raise InvalidCheckpointError(
                f"{local} is not a checkpoint folder: it has neither config.json nor adapter_config.json"
            )
        return local.resolve()
    looks_local = raw.startswith((".", "/", "~")) or "\\" in raw or os.sep in raw.strip("/").replace("/", "", 1)
    if looks_local or not _REPO_ID.match(raw) or ".." in raw or "--" in raw:
        raise InvalidCheckpointError(
            f"{raw!r} is neither an existing folder nor a Hub repo id (ORG/NAME)"
        )

    offline = _offline() if local_files_only is None else bool(local_files_only)
    url_base = _endpoint(endpoint)
    where = f"{url_base}/{raw}"
    rev_text = f" (revision {revision!r})" if revision else ""
    logger.info("resolving %s%s from %s%s", raw, rev_text, url_base, " (cache only)" if offline else "")
    try:
        snapshot = snapshot_download(
            raw,
            revision=revision,
            token=token,
            cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            local_files_only=offline,
            endpoint=url_base,
        )
    except GatedRepoError as err:
        raise HubError(
            f"{where} is gated: accept its conditions on the repo page, then "
            f"{_token_hint(None)}{_server_message(err)}"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubError(
            f"repository {raw!r} not found on {url_base}: check the name; if it is private, "
            f"{_token_hint(token)}"
        ) from err
    except RevisionNotFoundError as err:
        raise HubError(
            f"revision {revision!r} does not exist in {where}: check the branch, tag or commit"
        ) from err
    except IncompleteSnapshotError as err:
        raise HubError(
            f"the cached copy of {raw}{rev_text} is incomplete and the Hub cannot be used to complete it; "
            f"download it again with network access (resolve_checkpoint({raw!r}) with HF_HUB_OFFLINE unset)"
        ) from err
    except LocalEntryNotFoundError as err:
        cache = os.fspath(cache_dir) if cache_dir is not None else "the Hugging Face cache (HF_HUB_CACHE)"
        if offline or isinstance(err.__cause__, OfflineModeIsEnabled):
            why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
            raise HubError(
                f"{raw}{rev_text} is not in {cache} and downloads are disabled ({why}). Download it once while "
                f"online (`hf download {raw}`, or resolve_checkpoint({raw!r}) without HF_HUB_OFFLINE), "
                "or pass a local checkpoint folder"
            ) from err
        raise HubError(
            f"cannot reach {url_base} and {raw}{rev_text} is not in {cache}: check the network or the endpoint "
            f"(HF_ENDPOINT), or pass a local checkpoint folder ({err.__cause__ or err})"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise HubError(f"not allowed to read {where} (HTTP {status}): {_token_hint(token)}") from err
        raise HubError(f"downloading {raw} from {url_base} failed: {err}") from err
    path = Path(snapshot)
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise InvalidCheckpointError(
            f"{where}{rev_text} is not a checkpoint: it has neither config.json nor adapter_config.json"
        )
    return path
