"""Entry point of the ``hf-asynclm`` click app."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hf-asynclm")
def app() -> None:
    """Asynchronous function calling for Hugging Face transformers models."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
