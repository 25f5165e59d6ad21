"""``hf-asynclm train``: train a CML checkpoint from simulator traces (JSONL).

Also runnable on its own, which is what ``accelerate launch`` needs for several GPUs::

    accelerate launch --multi_gpu --num_processes 4 -m hf_asynclm_cli.train_cmd --data traces.jsonl --out ckpt ...
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from .common import one_line

EPILOG = """\b
Examples:
  # a ~3.5M-parameter model from scratch (CPU is fine)
  hf-asynclm train --data traces.jsonl --out ckpt/tiny --preset tiny --steps 2000
\b
  # LoRA on a pretrained base (markers added as special tokens), then merge
  hf-asynclm train --data train.jsonl,extra.jsonl --out ckpt/llama1b \\
      --base meta-llama/Llama-3.2-1B-Instruct --lora --merge --steps 1000
\b
  # continue an interrupted run from its last checkpoint
  hf-asynclm train --data traces.jsonl --out ckpt/tiny --preset tiny --steps 2000 --resume
"""


@click.command("train", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", required=True, multiple=True, metavar="FILE[,FILE]",
              help="Training traces (JSONL from the simulator); repeat the option or separate with commas for several.")
@click.option("--out", "output_dir", required=True, metavar="DIR", help="Output directory (checkpoints and the final model).")
@click.option("--base", "base_model", default=None, metavar="MODEL", help="Fine-tune this base (Hub id or local dir) instead of training from scratch.")
@click.option("--lora", is_flag=True, default=None, help="LoRA fine-tuning of --base (marker embedding rows trained too).")
@click.option("--lora-r", type=click.IntRange(min=1), default=None, help="LoRA rank [16].")
@click.option("--merge", "merge_lora", is_flag=True, default=None, help="Also merge the LoRA adapter into a full model (adapter kept in DIR/adapter).")
@click.option("--preset", type=click.Choice(["tiny", "micro", "lora"]), default=None, help="Named settings (tiny: ~3.5M-parameter model from scratch); explicit options win.")
@click.option("--steps", "max_steps", type=int, default=None, help="Optimizer steps [1000]; 0 to train --epochs instead.")
@click.option("--epochs", "num_epochs", type=click.FloatRange(min=0, min_open=True), default=None, help="Epochs, when --steps is 0.")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate [tiny preset 1e-3, other scratch 2e-3, LoRA 2e-4, full 2e-5].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Examples per device per step [8].")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help="Gradient accumulation steps [1].")
@click.option("--max-length", type=click.IntRange(min=8), default=None, help="Longest example in tokens; longer ones are skipped [1024].")
@click.option("--truncate", is_flag=True, default=None, help="Truncate over-long examples instead of skipping them.")
@click.option("--pad-to-multiple-of", type=click.IntRange(min=1), default=None,
              help="Pad each batch to a multiple of this many tokens. Fewer distinct shapes keep CPU kernel caches small "
              "(a long bf16 run on CPU slowed down over time without it) [no extra padding].")
@click.option("--warmup", type=click.FloatRange(min=0), default=None, help="Warmup: fraction of the steps (<1) or steps (>=1) [0.05].")
@click.option("--schedule", "lr_scheduler", type=click.Choice(["cosine", "linear", "constant_with_warmup", "cosine_with_min_lr"]), default=None, help="Learning-rate schedule [cosine].")
@click.option("--num-layers", type=click.IntRange(min=1), default=None, help="From scratch: decoder layers [tiny: 4].")
@click.option("--hidden-size", type=click.IntRange(min=8), default=None, help="From scratch: model width [tiny: 256].")
@click.option("--num-heads", type=click.IntRange(min=1), default=None, help="From scratch: attention heads (must divide --hidden-size) [tiny: 4].")
@click.option("--intermediate-size", type=click.IntRange(min=8), default=None, help="From scratch: MLP width [tiny: 768].")
@click.option("--vocab-size", type=click.IntRange(min=268), default=None, help="Tokenizer size when training from scratch [512].")
@click.option("--digit-group", type=click.IntRange(min=1, max=3), default=None, help="From scratch: digits per token at most (1: one digit per token) [1].")
@click.option("--tokenizer", default=None, metavar="DIR", help="From scratch: use this saved CML tokenizer (e.g. an earlier stage's) instead of training one.")
@click.option("--dtype", "model_dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default=None, help="dtype to load --base in [float32].")
@click.option("--bf16/--no-bf16", "bf16", default=None,
              help="bfloat16 mixed precision (fp32 master weights) [on where the GPU supports it]. On CPUs with "
              "avx512_bf16 or AMX it also speeds training up (about 2x on a 2-core EPYC: benchmarks/train_step_speed.py).")
@click.option("--call-id-weight", "call_id_loss_weight", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight of the loss on the call ids written after [CALL] (where the model picks which planned call starts next) [1].")
@click.option("--save-steps", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps [500].")
@click.option("--logging-steps", type=click.IntRange(min=1), default=None, help="Log the loss every N steps [10].")
@click.option("--seed", type=int, default=None, help="Random seed [0].")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Recompute activations to save memory.")
@click.option("--resume", is_flag=True, default=None, help="Continue from the last checkpoint in --out.")
@click.option("--overwrite", is_flag=True, default=None, help="Delete earlier checkpoints in --out and start over.")
@click.option("--interrupt-at", type=click.Choice(["token", "word", "sentence", "sentence-eager"]), default=None,
              help="What the checkpoint records for where the runtime puts results: word, or sentence for a model "
              "trained on paced traces (hf-asynclm data build --interrupt-at sentence) [word].")
@click.option("--constrain-calls", type=click.Choice(["off", "schema", "grounded"]), default=None,
              help="What the checkpoint records for the runtime's constrained calls (cml_training.json; AsyncLM.from_pretrained and the CLI use it) [schema].")
@click.option("--no-repeat-calls", is_flag=True, default=None,
              help="Also record no_repeat_calls: the runtime steers the model away from repeating a call it has made (needs --constrain-calls schema or grounded).")
@click.option("--complete-names", is_flag=True, default=None,
              help="Also record complete_names: the runtime does not let the model end a name from the conversation early in its text.")
@click.option("--quote-numbers", is_flag=True, default=None,
              help="Also record quote_numbers: the runtime does not let the model write a number its conversation lacks in its text.")
@click.option("--plan-layout", type=click.Choice(["call-first", "time-first"]), default=None,
              help="What the checkpoint records for the layout of its cheat-sheet plans: the one the data was built "
              "with (hf-asynclm data build --plan-layout); eval and bench write its plans that way [call-first].")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def train_command(quiet: bool, **options: Any) -> None:
    """Train a CML checkpoint: a tiny model from scratch, or fine-tune --base (full or --lora).

    The loss is only on what the model writes (not on the prompt or injected interrupts). The
    result in --out loads with AutoModelForCausalLM (or, for an unmerged LoRA adapter, with
    hf_asynclm.training.load_trained) and holds cml_training.json.
    """
    from hf_asynclm.training.dataset import ExampleError
    from hf_asynclm.training.train import TrainConfig, train

    preset = options.pop("preset")
    options["data"] = list(options["data"])  # repeated and comma-separated: TrainConfig.data_files splits
    # flags not given are left to the preset / defaults (click may report them as False)
    given = {k: v for k, v in options.items() if v is not None and (v is not False or k == "bf16")}
    if given.get("max_steps") == 0:
        given["max_steps"] = -1
    restore = _setup_logging(quiet)
    try:
        config = TrainConfig.from_preset(preset, **given) if preset else TrainConfig(**given)
        config.validate()
        out = train(config)
    except (ValueError, FileNotFoundError, ImportError, ExampleError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    finally:
        restore()
    if os.environ.get("RANK", "0") == "0":  # one line, also under accelerate / torchrun
        click.echo(f"saved {out}")


def _setup_logging(quiet: bool) -> Any:
    """Log hf_asynclm's progress (rich) for the duration of the command; returns the undo."""
    level = logging.WARNING if quiet else logging.INFO
    log = logging.getLogger("hf_asynclm")
    old_level, old_propagate = log.level, log.propagate
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, show_time=False)
    except ImportError:  # pragma: no cover - rich is a dependency
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate

    return restore


def main() -> None:
    train_command()


if __name__ == "__main__":
    main()
