"""A GenEval-style evaluator for the shapes world: parse an image into objects, score a prompt's facts.

:func:`detect` finds the background (the dominant light, unsaturated colour), classifies every pixel
as background or one palette colour by unmixing it against the background, and groups each colour's
pixels into objects (closing the gaps of stripes and outlines, filling holes). An object's shape is
the ideal shape (the world's own geometry) that overlaps its silhouette best; its style is solid when
its colour fills the silhouette, outlined when the unpainted inside is one tall hole, striped when it
is thin horizontal gaps. :func:`score` checks the facts a prompt states (:meth:`PromptSpec.facts`)
against the detections, and :func:`evaluate` sums scores into a report.

Validate it on ground-truth renders with ``python -m artrt.demo.evaluate --validate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from .spec import COLOURS, KINDS, Fact, PromptSpec
from .world import IMAGE_SIZE, parse_prompt, sample_example, silhouette

CATEGORIES = ("shape", "colour", "count", "position", "style")
PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in PALETTE_NAMES], dtype=np.float64)

LIGHT_LUMA = 170.0  # background candidates: light ...
LIGHT_SATURATION = 0.25  # ... and unsaturated
MIN_BACKGROUND_SHARE = 0.25  # an image without that much background has no readable objects
MIN_ALPHA = 0.55  # a pixel is an object's when it is more than half the object colour
MAX_RESIDUAL = 0.35  # of the colour's distance to the background, off the background-colour line
MIN_AREA = 12  # pixels of the filled silhouette, 32-pixel canvas
SHAPE_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # area of each shape in a box of half-size 1
FIT_SCALES = (0.92, 1.0, 1.08)
MIN_SHAPE_IOU = 0.7  # below: "unknown" (renders fit at 0.87 or better)
SOLID_SHARE = 0.95  # of the silhouette painted in the object's colour
MIN_HOLE_HEIGHT = 3  # rows; the gaps between stripes are 2 rows high, an outline's hole 4 or more
MIN_POSITION_OFFSET = 2.0  # pixels along the relation's axis, 32-pixel canvas


@dataclass
class Detection:
    """An object found in an image; positions and sizes in the input image's pixels."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _to_canvas(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The image as float RGB on the 32-pixel canvas, and the input pixels per canvas pixel (x, y)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    height, width = image.shape[:2]
    if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return image.astype(np.float64), (width / IMAGE_SIZE, height / IMAGE_SIZE)


def _background(image: np.ndarray) -> np.ndarray | None:
    """The median light unsaturated colour, or None where too little of the image has one."""
    high, low = image.max(axis=2), image.min(axis=2)
    luma = image @ np.array([0.299, 0.587, 0.114])
    light = (luma >= LIGHT_LUMA) & (high - low <= LIGHT_SATURATION * np.maximum(high, 1))
    if light.mean() < MIN_BACKGROUND_SHARE:
        return None
    return np.median(image[light], axis=0)


