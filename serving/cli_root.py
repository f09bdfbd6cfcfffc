"""The `moea` command line root: the one module that composes every package's commands.

It sits above every package (registry <- moe_adapters <- serving <- this module): each package owns
its own command file (`moe_adapters/cli.py`, `moe_adapters/eval_cli.py`, `moe_adapters/export_cli.py`,
`moe_adapters/feedback_cli.py`, `registry/cli.py`, `serving/cli.py`, `serving/ab/cli.py`, `serving/demo.py`)
and this module only mounts them. Console
entry point `moea`; also `python -m serving.cli_root`.
"""

from __future__ import annotations

import sys

import click

from moe_adapters.cli import base_group, train
from moe_adapters.eval_cli import eval_command
from moe_adapters.export_cli import export_command
from moe_adapters.feedback_cli import feedback_group
from moe_adapters.gate_cli import gated_promote_command
from registry.cli import register_command, registry_group
from registry.errors import user_facing_errors
from serving.ab.cli import ab_group
from serving.cli import serve_command
from serving.demo import demo_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moea")
def moea() -> None:
    """Train LoRA experts per task, route between them, register and serve them."""


# The registry cannot run models, so its own `promote` is ungated; the gated one (it evaluates with
# moe_adapters) takes its place in `moea registry` here, at the top where both layers are visible. A copy
# of the group, so registry.cli's own group (`python -m registry.cli`) stays as it is.
registry_commands = click.Group(
    registry_group.name,
    commands={**registry_group.commands, "promote": gated_promote_command},
    help=registry_group.help,
)

for _command in (
    base_group,
    train,
    register_command,
    registry_commands,
    serve_command,
    ab_group,
    eval_command,
    export_command,
    feedback_group,
    demo_command,
):
    moea.add_command(_command)


def main() -> None:
    """Console entry point: run the group, turning moea's own errors into one-line messages."""
    with user_facing_errors():
        moea.main(standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main())
