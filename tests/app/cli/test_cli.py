"""`lookout --version`, and every command's `--help` says what it does and its defaults."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

import pytest

from app.cli.main import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every command and nested command, by its full name ("webhooks list")."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in _subcommands(sub).items()})
    return found


def test_version_is_the_installed_distributions() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == f"lookout {importlib.metadata.version('lookout')}"


def test_every_command_says_what_it_does() -> None:
    commands = _subcommands(build_parser())
    assert {"serve", "demo", "migrate", "users create", "tail", "webhooks list"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, f"`lookout {name} --help` does not say what it does"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("serve", ["(default: 127.0.0.1)", "(default: 8000)"]),
        ("demo", ["(default: 8000)"]),
        ("webhooks list", ["(default: 100)"]),
        ("tail", ["LOOKOUT_PUBLIC_URL", "LOOKOUT_API_KEY"]),
    ],
)
def test_help_shows_the_defaults(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*command.split(), "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in shown:
        assert expected in text
