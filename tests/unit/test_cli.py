"""The ``sumstream`` command: every subcommand loads, and ``--help`` imports none of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.ops.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_loads_a_module_with_add_arguments_and_run(name: str) -> None:
    loader, _help = COMMANDS[name]
    command = loader()
    assert callable(command.add_arguments)
    assert callable(command.run)


def test_help_lists_every_subcommand_without_importing_any() -> None:
    probe = (
        "import sys\n"
        "from pipeline.ops.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "ours = [m for m in sys.modules if m.startswith(('pipeline.', 'gateway'))]\n"
        "print('LOADED', sorted(set(ours) - {'pipeline.ops', 'pipeline.ops.cli'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert name in result.stdout
    assert "LOADED []" in result.stdout
