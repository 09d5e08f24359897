"""``artrt`` command line: one module per command (export, build, generate, info, sample, demo,
bench, serve), each with ``add_parser(sub)`` and ``run(args)``.

Arguments are parsed once here into plain values. Errors a user can cause end with
one ``artrt: error: ...`` line on stderr and exit status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from artrt.errors import ArtrtError

from .options import configure_logging

log = logging.getLogger("artrt")

COMMANDS = ("export", "build", "generate", "info", "sample", "demo", "bench", "serve")  # modules of this package


def command(name: str) -> ModuleType:
    """The module of one command (imported on use, so ``artrt info`` does not load the others)."""
    return importlib.import_module(f"{__name__}.{name}")


def _quiet_option() -> argparse.ArgumentParser:
    """``-q`` accepted after the subcommand too (SUPPRESS: it never resets one given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="only print errors")
    return parent


class _SubParsers(argparse._SubParsersAction):
    """Every subcommand also takes ``-q``."""

    def add_parser(self, name: str, **kwargs):  # type: ignore[no-untyped-def, override]
        kwargs.setdefault("parents", []).append(_quiet_option())
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    import artrt

    parser = argparse.ArgumentParser(
        prog="artrt",
        description="Lean runtime for two-expert text-to-image diffusion models: a composition expert "
        "for high noise, a detail expert for low noise, switched mid-sampling.",
    )
    parser.add_argument("--version", action="version", version=f"artrt {artrt.__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="only print errors")
    parser.register("action", "parsers", _SubParsers)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        command(name).add_parser(sub)
    return parser


def _check_common(args: argparse.Namespace) -> None:
    """Checks shared by every command that has the option."""
    from artrt.engines.ort import max_threads
    from artrt.runtime.arguments import check_int

    if getattr(args, "threads", None) is not None:
        check_int("--threads", args.threads, 1, max_threads())
    if getattr(args, "vae_tiles", None) is not None:
        from .options import check_memory_options

        check_memory_options(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    configure_logging(args.quiet)
    try:
        _check_common(args)
        command(args.command).run(args)
    except ArtrtError as exc:
        print(f"artrt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("artrt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'artrt info PKG | head': the reader has what it wanted
        sys.stdout = open(os.devnull, "w")
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
