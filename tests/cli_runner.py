"""The one way tests run the command line and check a refusal."""
from __future__ import annotations

from click.testing import CliRunner

from shortcut_fast.cli import main


def run_cli(*args):
    """`shortcut-fast ARGS` in this process; an exception that escapes the CLI (a traceback)
    fails the test (catch_exceptions=False)."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_refused(result, status: int, *names: str) -> str:
    """Exit `status`, no traceback, exactly one `Error:` line, and that line (the last one)
    naming each of `names`. Returns the line."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == status, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one Error: line, got {errors}"
    for name in names:
        assert name in lines[-1], f"{name!r} not in {lines[-1]!r}"
    return lines[-1]
