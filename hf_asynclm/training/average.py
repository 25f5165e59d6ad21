"""Weight averaging ("model soup") of CML checkpoints fine-tuned from one base.

Several fine-tunings of one base (different data mixes, seeds or step counts) often land in
one basin of the loss: the element-wise average of their weights is then a model that keeps
much of what each learnt, sometimes more than any of them (Wortsman et al. 2022, "Model
soups"). :func:`average_checkpoints` writes that average as a new checkpoint folder, with the
first input's config, tokenizer, chat template and generation config, and a
``cml_training.json`` that says what was averaged (``averaged_from``).

What it refuses, with an error that says why: fewer than two inputs; LoRA adapter folders
(averaging the A and B factors is not averaging the updates: merge each adapter first,
``hf-asynclm train ... --merge``); inputs whose weights differ in names, shapes or
integer values; inputs with different tokenizers or architectures; inputs made for different
runtime settings (``cml_training.json`` -> ``runtime``); weights that are negative or sum to 0.

The weights are read one tensor at a time (``safetensors.safe_open``) and summed in float32,
so the memory needed is about one model in float32, whatever the number of inputs.

Example:

```python
>>> import tempfile, torch
>>> from pathlib import Path
>>> from safetensors.torch import load_file
>>> from hf_asynclm.testing import tiny_llama, tiny_tokenizer
>>> from hf_asynclm.training.average import average_checkpoints
>>> tok = tiny_tokenizer()
>>> d = Path(tempfile.mkdtemp())
>>> for seed in (0, 1):
...     tiny_llama(tok, seed=seed).save_pretrained(d / f"m{seed}")
...     _ = tok.save_pretrained(d / f"m{seed}")
>>> out = average_checkpoints([d / "m0", d / "m1"], d / "avg", weights=[3, 1])
>>> a, b, avg = (load_file(str(p / "model.safetensors")) for p in (d / "m0", d / "m1", out))
>>> key = "model.norm.weight"
>>> torch.allclose(avg[key], 0.75 * a[key] + 0.25 * b[key])
True

```
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["average_checkpoints"]

#: config.json keys that may differ between inputs (they do not change what the weights mean)
_CONFIG_KEYS_FREE = {"dtype", "torch_dtype", "_name_or_path", "transformers_version", "use_cache"}
_TOKENIZER_FILE = "tokenizer.json"
_RECORD = "cml_training.json"


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _check_input(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is a LoRA adapter: averaging the A and B factors is not averaging the updates; "
            "merge each adapter into its base first (hf-asynclm train ... --merge, or peft's merge_and_unload)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    if not _weight_files(folder):
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights (re-save it with save_pretrained(..., safe_serialization=True))"
        )


def _config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _CONFIG_KEYS_FREE}


def _record(folder: Path) -> dict[str, Any]:
    path = folder / _RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return record if isinstance(record, dict) else {}


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} checkpoints: give one weight per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights sum to {total}: at least one must be > 0")
    return [w / total for w in weights]


def average_checkpoints(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the weighted average of the weights of ``inputs`` as a checkpoint in ``output_dir``.

    Args:
        inputs: Two or more full-model checkpoint folders (``config.json`` and ``*.safetensors``)
            of one architecture and tokenizer, best fine-tuned from one base.
        output_dir: The new checkpoint folder; it gets the first input's other files (config,
            tokenizer, chat template, generation config; not its ``checkpoint-*`` folders).
        weights: One weight per input (normalised to sum to 1); default: a uniform average.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the floating-point weights
            written; default: each tensor's dtype in the first input.
        overwrite: Replace ``output_dir`` if it exists.

    Returns:
        ``output_dir``. Its ``cml_training.json`` is the first input's record (runtime,
        tokenizer facts) with ``mode: "average"``, ``averaged_from`` (each input's path, weight,
        base, steps, learning rate, data files and training time), ``data_files`` the inputs' union
        and ``train_time_s`` the inputs' sum; the first input's own run (its settings, loss and
        trace statistics) is left out.

    Raises:
        ValueError: fewer than two inputs, bad weights or dtype, an adapter folder, or inputs
            that differ in architecture, tokenizer, weight names, shapes or runtime settings.
        FileNotFoundError: an input that is not a checkpoint folder.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is False.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    folders = [Path(p) for p in inputs]
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(folders)}")
    w = _normalised(weights, len(folders))
    target = None
    if dtype is not None:
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', got {dtype!r}")
        target = getattr(torch, dtype)
    out = Path(output_dir)
    resolved = {f.resolve() for f in folders}
    if out.resolve() in resolved:
        raise ValueError(f"{out} is one of the inputs: write the average to a new folder")
    for f in folders:
        _check_input(f)

    first = folders[0]
    config0, files0 = _config(first), _weight_files(first)
    tok0 = (first / _TOKENIZER_FILE).read_bytes() if (first / _TOKENIZER_FILE).is_file() else None
    records = [_record(f) for f in folders]
    runtime0 = records[0].get("runtime")
    for f, record in zip(folders[1:], records[1:]):
        config = _config(f)
        if config != config0:
            diff = sorted(k for k in set(config) | set(config0) if config.get(k) != config0.get(k))
            raise ValueError(f"{f} and {first} differ in config.json ({', '.join(diff)}): only one architecture can be averaged")
        if _weight_files(f) != files0:
            raise ValueError(f"{f} and {first} have different weight files: {_weight_files(f)} vs {files0}")
        tok = (f / _TOKENIZER_FILE).read_bytes() if (f / _TOKENIZER_FILE).is_file() else None
        if tok != tok0:
            raise ValueError(f"{f} and {first} have different tokenizers ({_TOKENIZER_FILE}): token ids would not match")
        if record.get("runtime") != runtime0:
            raise ValueError(
                f"{f} and {first} were trained for different runtime settings "
                f"({record.get('runtime')} vs {runtime0} in {_RECORD}): average checkpoints made for one runtime"
            )
        if record.get("base_model") != records[0].get("base_model"):
            logger.warning(
                "%s was fine-tuned from %r, %s from %r: an average is only meaningful for fine-tunings of one base",
                f, record.get("base_model"), first, records[0].get("base_model"),
            )

    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass overwrite=True (CLI --overwrite) to replace it")
        shutil.rmtree(out)
    started = time.monotonic()
    averaged: dict[str, dict[str, Any]] = {}
    for name in files0:
        handles = [safe_open(str(f / name), framework="pt") for f in folders]
        keys = set(handles[0].keys())
        for f, h in zip(folders[1:], handles[1:]):
            if set(h.keys()) != keys:
                missing = sorted(keys ^ set(h.keys()))[:5]
                raise ValueError(f"{f}/{name} and {first}/{name} hold different tensors (e.g. {missing})")
        tensors: dict[str, Any] = {}
        for key in sorted(keys):
            ref = handles[0].get_tensor(key)
            parts = [ref] + [h.get_tensor(key) for h in handles[1:]]
            for f, t in zip(folders[1:], parts[1:]):
                if t.shape != ref.shape:
                    raise ValueError(f"{key}: shape {tuple(t.shape)} in {f}, {tuple(ref.shape)} in {first}")
            if ref.is_floating_point():
                acc = torch.zeros(ref.shape, dtype=torch.float32)
                for wi, t in zip(w, parts):
                    acc.add_(t.to(torch.float32), alpha=wi)
                tensors[key] = acc.to(target or ref.dtype).contiguous()
            else:  # integer buffers (e.g. position ids) must agree
                for f, t in zip(folders[1:], parts[1:]):
                    if not torch.equal(t, ref):
                        raise ValueError(f"{key}: integer tensor differs between {f} and {first}")
                tensors[key] = ref.contiguous()
        averaged[name] = tensors

    shutil.copytree(first, out, ignore=shutil.ignore_patterns("checkpoint-*", "runs", "*.safetensors", _RECORD))
    for name, tensors in averaged.items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        (out / name).chmod(0o644)
    if target is not None:  # the config says what the weights now are
        config = json.loads((out / "config.json").read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    record = dict(records[0])
    record.pop("loss_history", None)  # the first input's curve is not the average's
    record.update({
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "average",
        "averaged_from": [
            {
                "path": str(f),
                "weight": wi,
                "base_model": r.get("base_model"),
                "mode": r.get("mode"),
                "steps": r.get("steps"),
                "data_files": r.get("data_files"),
                "train_time_s": r.get("train_time_s"),
                "learning_rate": (r.get("config") or {}).get("learning_rate") if isinstance(r.get("config"), dict) else None,
            }
            for f, wi, r in zip(folders, w, records)
        ],
        "data_files": list(dict.fromkeys(str(x) for r in records for x in (r.get("data_files") or []))),
    })
    times = [r.get("train_time_s") for r in records]
    record["train_time_s"] = round(sum(times), 2) if all(isinstance(t, (int, float)) for t in times) else None
    for key in ("steps", "epochs", "final_train_loss", "mean_train_loss", "train_loop_s", "resumed_from", "examples",
                "dataset", "config", "simulator"):
        record.pop(key, None)  # facts of one training run (its settings, its traces), not of the average
    (out / _RECORD).write_text(json.dumps(record, indent=2) + "\n")
    logger.info(
        "averaged %d checkpoints (weights %s) into %s in %.1f s",
        len(folders), ", ".join(f"{x:.3g}" for x in w), out, time.monotonic() - started,
    )
    return out
