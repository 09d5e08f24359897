"""Two exported demo packages (or settings) on the same prompts and noise, paired: a probe of a recipe change.

    python recipes/shapes_demo/compare_packages.py build/pkg-a build/pkg-b --switch 1 --guidance 2

Runs both through artrt (ort-cpu, fp32, DPM-Solver++(2M)) on held-out validation prompts (prompt
seed 1, as ``compare_variants.py`` selects on), judges every image with the shapes-world evaluator
and prints each relevance, B minus A paired over the same images (± one standard error), and
for the relation prompts where both objects were drawn, how often the side was right or swapped.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from compare_variants import Variant, paired_difference

from artrt.demo.evaluate import MIN_POSITION_OFFSET, Report, relation_holds, score
from artrt.demo.spec import CONVERSE, PromptSpec
from artrt.demo.world import evaluation_prompts
from artrt.runtime import Pipeline


def relation_outcome(spec: PromptSpec, image: np.ndarray) -> str:
    """For a relation prompt: ``"right"``, ``"swapped"``, ``"unclear"`` (both objects drawn) or ``"missing"``."""
    detections = score(spec, image).detections
    found = [[d for d in detections if (d.shape, d.colour) == (o.shape, o.colour)] for o in spec.objects]
    if not all(found):
        return "missing"
    subject, reference = found[0][0], found[1][0]
    if relation_holds(spec.relation, subject, reference, MIN_POSITION_OFFSET):
        return "right"
    if relation_holds(CONVERSE[spec.relation], subject, reference, MIN_POSITION_OFFSET):
        return "swapped"
    return "unclear"


def run(pipe: Pipeline, variant: Variant, prompts, images: int, steps: int) -> tuple[Report, np.ndarray, Counter]:
    report, correct, sides = Report(), [], Counter()
    for i, (text, spec) in enumerate(prompts):
        result = pipe.generate(text, steps=steps, guidance=variant.guidance, switch=variant.switch, seed=i,
                               num_images=images, sampler="dpmpp_2m")
        for image in result.images:
            array = np.asarray(image)
            verdict = score(spec, array)
            report.add(spec.kind, verdict)
            correct.append(verdict.correct)
            if spec.kind == "relation":
                sides[relation_outcome(spec, array)] += 1
    return report, np.array(correct), sides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="package A (exported by artrt.export.shapes_demo.export_demo)")
    p.add_argument("b", type=Path, help="package B")
    p.add_argument("--prompts", type=int, default=96, help="validation prompts (default 96)")
    p.add_argument("--images", type=int, default=3, help="images (noise seeds) per prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--switch", type=float, nargs="+", default=[0.8],
                   help="switch point of A and B (one value: both); 1: the composition expert alone")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="guidance of A and B (one value: both)")
    args = p.parse_args()
    prompts = evaluation_prompts(args.prompts, seed=1)
    correct = {}
    for which, package in (("A", args.a), ("B", args.b)):
        index = 0 if which == "A" else -1
        variant = Variant(which, "", args.switch[index], args.guidance[index])
        report, correct[which], sides = run(Pipeline.load(package, backend="ort-cpu"), variant, prompts,
                                            args.images, args.steps)
        kinds = report.to_dict()["relevance_by_kind"]
        by_kind = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in kinds.items())
        print(f"{which} {package} (switch {variant.switch}, guidance {variant.guidance}): relevance "
              f"{report.relevance:.3f} ({by_kind}); relation sides {dict(sides)}", flush=True)
    difference, error = paired_difference(correct["B"], correct["A"])
    print(f"B - A: {difference:+.3f} ± {error:.3f} (paired, {len(correct['A'])} images)")


if __name__ == "__main__":
    main()
