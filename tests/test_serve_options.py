"""``artrt serve``'s options, parsed and checked without starting a server: the formats ``--help``
shows, one ``artrt: error:`` line naming the flag for a bad value, and the help and docs naming
every request field the server accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from artrt.errors import InputError
from artrt.runtime.cli import build_parser, main
from artrt.runtime.cli.serve import parse_bytes, parse_pixels, settings
from artrt.runtime.serve.protocol import ARTRT_FIELDS, IGNORED_FIELDS, OPENAI_FIELDS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def serve_settings(*options: str):
    return settings(build_parser().parse_args(["serve", "--demo", *options]))


@pytest.mark.parametrize("value, pixels", [
    ("2048x2048", 2048 * 2048), ("1024x1024", 1 << 20), ("1024X768", 1024 * 768), (" 64 x 32 ", 2048),
    ("1048576", 1 << 20), ("1", 1),
])
def test_max_pixels_takes_width_x_height_or_a_count(value, pixels):
    assert parse_pixels(value) == pixels
    assert serve_settings("--max-pixels", value)[0].max_pixels == pixels


@pytest.mark.parametrize("value, size", [
    ("1MiB", 1 << 20), ("1 MiB", 1 << 20), ("1mib", 1 << 20), ("512KiB", 512 << 10), ("2KB", 2000),
    ("1MB", 1_000_000), ("4096", 4096), ("4096B", 4096), ("256", 256),
])
def test_max_body_takes_bytes_with_an_optional_suffix(value, size):
    assert parse_bytes(value) == size
    assert serve_settings("--max-body", value)[0].max_body == size


def test_the_defaults_are_the_ones_help_shows():
    limits, batching = serve_settings()
    assert (limits.max_pixels, limits.max_body, limits.max_n, limits.max_steps) == (2048 * 2048, 1 << 20, 8, 150)
    assert (limits.max_queue, limits.timeout, batching.max_batch, batching.window) == (64, 300.0, 8, 0.015)


@pytest.mark.parametrize("options, message", [
    (["--max-pixels", "1024x"], "--max-pixels must be WIDTHxHEIGHT (e.g. 2048x2048) or a pixel count, got '1024x'"),
    (["--max-pixels", "big"], "--max-pixels must be WIDTHxHEIGHT (e.g. 2048x2048) or a pixel count, got 'big'"),
    (["--max-pixels", "-5"], "--max-pixels must be WIDTHxHEIGHT (e.g. 2048x2048) or a pixel count, got '-5'"),
    (["--max-pixels", "0"], "--max-pixels must be >= 1, got 0"),
    (["--max-pixels", "0x64"], "--max-pixels must have a width and a height >= 1, got '0x64'"),
    (["--max-body", "1GiB?"], "--max-body must be a byte count, optionally with a KiB, MiB, KB or MB suffix "
                              "(e.g. 1MiB), got '1GiB?'"),
    (["--max-body", "1.5MiB"], "--max-body must be a byte count"),
    (["--max-body", "100"], "--max-body must be >= 256, got 100"),
    (["--max-body", "0KiB"], "--max-body must be >= 256, got 0"),
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["--max-n", "0"], "--max-n must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--timeout", "0"], "--timeout must be in [0.001, 86400], got 0"),
    (["--timeout", "nan"], "--timeout must be finite, got nan"),
    (["--batch-window-ms", "-1"], "--batch-window-ms must be in [0, 10000], got -1"),
    (["--port", "70000"], "--port must be <= 65535, got 70000"),
    (["--backend", "cuda"], "--backend must be one of auto, "),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--vae-tiles", "8"], "--vae-tiles must be >= 64, got 8"),
])
def test_a_bad_option_is_one_line_naming_the_flag(capsys, options, message):
    """Checked before the extra, the package or the port, so this starts no server."""
    assert main(["serve", "--demo", *options]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"artrt: error: {message}") and "\n" not in err, err
    flag = options[0]
    assert flag in err and not re.search(r"\b(max_|batch_window|vae_tile\b)", err), err
    assert "listening" not in captured.out + captured.err


def test_the_parsers_name_the_flag_they_are_given():
    with pytest.raises(InputError, match=r"^--limit must be WIDTHxHEIGHT"):
        parse_pixels("x", flag="--limit")
    with pytest.raises(InputError, match=r"^--cap must be >= 10, got 2"):
        parse_bytes("2", flag="--cap", minimum=10)
    assert parse_pixels(64) == 64 and parse_bytes(1 << 20) == 1 << 20  # ints pass as they are


def help_text(capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_names_artrts_fields_and_what_max_batch_bounds(capsys):
    out = help_text(capsys)
    for name in ARTRT_FIELDS:
        assert name in out, name
    assert "num_frames for video packages" in out
    assert "merged into one batched engine call of up to --max-batch images" in out
    assert "a request of more images (up to --max-n) runs alone, whole" in out
    assert "(default 2048x2048)" in out and "(default 1MiB)" in out and "WIDTHxHEIGHT or a pixel count" in out


def test_docs_list_every_field_the_server_accepts():
    """docs/serving.md says any field not in its table gets 400: the table names every accepted field."""
    text = DOCS.read_text()
    table = text[text.index("## The request"):text.index("Any other field is refused")]
    named = set(re.findall(r"^\| ([^|]+) \|", table, re.MULTILINE))
    fields = {f for cell in named for f in re.findall(r"`(\w+)`", cell)}
    assert set(OPENAI_FIELDS) | set(ARTRT_FIELDS) | set(IGNORED_FIELDS) <= fields, fields
    assert "`output_format` | OpenAI | `png` only" in table
