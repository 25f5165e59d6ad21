"""``hf-asynclm publish``: push a CML checkpoint folder, with its model card, to the Hub.

Wired into the app with ``app.add_command(publish)`` (see ``cli/main.py``).

Example:

```python
>>> from click.testing import CliRunner
>>> from hf_asynclm_cli.publish_cmd import publish
>>> result = CliRunner().invoke(publish, ["/no/such/folder", "--repo-id", "org/name"])
>>> result.exit_code, result.output.splitlines()[-1].startswith("Error: not a checkpoint folder")
(1, True)

```
"""

from __future__ import annotations

import logging

import click

logger = logging.getLogger(__name__)


@click.command(
    "publish",
    epilog="""\b
Examples:
  hf-asynclm publish out/cml-tiny --repo-id my-org/cml-tiny
  HF_TOKEN=hf_... hf-asynclm publish out/cml-gemma --repo-id my-org/cml-gemma-270m --private
  hf-asynclm publish out/run2 --repo-id my-org/cml-tiny --revision v2 --endpoint http://127.0.0.1:8080

\b
The folder must hold config.json and *.safetensors weights (or a PEFT adapter:
adapter_config.json + adapter_model.safetensors) and the tokenizer files. Metrics and
training facts for the card are read from cml_training.json in the folder, if present.
""",
)
@click.argument("path", type=click.Path(path_type=str))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository to create or update.")
@click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="Write token. Default: HF_TOKEN, then the token of `hf auth login` (both better than this "
    "flag, which leaves the token in your shell history).",
)
@click.option("--endpoint", default=None, metavar="URL", help="Hub URL. Default: HF_ENDPOINT, then huggingface.co.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created from main if missing).")
@click.option(
    "--license",
    "license_",
    default=None,
    metavar="ID",
    help="License id for the card metadata (e.g. apache-2.0), if cml_training.json does not say.",
)
@click.option(
    "--base-model",
    default=None,
    metavar="ORG/NAME",
    help="Hub id of the model that was fine-tuned, for the card metadata (when cml_training.json names a "
    "local folder).",
)
@click.option(
    "--message",
    "-m",
    "commit_message",
    default="Upload CML checkpoint with hf-asynclm",
    show_default=True,
    help="Commit message.",
)
def publish(
    path: str,
    repo_id: str,
    token: str | None,
    endpoint: str | None,
    private: bool,
    revision: str | None,
    license_: str | None,
    base_model: str | None,
    commit_message: str,
) -> None:
    """Publish the checkpoint folder PATH to the Hugging Face Hub with a rendered model card."""
    from hf_asynclm.hub import HubError, InvalidCheckpointError, publish_checkpoint

    try:
        url = publish_checkpoint(
            path,
            repo_id,
            token=token,
            endpoint=endpoint,
            private=private,
            revision=revision,
            card_data={k: v for k, v in (("license", license_), ("base_model", base_model)) if v} or None,
            commit_message=commit_message,
        )
    except (InvalidCheckpointError, HubError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(url)
