"""``hf-asynclm average``: the weighted average of checkpoints fine-tuned from one base."""

from __future__ import annotations

import click

from .common import one_line

EPILOG = """\b
Examples:
  # a uniform "model soup" of two stage-3 runs from one stage 2
  hf-asynclm average soup ckpt/stage3-a ckpt/stage3-b
\b
  # weight the first twice as much, write float16 (half the size)
  hf-asynclm average soup ckpt/a ckpt/b --weights 2,1 --dtype float16
"""


def _weights(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, e.g. 2,1; got {value!r}") from None


@click.command("average", epilog=EPILOG, short_help="Average the weights of checkpoints of one base (a model soup).", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("output_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.argument("inputs", metavar="CHECKPOINT...", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--weights", callback=_weights, metavar="W1,W2,...", help="One weight per checkpoint (normalised) [uniform].")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="dtype of the written weights [the first checkpoint's].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def average_command(output_dir: str, inputs: tuple[str, ...], weights: list[float] | None, dtype: str | None, overwrite: bool) -> None:
    """Average the weights of CHECKPOINT... (full models of one architecture and tokenizer,
    best fine-tuned from one base) into a new checkpoint OUT.

    OUT gets the first checkpoint's config, tokenizer and chat template, and a
    cml_training.json that lists what was averaged. LoRA adapters must be merged first.
    """
    from hf_asynclm.training.average import average_checkpoints

    try:
        out = average_checkpoints(list(inputs), output_dir, weights=weights, dtype=dtype, overwrite=overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"saved {out}")
