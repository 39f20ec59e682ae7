"""Every option of `ffai` explains itself in `--help`."""

from __future__ import annotations

import click

from ffai_client.cli import main


def test_every_ffai_option_has_help_text() -> None:
    missing = [
        f"ffai {name} {'/'.join(param.opts)}"
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert main.commands, "no commands found"
    assert not missing, missing
