"""The shapes world: a procedural, deterministic generator of captioned images.

Objects (circle, square, triangle) in a few saturated colours and three styles (solid, outlined,
striped) on light plain backgrounds, asked for one at a time, as a count of identical objects or
as two objects in a spatial relation. Everything is drawn from the ``numpy`` generator passed in,
so the same seed gives the same examples. Coordinates are in a 32-unit canvas
(:data:`IMAGE_SIZE`); :func:`render` scales them to any size.

Usage::

    rng = np.random.default_rng(0)
    example = sample_example(rng)          # spec, caption, scene (ground truth), image
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .captions import caption, parse_prompt
from .spec import (
    COLOURS,
    KINDS,
    RELATIONS,
    SHAPES,
    STYLES,
    Fact,
    ObjectSpec,
    PromptSpec,
    is_heldout,
)

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "KINDS",
    "RELATIONS",
    "SHAPES",
    "STYLES",
    "Example",
    "Fact",
    "ObjectSpec",
    "PlacedObject",
    "PromptSpec",
    "Scene",
    "caption",
    "evaluation_prompts",
    "is_heldout",
    "layout",
    "parse_prompt",
    "render",
    "silhouette",
    "sample_example",
    "sample_spec",
]

IMAGE_SIZE = 32
BACKGROUNDS = ((246, 245, 240), (240, 242, 247), (247, 241, 232), (238, 245, 238), (245, 238, 242))
KIND_WEIGHTS = (0.35, 0.25, 0.40)
DEFAULT_STYLE_WEIGHTS = (0.8, 0.1, 0.1)  # solid, outlined, striped when the prompt does not say
# Half-sizes of the objects' boxes by the number of objects in the scene.
RADIUS = {1: (6.0, 9.0), 2: (4.5, 6.5), 3: (4.0, 5.5)}
MARGIN = 1.0  # between an object's box and the image border
GAP = 3.0  # between the boxes of two objects: at least 3 clear pixels
MIN_RELATION_OFFSET = 8.0
MAX_TRIES = 200
PLACE_TRIES = 20

OUTLINE_WIDTH = 2.0
STRIPE_PERIOD = 4.0  # rows: colour for the first half of each period, background for the second
STRIPED_BORDER = 1.5
SUPERSAMPLE = 4
# Triangles fill half their box: larger boxes keep their area, outline and stripes readable.
SHAPE_SCALE = {"circle": 1.0, "square": 1.0, "triangle": 1.15}


@dataclass(frozen=True)
class PlacedObject:
    """An object in a scene: centre and half-size ``radius`` of its square box, canvas units."""

    shape: str
    colour: str
    style: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """The ground truth of an image."""

    objects: tuple[PlacedObject, ...]
    background: tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class Example:
    """A captioned image with its spec and ground truth; ``image`` is uint8 ``[H, W, 3]``."""

    spec: PromptSpec
    caption: str
    scene: Scene
    image: np.ndarray


def _pick(rng: np.random.Generator, options: tuple) -> object:
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, style_probability: float) -> ObjectSpec:
    style = _pick(rng, STYLES) if rng.random() < style_probability else None
    return ObjectSpec(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), style)


def _random_spec(rng: np.random.Generator, kind: str) -> PromptSpec:
    if kind == "single":
        return PromptSpec("single", (_random_object(rng, 1.0),))
    if kind == "count":
        return PromptSpec("count", (_random_object(rng, 0.5),), count=int(rng.integers(2, 4)))
    subject = _random_object(rng, 0.3)
    reference = _random_object(rng, 0.3)
    while reference.noun == subject.noun:
        reference = _random_object(rng, 0.3)
    return PromptSpec("relation", (subject, reference), relation=_pick(rng, RELATIONS))


def sample_spec(rng: np.random.Generator, split: str = "train", kind: str | None = None) -> PromptSpec:
    """A random spec from ``split`` ("train", "heldout" or "all"), of ``kind`` if given."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}; expected train, heldout or all")
    for _ in range(100 * MAX_TRIES):
        spec = _random_spec(rng, kind or str(rng.choice(KINDS, p=KIND_WEIGHTS)))
        if split == "all" or is_heldout(spec) == (split == "heldout"):
            return spec
    raise RuntimeError(f"no {kind or ''} spec found in split {split}")


def _concrete_style(obj: ObjectSpec, rng: np.random.Generator) -> str:
    if obj.style is not None:
        return obj.style
    return STYLES[int(rng.choice(len(STYLES), p=DEFAULT_STYLE_WEIGHTS))]


