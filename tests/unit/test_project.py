"""The README's two set-up commands are the ones CI runs, the CLI lists its commands, and the
guards of tests/conftest.py hold: a unit test starts no server, a leak fails the leaking test."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperGroup
from typer.testing import CliRunner

from medvlm.cli import app

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README has no command block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_both() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci.splitlines(), f"CI does not run README command: {command}"


# Written out, not read from the app: a new command is added here too, on purpose.
COMMANDS: dict[tuple[str, ...], set[str]] = {
    (): {
        "model",
        "serve",
        "run",
        "demo",
        "draft-one",
        "fairness",
        "deploy",
        "settings",
        "dev",
        "db",
        "check",
        "ref",
        "tasks",
        "status",
        "watch",
    },
    ("model",): {"build-tiny"},
    ("dev",): {"up", "down", "status"},
    ("db",): {"upgrade", "current"},
}


@pytest.mark.parametrize("group", sorted(COMMANDS), ids=lambda g: " ".join(("medvlm", *g)))
def test_cli_registers_and_lists_exactly_the_known_commands(group: tuple[str, ...]) -> None:
    command = typer.main.get_command(app)
    for name in group:
        assert isinstance(command, TyperGroup)
        command = command.commands[name]
    assert isinstance(command, TyperGroup)
    assert set(command.commands) == COMMANDS[group]

    result = CliRunner().invoke(app, [*group, "--help"])
    assert result.exit_code == 0, result.output
    for name in COMMANDS[group]:
        # A row of the commands table: the name after the border (not an option's "--"), then
        # the column gap.
        assert re.search(rf"^[^\w-]*{re.escape(name)}\s{{2,}}\S", result.output, re.M), name


def test_a_unit_test_that_asks_for_a_server_fails_before_the_server_starts(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nmarkers =\n    unit: u\n    lint: l\n")
    pytester.makeconftest(
        """
        import pytest
        from tests.conftest import pytest_runtest_setup

        @pytest.fixture
        def serve_url():
            raise AssertionError("the server fixture ran")

        @pytest.fixture
        def model_client(serve_url):
            return serve_url
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.unit
        def test_pure():
            pass

        @pytest.mark.unit
        def test_through_another_fixture(model_client):
            pass

        @pytest.mark.unit
        @pytest.mark.lint
        def test_type_checker():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*unit test starts no server, but this one uses serve_url*"])
    result.stdout.fnmatch_lines(["*unit or lint, not both*"])
    result.stdout.no_fnmatch_line("*the server fixture ran*")


def test_a_leaked_socket_fails_the_test_that_leaked_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makeconftest(
        """
        from tests.conftest import (
            _collect_the_garbage_of_each_test,
            pytest_collection_finish,
            pytest_fixture_post_finalizer,
            pytest_sessionfinish,
        )
        """
    )
    pytester.makepyfile(
        """
        import socket

        def test_leaks():
            cycle = {"socket": socket.socket()}
            cycle["itself"] = cycle  # garbage only the cyclic collector can free

        def test_runs_next():
            pass
        """
    )
    gc.disable()  # no collection at a moment of the collector's choosing: only the guard's
    try:
        result = pytester.runpytest("-p", "no:cacheprovider")
    finally:
        gc.enable()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks*", "*unclosed <socket.socket*"])