def unmix(image: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the palette index of the colour it is mostly made of (-1: background), and
    ``alpha[H, W, K]``, the share of each palette colour (0 to 1).

    Each pixel is unmixed as ``background + alpha * (colour - background)``; it belongs to the
    colour with the smallest residual among those with ``alpha >= MIN_ALPHA``.
    """
    towards = PALETTE - background  # [K, 3]
    length = np.linalg.norm(towards, axis=1)
    offset = image - background  # [H, W, 3]
    alpha = offset @ towards.T / length**2  # [H, W, K]
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * towards, axis=-1) / length
    residual[(alpha < MIN_ALPHA) | (residual > MAX_RESIDUAL)] = np.inf
    labels = residual.argmin(axis=2)
    labels[~np.isfinite(residual.min(axis=2))] = -1
    return labels, np.clip(alpha, 0.0, 1.0)


def _silhouettes(mask: np.ndarray) -> list[np.ndarray]:
    """Filled silhouettes of one colour's objects: stripes and outlines closed, holes filled."""
    block = np.ones((3, 3), dtype=bool)
    padded = np.pad(mask, 2)
    closed = ndimage.binary_closing(padded, structure=block)[2:-2, 2:-2] | mask
    labels, n = ndimage.label(closed, structure=block)
    filled = (ndimage.binary_fill_holes(labels == j) for j in range(1, n + 1))
    return [region for region in filled if region.sum() >= MIN_AREA]


def _bbox(region: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(region)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def soft_silhouette(region: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``region`` with the partial coverage (``alpha``) of its anti-aliased rim added around it."""
    rim = ndimage.binary_dilation(region, structure=np.ones((3, 3), dtype=bool)) & ~region
    return np.where(region, 1.0, alpha * rim)


def fit_shape(coverage: np.ndarray) -> tuple[str, float]:
    """The shape whose ideal silhouette overlaps ``coverage`` (0 to 1 per pixel) best, and that
    overlap (soft IoU).

    Each shape is fitted at the centroid with the size its area implies (times
    :data:`FIT_SCALES`); triangles are upright, their centroid a third of the half-size below centre.
    """
    ys, xs = np.indices(coverage.shape) + 0.5
    area = coverage.sum()
    cx, cy = (xs * coverage).sum() / area, (ys * coverage).sum() / area
    best = ("", -1.0)
    for shape, area_per_r2 in SHAPE_AREA.items():
        for scale in FIT_SCALES:
            radius = scale * np.sqrt(area / area_per_r2)
            centre_y = cy - radius / 3 if shape == "triangle" else cy
            ideal = silhouette(shape, cx, centre_y, radius, size=coverage.shape[0])
            overlap = np.minimum(ideal, coverage).sum() / np.maximum(ideal, coverage).sum()
            best = max(best, (shape, float(overlap)), key=lambda fit: fit[1])
    return best


def classify_shape(coverage: np.ndarray) -> str:
    """The best-fitting shape, or ``"unknown"`` when none fits well."""
    shape, overlap = fit_shape(coverage)
    return shape if overlap >= MIN_SHAPE_IOU else "unknown"


def classify_style(region: np.ndarray, painted: np.ndarray) -> str:
    """Solid when the colour fills the silhouette; else outlined if the unpainted part inside has a
    tall hole, striped if it is made of thin horizontal gaps."""
    if painted[region].mean() >= SOLID_SHARE:
        return "solid"
    gaps, _ = ndimage.label(region & ~painted)
    tallest = max(box[0].stop - box[0].start for box in ndimage.find_objects(gaps))
    return "outlined" if tallest >= MIN_HOLE_HEIGHT else "striped"


def detect(image: np.ndarray) -> list[Detection]:
    """The objects in a uint8 ``[H, W, 3]`` image, largest first; none where no light background shows.

    Images of another size are resampled to the 32-pixel canvas first (box filter).
    """
    canvas, (scale_x, scale_y) = _to_canvas(image)
    background = _background(canvas)
    if background is None:
        return []
    labels, alpha = unmix(canvas, background)
    detections = []
    for index, colour in enumerate(PALETTE_NAMES):
        painted = labels == index
        for region in _silhouettes(painted):
            ys, xs = np.nonzero(region)
            x0, y0, x1, y1 = _bbox(region)
            detections.append(
                Detection(
                    shape=classify_shape(soft_silhouette(region, alpha[..., index])),
                    colour=colour,
                    style=classify_style(region, painted),
                    cx=float(xs.mean() + 0.5) * scale_x,
                    cy=float(ys.mean() + 0.5) * scale_y,
                    area=round(len(xs) * scale_x * scale_y),
                    bbox=(round(x0 * scale_x), round(y0 * scale_y), round(x1 * scale_x), round(y1 * scale_y)),
                )
            )
    return sorted(detections, key=lambda d: -d.area)


@dataclass
class Score:
    """The facts of one prompt, each with whether the image shows it, and what was detected."""

    facts: list[tuple[Fact, bool]]
    detections: list[Detection] = field(default_factory=list)

    @property
    def correct(self) -> bool:
        """Whether every fact holds (the prompt's relevance)."""
        return all(ok for _, ok in self.facts)

    @property
    def by_category(self) -> dict[str, tuple[int, int]]:
        """Per fact category: (facts that hold, facts stated)."""
        counts: dict[str, tuple[int, int]] = {}
        for fact, ok in self.facts:
            right, total = counts.get(fact.category, (0, 0))
            counts[fact.category] = (right + ok, total + 1)
        return counts


def relation_holds(relation: str, subject: Detection, reference: Detection, min_offset: float) -> bool:
    """Whether ``subject`` is ``relation`` ``reference``: mostly along the relation's axis, clearly."""
    dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= min_offset and along > abs(across)


def _check(fact: Fact, spec: PromptSpec, detections: list[Detection], min_offset: float) -> bool:
    obj = spec.objects[fact.obj]
    matching = [d for d in detections if (d.shape, d.colour) == (obj.shape, obj.colour)]
    if fact.category == "shape":
        wanted = spec.count * sum(other.shape == obj.shape for other in spec.objects)
        return sum(d.shape == obj.shape for d in detections) >= wanted
    if fact.category == "colour":
        return bool(matching)
    if fact.category == "count":
        return len(matching) == spec.count
    if fact.category == "style":
        return bool(matching) and all(d.style == obj.style for d in matching)
    if fact.category == "position":
        subject, reference = (
            [d for d in detections if (d.shape, d.colour) == (o.shape, o.colour)] for o in spec.objects
        )
        return bool(subject and reference) and relation_holds(spec.relation, subject[0], reference[0], min_offset)
    raise ValueError(f"unknown fact category {fact.category!r}")


def _as_spec(prompt: str | PromptSpec) -> PromptSpec:
    return parse_prompt(prompt) if isinstance(prompt, str) else prompt


def score(prompt: str | PromptSpec, image: np.ndarray) -> Score:
    """Check each fact of ``prompt`` (a caption or a spec) on ``image``."""
    spec = _as_spec(prompt)
    detections = detect(image)
    min_offset = MIN_POSITION_OFFSET * np.asarray(image).shape[1] / IMAGE_SIZE
    return Score([(fact, _check(fact, spec, detections, min_offset)) for fact in spec.facts()], detections)


@dataclass
class Report:
    """Scores summed over prompts: relevance (all facts right) overall and per kind, accuracy per category."""

    prompts: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind or "all": (correct, total)
    categories: dict[str, tuple[int, int]] = field(default_factory=dict)  # (facts right, facts stated)

    def add(self, kind: str, result: Score) -> None:
        """Count one scored prompt of ``kind``."""
        for key in ("all", kind):
            right, total = self.prompts.get(key, (0, 0))
            self.prompts[key] = (right + result.correct, total + 1)
        for category, (right, total) in result.by_category.items():
            old_right, old_total = self.categories.get(category, (0, 0))
            self.categories[category] = (old_right + right, old_total + total)

    @property
    def relevance(self) -> float:
        """Share of prompts with every fact right."""
        return _ratio(self.prompts.get("all", (0, 0)))

    def accuracy(self, category: str) -> float:
        """Share of the facts of ``category`` that hold (nan when none was stated)."""
        return _ratio(self.categories.get(category, (0, 0)))

    def to_dict(self) -> dict:
        """Plain JSON-able numbers."""

        def entry(counts: tuple[int, int]) -> dict:
            return {"accuracy": _ratio(counts), "right": counts[0], "total": counts[1]}

        return {
            "prompts": self.prompts.get("all", (0, 0))[1],
            "relevance": self.relevance,
            "relevance_by_kind": {kind: entry(self.prompts[kind]) for kind in KINDS if kind in self.prompts},
            "categories": {name: entry(self.categories[name]) for name in CATEGORIES if name in self.categories},
        }

    def table(self) -> str:
        """A Markdown table: relevance overall and per kind, then accuracy per fact category."""
        rows = ["| measure | accuracy | right / total |", "|---|---|---|"]
        labelled = [("relevance (all facts)", self.prompts.get("all", (0, 0)))]
        labelled += [(f"relevance: {kind}", self.prompts[kind]) for kind in KINDS if kind in self.prompts]
        labelled += [(f"fact: {name}", self.categories[name]) for name in CATEGORIES if name in self.categories]
        rows += [f"| {label} | {_ratio(counts):.3f} | {counts[0]} / {counts[1]} |" for label, counts in labelled]
        return "\n".join(rows)


def _ratio(counts: tuple[int, int]) -> float:
    return counts[0] / counts[1] if counts[1] else float("nan")


def evaluate(items: Iterable[tuple[str | PromptSpec, np.ndarray]]) -> Report:
    """Score every ``(prompt, image)`` pair and sum the results."""
    report = Report()
    for prompt, image in items:
        spec = _as_spec(prompt)
        report.add(spec.kind, score(spec, image))
    return report


def validate(n: int = 1000, seed: int = 0, size: int = IMAGE_SIZE) -> Report:
    """The evaluator's accuracy on ``n`` ground-truth renders of random prompts (both splits)."""
    rng = np.random.default_rng(seed)
    examples = (sample_example(rng, "all", size) for _ in range(n))
    return evaluate((example.caption, example.image) for example in examples)


def main(argv: list[str] | None = None) -> int:
    """``python -m artrt.demo.evaluate --validate [--n N]`` or ``--prompt TEXT --image PNG``."""
    parser = argparse.ArgumentParser(prog="python -m artrt.demo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--validate", action="store_true", help="score ground-truth renders")
    parser.add_argument("--n", type=int, default=1000, help="renders to validate on (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help="render size for --validate")
    parser.add_argument("--prompt", help="score one image against this prompt (with --image)")
    parser.add_argument("--image", help="an image file to score")
    args = parser.parse_args(argv)
    if args.validate:
        print(f"Evaluator on {args.n} ground-truth {args.size}px renders (seed {args.seed}):\n")
        print(validate(args.n, args.seed, args.size).table())
        return 0
    if not (args.prompt and args.image):
        parser.error("pass --validate, or --prompt and --image")
    try:
        result = score(args.prompt, np.asarray(Image.open(args.image).convert("RGB")))
    except (OSError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    for fact, ok in result.facts:
        print(f"{'yes' if ok else 'NO '}  {fact.category:8}  {fact.text}")
    for d in result.detections:
        print(f"found: {d.style} {d.colour} {d.shape} at ({d.cx:.1f}, {d.cy:.1f}), {d.area} px")
    print(f"relevance: {int(result.correct)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
