"""Shared by the CLI tests: the shipped demo package and the one error line of a failing command."""

from __future__ import annotations

from pathlib import Path

from artrt.runtime.cli import main

DEMO = Path(__file__).resolve().parents[1] / "demo" / "package"


def error_line(capsys, *argv) -> str:
    """The one ``artrt: error:`` line of a command that must fail with status 1."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("artrt: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
