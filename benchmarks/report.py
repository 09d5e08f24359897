"""Outputs of ``compare.py``: the results JSON, a Markdown table and a PNG bar chart (pillow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"artrt": (46, 125, 50), "artrt-plain": (129, 199, 132), "diffusers": (96, 125, 139),
           "optimum": (30, 136, 229), "optimum-nospin": (144, 202, 249)}


def write_outputs(report: dict[str, Any], out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report) + "\n")
    chart(report).save(paths[2])
    return paths


def heading(report: dict[str, Any]) -> tuple[str, str]:
    """Title and machine line shared by the table and the chart."""
    s, m = report["settings"], report["machine"]
    model = "demo model" if s["workload"] == "demo" else f"{s['workload']} SDXL pair"
    guidance = f"{s['guidance']:g}"
    if s["workload"].startswith("wan-"):  # a Wan 2.2 pair: frames and one guidance per expert
        model = f"{s['workload'].removeprefix('wan-')} Wan 2.2 pair, {s.get('frames', 1)} frame(s)"
        guidance = f"{s['guidance']:g}/{s.get('guidance_2') or s['guidance']:g}"
    title = (f"{model}, {s['height']}x{s['width']} px, {s['steps']} steps, switch {s['switch']}, "
             f"guidance {guidance}, {s['sampler']}")
    other = m.get("other_processes_cores")
    machine = (f"{m['cpu']}, {m['cores']} cores, threads per runtime: {s['threads']}; {m['date']}"
               + ("" if other is None else f"; other processes used {other:.2f} cores meanwhile"))
    return title, machine


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _row(key: str, r: dict[str, Any]) -> str:
    if "p50" not in r:
        return f"| {r['name']} | - | - | - | - | - | could not run: {r.get('error', 'no timed run')} |"
    speed = "1 (reference)" if key == "artrt" else f"{r['artrt_speedup']:.2f}x" if "artrt_speedup" in r else "-"
    psnr = r.get("psnr_vs_diffusers_db")
    agree = "-" if psnr is None else "reference" if key == "diffusers" else (
        "identical" if psnr == float("inf") else f"{psnr:.1f} dB")
    note = r.get("error", "")
    if "floor" in r:
        note = (f"engine floor {_seconds(r['floor'])} s, host overhead {_seconds(r['host_overhead'])} s "
                f"({r['host_overhead_pct']:.1f} %)")
    return (f"| {r['name']} | {_seconds(r['p50'])} | {_seconds(r['p90'])} | {_seconds(r.get('load_s'))} | {speed} "
            f"| {agree} | {note} |")


def markdown(report: dict[str, Any]) -> str:
    title, machine = heading(report)
    s = report["settings"]
    lines = [
        f"#### {title}",
        "",
        f"{machine}. p50/p90 of {s['runs']} interleaved runs after {s['warmup']} warm-up, end to end "
        "(prompt to decoded image), same latents. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["machine"].get("versions", {}).items()) + ".",
        "",
        "| runtime | p50 s | p90 s | load s | artrt speed-up (peer p50 / artrt p50) | image vs diffusers (PSNR) "
        "| notes |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    lines += [_row(key, r) for key, r in report["peers"].items()]
    return "\n".join(lines)


def chart(report: dict[str, Any], width: int = 900) -> Image.Image:
    """Horizontal bars of p50 end-to-end seconds per peer, labelled with the value and artrt's speed-up."""
    font = ImageFont.load_default(size=15)
    small = ImageFont.load_default(size=12)
    timed = [(k, r) for k, r in report["peers"].items() if "p50" in r]
    failed = [r for r in report["peers"].values() if "p50" not in r]
    top, bar, gap, left = 70, 34, 14, 190
    height = top + (bar + gap) * max(1, len(timed) + len(failed)) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title, machine = heading(report)
    draw.text((12, 10), title, fill="black", font=font)
    draw.text((12, 34), machine, fill=(80, 80, 80), font=small)
    longest = max((r["p50"] for _, r in timed), default=1.0)
    span = width - left - 190
    y = top
    for key, r in timed:
        length = max(2, round(span * r["p50"] / longest))
        draw.text((12, y + 9), r["name"], fill="black", font=font)
        draw.rectangle([left, y, left + length, y + bar], fill=COLOURS.get(key, (120, 120, 120)))
        label = f"{_seconds(r['p50'])} s" + (f"  (artrt {r['artrt_speedup']:.2f}x faster)"
                                             if "artrt_speedup" in r else "")
        draw.text((left + length + 8, y + 9), label, fill="black", font=small)
        y += bar + gap
    for r in failed:
        draw.text((12, y + 9), f"{r['name']}: could not run", fill=(180, 0, 0), font=font)
        y += bar + gap
    draw.text((12, height - 22), "p50 end-to-end seconds per image, lower is better", fill=(80, 80, 80), font=small)
    return image
