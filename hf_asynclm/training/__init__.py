"""Training CML checkpoints: data (simulator JSONL -> tokens), tokenizer, Trainer loop.

* :mod:`~hf_asynclm.training.dataset` -- ``tokenize_example`` (the exact tokenisation rule the
  runtime follows), the dataset and the padding collator.
* :mod:`~hf_asynclm.training.tokenizer` -- ``build_cml_tokenizer``: a small byte-level BPE for
  models trained from scratch.
* :mod:`~hf_asynclm.training.train` -- ``TrainConfig`` and ``train``: a tiny Llama from scratch,
  or full / LoRA fine-tuning of a pretrained base; ``load_trained``; ``convert_gguf_base``.
* :mod:`~hf_asynclm.training.average` -- ``average_checkpoints``: the weighted average
  ("model soup") of checkpoints fine-tuned from one base.

Heavy imports (torch, transformers, peft) happen when the functions run, not on import.
"""

from .dataset import (
    IGNORE_INDEX,
    CMLCollator,
    CMLDataset,
    ExampleError,
    ExampleTooLong,
    encode_prompt,
    load_cml_dataset,
    read_jsonl,
    render_prompt,
    tokenize_example,
)
from .average import average_checkpoints
from .tokenizer import build_cml_tokenizer
from .train import PRESETS, TrainConfig, convert_gguf_base, load_trained, train

__all__ = [
    "IGNORE_INDEX",
    "CMLCollator",
    "CMLDataset",
    "ExampleError",
    "ExampleTooLong",
    "PRESETS",
    "TrainConfig",
    "average_checkpoints",
    "build_cml_tokenizer",
    "convert_gguf_base",
    "encode_prompt",
    "load_cml_dataset",
    "load_trained",
    "read_jsonl",
    "render_prompt",
    "tokenize_example",
    "train",
]