def _separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two boxes ``(cx, cy, radius)`` are at least :data:`GAP` apart on some axis."""
    reach = a[2] + b[2] + GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _uniform_centre(rng: np.random.Generator, radius: float) -> float:
    return float(rng.uniform(MARGIN + radius, IMAGE_SIZE - MARGIN - radius))


def _scatter(rng: np.random.Generator, count: int, scale: float) -> list[tuple[float, float, float]]:
    """``count`` boxes of one random size (times ``scale``) at random non-overlapping places."""
    low, high = RADIUS[count]
    for attempt in range(MAX_TRIES):
        radius = scale * float(rng.uniform(low, high - (high - low) * attempt / MAX_TRIES))
        boxes: list[tuple[float, float, float]] = []
        for _ in range(PLACE_TRIES):  # then start over: an unlucky first box may leave no room
            box = (_uniform_centre(rng, radius), _uniform_centre(rng, radius), radius)
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes
    raise RuntimeError(f"cannot place {count} objects")


def _relate(rng: np.random.Generator, relation: str, scales: tuple[float, float]) -> list[tuple[float, float, float]]:
    """Subject and reference boxes (sizes times ``scales``) that satisfy ``relation`` without ambiguity.

    The offset along the relation's axis is at least :data:`MIN_RELATION_OFFSET` and the boxes'
    gap; the offset across it is at most half of that.
    """
    sign = -1.0 if relation in ("left of", "above") else 1.0
    for _ in range(MAX_TRIES):
        r_subject, r_reference = rng.uniform(*RADIUS[2], size=2) * scales
        low = max(MIN_RELATION_OFFSET, r_subject + r_reference + GAP)
        high = IMAGE_SIZE - 2 * MARGIN - r_subject - r_reference
        if low > high:
            continue
        along = float(rng.uniform(low, high))
        across = float(rng.uniform(-0.5, 0.5)) * along
        offset = (sign * along, across) if relation in ("left of", "right of") else (across, sign * along)
        reference = [0.0, 0.0]
        for axis in range(2):
            lo = MARGIN + max(r_reference, r_subject - offset[axis])
            hi = IMAGE_SIZE - MARGIN - max(r_reference, r_subject + offset[axis])
            if lo > hi:
                break
            reference[axis] = float(rng.uniform(lo, hi))
        else:
            subject = (reference[0] + offset[0], reference[1] + offset[1], float(r_subject))
            return [subject, (reference[0], reference[1], float(r_reference))]
    raise RuntimeError(f"cannot place a {relation} relation")


def layout(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A concrete scene that satisfies ``spec``; unstated styles are mostly solid."""
    background = _pick(rng, BACKGROUNDS)
    if spec.kind == "relation":
        boxes = _relate(rng, spec.relation, tuple(SHAPE_SCALE[obj.shape] for obj in spec.objects))
        objects = spec.objects
        styles = [_concrete_style(obj, rng) for obj in objects]
    else:
        boxes = _scatter(rng, spec.count, SHAPE_SCALE[spec.objects[0].shape])
        objects = spec.objects * spec.count
        styles = [_concrete_style(spec.objects[0], rng)] * spec.count
    placed = tuple(
        PlacedObject(obj.shape, obj.colour, style, cx, cy, radius)
        for obj, style, (cx, cy, radius) in zip(objects, styles, boxes)
    )
    return Scene(placed, background)


def _depth(obj: PlacedObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance to the object's outline, positive inside (canvas units)."""
    if obj.shape == "circle":
        return obj.radius - np.hypot(x - obj.cx, y - obj.cy)
    r = obj.radius
    if obj.shape == "square":
        return r - np.maximum(np.abs(x - obj.cx), np.abs(y - obj.cy))
    # Upright triangle in the box: apex at the top centre, base along the bottom.
    apex_x, apex_y, base_y = obj.cx, obj.cy - r, obj.cy + r
    slant = np.hypot(1.0, 0.5)  # legs rise 2 units per unit across
    legs = (0.5 * (y - apex_y) - np.abs(x - apex_x)) / slant
    return np.minimum(base_y - y, legs)


def _coverage(obj: PlacedObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the object's colour is painted (boolean) at sample points ``x``, ``y``."""
    depth = _depth(obj, x, y)
    inside = depth > 0
    if obj.style == "solid":
        return inside
    if obj.style == "outlined":
        width = OUTLINE_WIDTH
        if obj.shape == "triangle":  # the triangle's inradius is 0.62 r: keep a visible hole
            width = min(OUTLINE_WIDTH, 0.28 * obj.radius)
        return inside & (depth <= width)
    top = np.round(obj.cy - obj.radius)  # stripes start at the top, on whole rows of the 32-pixel canvas
    stripe = np.floor((y - top) / (STRIPE_PERIOD / 2)) % 2 == 0
    return inside & ((depth <= STRIPED_BORDER) | stripe)


def _sample_grid(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates ``(x, y)`` of ``supersample``² points per pixel of a ``size`` image."""
    samples = (np.arange(size * supersample) + 0.5) / supersample * (IMAGE_SIZE / size)
    y, x = np.meshgrid(samples, samples, indexing="ij")
    return x, y


def _pixel_mean(samples: np.ndarray, size: int, supersample: int) -> np.ndarray:
    return samples.reshape(size, supersample, size, supersample, *samples.shape[2:]).mean(axis=(1, 3))


def silhouette(
    shape: str, cx: float, cy: float, radius: float, size: int = IMAGE_SIZE, supersample: int = 2
) -> np.ndarray:
    """Per pixel, the share of a ``size`` image that a filled ``shape`` in the given box covers."""
    x, y = _sample_grid(size, supersample)
    inside = _depth(PlacedObject(shape, "", "solid", cx, cy, radius), x, y) > 0
    return _pixel_mean(inside.astype(np.float64), size, supersample)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a uint8 ``[size, size, 3]`` image, anti-aliased by supersampling."""
    x, y = _sample_grid(size, SUPERSAMPLE)
    image = np.empty((*y.shape, 3), dtype=np.float64)
    image[:] = scene.background
    for obj in scene.objects:
        image[_coverage(obj, x, y)] = COLOURS[obj.colour]
    return np.round(_pixel_mean(image, size, SUPERSAMPLE)).astype(np.uint8)


def sample_example(rng: np.random.Generator, split: str = "train", size: int = IMAGE_SIZE) -> Example:
    """A random spec from ``split`` with a caption, a scene and its render."""
    spec = sample_spec(rng, split)
    text = caption(spec, rng)
    scene = layout(spec, rng)
    return Example(spec, text, scene, render(scene, size))


def evaluation_prompts(n: int, seed: int = 0) -> list[tuple[str, PromptSpec]]:
    """``n`` held-out prompts with their specs, the kinds in turn; fixed for a ``seed``."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        spec = sample_spec(rng, "heldout", kind=KINDS[i % len(KINDS)])
        prompts.append((caption(spec, rng), spec))
    return prompts
