"""Entry point of the ``hf-asynclm`` click app.

Commands live in their own modules and are imported only when needed (``hf-asynclm --help``
stays fast: no torch import). A command whose module is not installed is simply absent; an
error raised while importing a module that exists is a real error and is not hidden.

Example:

```python
>>> from click.testing import CliRunner
>>> from hf_asynclm_cli.main import app
>>> result = CliRunner().invoke(app, ["--help"])
>>> result.exit_code, "run" in result.output
(0, True)

```
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click

#: Command name -> module that defines it (a click command or group of that name), in the
#: order ``--help`` lists them: the workflow from trying a model to publishing one.
COMMAND_MODULES: dict[str, str] = {
    "run": "hf_asynclm_cli.run_cmd",
    "chat": "hf_asynclm_cli.chat_cmd",
    "data": "hf_asynclm_cli.data_cmd",
    "train": "hf_asynclm_cli.train_cmd",
    "average": "hf_asynclm_cli.average_cmd",
    "eval": "hf_asynclm_cli.eval_cmd",
    "bench": "hf_asynclm_cli.bench_cmd",
    "publish": "hf_asynclm_cli.publish_cmd",
}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def load_command(name: str, module: str) -> click.Command | None:
    """The click command ``name`` defined in ``module``; None when the module does not exist.

    Raises whatever importing an existing module raises, and ``RuntimeError`` when the
    module defines no command of that name.
    """
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the command module itself is not there: the command is absent
            return None
        raise
    for value in vars(mod).values():
        if isinstance(value, click.Command) and value.name == name:
            return value
    raise RuntimeError(f"{module} defines no click command named {name!r}")


class LazyGroup(click.Group):
    """A click group that imports each command's module on first use."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, module in self.lazy_commands.items() if name not in self.commands and _module_exists(module)]
        return lazy + sorted(self.commands)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        module = self.lazy_commands.get(cmd_name)
        if module is None:
            return None
        command = load_command(cmd_name, module)
        if command is not None:
            self.commands[cmd_name] = command
        return command


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMAND_MODULES,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  hf-asynclm run "What's the weather in Paris and in Oslo?"
  hf-asynclm run "Book me a flight NYC to Rome on Friday" --compare --timeline timeline.png
  hf-asynclm chat --model my-org/cml-gemma-270m
\b
Run `hf-asynclm COMMAND --help` for a command's options and examples.
""",
)
@click.version_option(package_name="hf-asynclm", prog_name="hf-asynclm")
def app() -> None:
    """Asynchronous function calling for Hugging Face transformers models.

    The model writes a call ([CALL] id [HEAD] fn(args) [END]), keeps generating while it
    runs, and gets the result injected as an interrupt ([INTR] id [HEAD] value [END]).
    """


def main() -> None:
    app(prog_name="hf-asynclm")


if __name__ == "__main__":
    main()
