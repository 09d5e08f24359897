"""The seed's claim, measured: two experts switched mid-loop vs the base model vs each expert alone.

    python recipes/shapes_demo/compare_variants.py --weights build/shapes-train/weights --out docs/results/demo

Every variant runs through artrt (ort-cpu, fp32) with the same sampler, steps, guidance, prompts
and noise, and is judged by the shapes-world evaluator (``artrt.demo.evaluate``):

1. *selection*: switch points (and guidance values) for the expert pair, scored on validation
   prompts (held-out attribute combinations, prompt seed 1);
2. *report*: the chosen switch, the base model alone, the composition expert alone (switch 1),
   the detail expert alone (switch 0), on the test prompts (held out, prompt seed 0); with
   ``--matched-base``, also a base model trained on as many steps as base + one expert (the same
   compute as each expert has seen), the fair test of the split.
Every variant sees the same prompts and noise, so differences are paired: each one is reported
against the two experts with its standard error over the images.
Writes ``OUT/variants.json``, ``OUT/variants.md`` and ``OUT/grid.png`` (prompts × variants).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from artrt.demo.evaluate import Report, score
from artrt.demo.world import evaluation_prompts
from artrt.runtime import Pipeline

log = logging.getLogger("compare")


@dataclass(frozen=True)
class Variant:
    label: str
    package: str  # "experts" | "base"
    switch: float
    guidance: float


def export_packages(weights: Path, work: Path, matched_base: Path | None = None) -> dict[str, Path]:
    """The expert pair, the base model (as both experts) and optionally the matched base, as packages."""
    from artrt.export.shapes_demo import TEXT_HEAD, export_demo

    bases = {"base": weights / "base"}
    if matched_base is not None:
        bases["matched-base"] = matched_base
    packages = {"experts": work / "experts"}
    folders = {"experts": weights}
    for name, unet in bases.items():
        folder = folders[name] = work / f"{name}-weights"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            for expert in ("composition", "detail"):
                shutil.copytree(unet, folder / expert)
            shutil.copy(weights / "demo.json", folder / "demo.json")
            head = unet.parent / TEXT_HEAD  # the text head trained with this base (OUT/weights/text_head)
            if head.is_dir():
                shutil.copytree(head, folder / TEXT_HEAD)
        packages[name] = work / name
    for name, folder in folders.items():
        if not (packages[name] / "artrt.json").is_file():
            export_demo(packages[name], folder, overwrite=True)
    return packages


def run_variant(pipe: Pipeline, variant: Variant, prompts, images_per_prompt: int, steps: int):
    """Generate ``images_per_prompt`` images per prompt (noise seed = prompt index) and score them.

    Returns the report, the first image of every prompt and whether each image was all right."""
    report, images, correct = Report(), [], []
    for i, (text, spec) in enumerate(prompts):
        result = pipe.generate(text, steps=steps, guidance=variant.guidance, switch=variant.switch, seed=i,
                               num_images=images_per_prompt, sampler="dpmpp_2m")
        arrays = [np.asarray(image) for image in result.images]
        for array in arrays:
            verdict = score(spec, array)
            report.add(spec.kind, verdict)
            correct.append(verdict.correct)
        images.append(arrays[0])
    return report, images, np.array(correct)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over the same images (relevance points) and its standard error."""
    d = a.astype(float) - b.astype(float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def grid(prompts, columns: dict[str, list[np.ndarray]], rows: int, scale: int = 4) -> Image.Image:
    """Prompts down, variants across; each cell the first image of a prompt, enlarged."""
    cell, label_w, head_h = 32 * scale, 300, 28
    labels = list(columns)
    canvas = Image.new("RGB", (label_w + cell * len(labels), head_h + cell * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((label_w + j * cell + 4, 8), label, fill="black")
    for i in range(rows):
        draw.text((4, head_h + i * cell + cell // 2 - 6), prompts[i][0][:48], fill="black")
        for j, label in enumerate(labels):
            tile = Image.fromarray(columns[label][i]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * cell, head_h + i * cell))
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="training output: base, composition, detail")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("build/shapes-compare"), help="exported packages")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--validation-prompts", type=int, default=48)
    p.add_argument("--test-prompts", type=int, default=150)
    p.add_argument("--images", type=int, default=4, help="images (noise samples) per prompt")
    p.add_argument("--switches", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--guidances", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument("--grid-rows", type=int, default=12)
    p.add_argument("--matched-base", type=Path, help="a base UNet folder trained for base + expert steps "
                   "(adds the compute-matched base variant)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    packages = export_packages(args.weights, args.work, args.matched_base)
    pipes = {name: Pipeline.load(path, backend="ort-cpu") for name, path in packages.items()}
    validation = evaluation_prompts(args.validation_prompts, seed=1)
    test = evaluation_prompts(args.test_prompts, seed=0)
    selection = {}
    for guidance in args.guidances:
        for switch in args.switches:
            variant = Variant(f"experts, switch {switch}", "experts", switch, guidance)
            started = time.perf_counter()
            report, _, _ = run_variant(pipes["experts"], variant, validation, args.images, args.steps)
            selection[(switch, guidance)] = report
            log.info("validation switch %.2f guidance %.1f: relevance %.3f (%.0f s)", switch, guidance,
                     report.relevance, time.perf_counter() - started)
    (switch, guidance), _ = max(selection.items(), key=lambda item: item[1].relevance)
    log.info("chosen: switch %.2f, guidance %.1f", switch, guidance)
    variants = [
        Variant(f"two experts (switch {switch})", "experts", switch, guidance),
        Variant("base model alone", "base", 1.0, guidance),
        Variant("composition expert alone", "experts", 1.0, guidance),
        Variant("detail expert alone", "experts", 0.0, guidance),
    ]
    if args.matched_base is not None:
        variants.insert(2, Variant("base model, same compute", "matched-base", 1.0, guidance))
    results, columns, correct = {}, {}, {}
    for variant in variants:
        started = time.perf_counter()
        report, images, correct[variant.label] = run_variant(pipes[variant.package], variant, test, args.images,
                                                             args.steps)
        results[variant.label] = report
        columns[variant.label] = images
        log.info("test %s: relevance %.3f (%.0f s)", variant.label, report.relevance, time.perf_counter() - started)
    summary = {
        "steps": args.steps, "sampler": "dpmpp_2m", "images_per_prompt": args.images,
        "chosen": {"switch": switch, "guidance": guidance},
        "selection": [{"switch": s, "guidance": g, **r.to_dict()} for (s, g), r in selection.items()],
        "test": {label: r.to_dict() for label, r in results.items()},
    }
    pair = variants[0].label
    differences = {label: paired_difference(correct[pair], c) for label, c in correct.items() if label != pair}
    summary["paired_vs_two_experts"] = {label: {"difference": d, "standard_error": se}
                                        for label, (d, se) in differences.items()}
    (args.out / "variants.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"Test: {args.test_prompts} held-out prompts x {args.images} images, {args.steps} steps dpmpp_2m, "
             f"guidance {guidance}.\n", "| variant | relevance | " + " | ".join(
                 ("single", "count", "relation", "colour", "shape", "count fact", "position", "style")) + " |",
             "|---|---:|" + "---:|" * 8]
    for label, r in results.items():
        d = r.to_dict()
        kinds = [d["relevance_by_kind"].get(k, {}).get("accuracy", float("nan")) for k in ("single", "count",
                                                                                           "relation")]
        cats = [d["categories"].get(c, {}).get("accuracy", float("nan")) for c in ("colour", "shape", "count",
                                                                                    "position", "style")]
        lines.append(f"| {label} | {r.relevance:.3f} | " + " | ".join(f"{v:.3f}" for v in kinds + cats) + " |")
    lines += ["", f"Two experts minus each variant, paired over the same {len(correct[pair])} images "
              "(relevance, ± one standard error):", "", "| variant | difference |", "|---|---:|"]
    lines += [f"| {label} | {d:+.3f} ± {se:.3f} |" for label, (d, se) in differences.items()]
    lines += ["", f"Selection ({args.validation_prompts} validation prompts x {args.images} images):", "",
              "| switch | guidance | relevance |", "|---:|---:|---:|"]
    lines += [f"| {s} | {g} | {r.relevance:.3f} |" for (s, g), r in selection.items()]
    (args.out / "variants.md").write_text("\n".join(lines) + "\n")
    grid(test, columns, args.grid_rows).save(args.out / "grid.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
