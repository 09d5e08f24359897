"""The shapes world: determinism, splits, captions that parse back, layouts that hold."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from artrt.demo.world import (
    BACKGROUNDS,
    COLOURS,
    GAP,
    IMAGE_SIZE,
    KINDS,
    MIN_RELATION_OFFSET,
    ObjectSpec,
    PromptSpec,
    caption,
    evaluation_prompts,
    is_heldout,
    layout,
    parse_prompt,
    render,
    sample_example,
    sample_spec,
)


def test_same_seed_same_examples():
    first = [sample_example(np.random.default_rng(7)) for _ in range(3)]
    second = [sample_example(np.random.default_rng(7)) for _ in range(3)]
    for a, b in zip(first, second):
        assert (a.spec, a.caption, a.scene) == (b.spec, b.caption, b.scene)
        assert np.array_equal(a.image, b.image)
    assert first[0].image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first[0].image.dtype == np.uint8


def test_splits_are_disjoint_and_cover_every_kind():
    rng = np.random.default_rng(0)
    train = [sample_spec(rng) for _ in range(2000)]
    assert not any(is_heldout(spec) for spec in train)
    kinds = Counter(spec.kind for spec in train)
    assert 0.3 < kinds["single"] / 2000 < 0.4 and 0.35 < kinds["relation"] / 2000 < 0.45
    everything = [sample_spec(rng, "all") for _ in range(4000)]
    for kind in KINDS:
        of_kind = [spec for spec in everything if spec.kind == kind]
        share = np.mean([is_heldout(spec) for spec in of_kind])
        assert 0.04 < share < 0.25, (kind, share)
    assert all(is_heldout(spec) for spec in (sample_spec(rng, "heldout") for _ in range(200)))


def test_a_relation_and_its_converse_share_a_split():
    rng = np.random.default_rng(1)
    for _ in range(300):
        spec = sample_spec(rng, "all", kind="relation")
        assert is_heldout(spec) == is_heldout(spec.converse())


def test_evaluation_prompts_are_fixed_heldout_and_balanced():
    prompts = evaluation_prompts(30, seed=3)
    assert prompts == evaluation_prompts(30, seed=3)
    assert all(is_heldout(spec) and parse_prompt(text) == spec for text, spec in prompts)
    assert Counter(spec.kind for _, spec in prompts) == {kind: 10 for kind in KINDS}


def test_every_caption_parses_back_to_its_spec():
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(3000):
        spec = sample_spec(rng, "all")
        text = caption(spec, rng)
        seen.add(text)
        assert parse_prompt(text) == spec, text
    assert len(seen) > 1500  # paraphrases, not one caption per spec


def test_word_sides_follow_the_relation_and_the_word_order():
    from artrt.demo.captions import word_sides

    assert word_sides("a red circle left of a blue square") == [1, 1, 1, 0, 0, -1, -1, -1]
    assert word_sides("a blue square right of a red circle") == [-1, -1, -1, 0, 0, 1, 1, 1]
    assert word_sides("the green square is below the red circle") == [-1, -1, -1, 0, 0, 1, 1, 1]
    assert word_sides("a circle to the left of a square") == [1, 1, 0, 0, 0, 0, -1, -1]
    assert word_sides("three red circles") == [0, 0, 0] and word_sides("") == []
    rng = np.random.default_rng(3)
    for _ in range(300):  # every relation caption: each object's words on its own side
        spec = sample_spec(rng, "all", kind="relation")
        text = caption(spec, rng)
        words, sides = text.split(), word_sides(text)
        subject = words.index(spec.objects[0].shape)  # named first
        reference = len(words) - 1 - words[::-1].index(spec.objects[1].shape)  # named last
        first = 1 if spec.relation in ("left of", "above") else -1
        assert (sides[subject], sides[reference]) == (first, -first), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A Red circle, LEFT of a blue square.", "relation|red circle -|left of|blue square -"),
        ("one red circle with stripes", "single|red circle striped"),
        ("a red circle", "single|red circle -"),
        ("3 yellow hollow triangles", "count|3|yellow triangle outlined"),
        ("the green square is beneath the filled red triangle", "relation|green square -|below|red triangle solid"),
    ],
)
def test_parse_is_case_and_punctuation_tolerant(text, expected):
    assert parse_prompt(text).key() == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty prompt"),
        ("a purple circle", "unknown word 'purple'"),
        ("a red", "no shape"),
        ("two red circles left of a blue square", "one object on each side"),
        ("a red circle left of", "missing an object"),
        ("a red blue circle", "two colours"),
        ("a red circle left of a red circle", "the two objects of a relation differ"),
    ],
)
def test_parse_explains_what_it_cannot_read(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(text)


def _inside(obj) -> bool:
    return obj.radius <= min(obj.cx, obj.cy, IMAGE_SIZE - obj.cx, IMAGE_SIZE - obj.cy)


def test_layouts_satisfy_their_specs():
    rng = np.random.default_rng(4)
    for _ in range(1500):
        spec = sample_spec(rng, "all")
        scene = layout(spec, rng)
        assert len(scene.objects) == spec.count if spec.kind != "relation" else 2
        assert all(_inside(obj) for obj in scene.objects)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                reach = a.radius + b.radius + GAP
                assert abs(a.cx - b.cx) >= reach - 1e-9 or abs(a.cy - b.cy) >= reach - 1e-9
        for obj, want in zip(scene.objects, spec.objects * len(scene.objects)):
            assert (obj.shape, obj.colour) == (want.shape, want.colour)
            assert want.style in (None, obj.style)
        if spec.kind == "relation":
            subject, reference = scene.objects
            dx, dy = subject.cx - reference.cx, subject.cy - reference.cy
            along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[
                spec.relation
            ]
            assert along >= MIN_RELATION_OFFSET and abs(across) <= along / 2


def test_unstated_style_is_mostly_solid():
    rng = np.random.default_rng(5)
    spec = PromptSpec("single", (ObjectSpec("circle", "red"),))
    styles = Counter(layout(spec, rng).objects[0].style for _ in range(1000))
    assert 0.72 < styles["solid"] / 1000 < 0.88


def test_render_colours_background_and_scale():
    rng = np.random.default_rng(6)
    spec = PromptSpec("single", (ObjectSpec("square", "blue", "solid"),))
    scene = layout(spec, rng)
    image = render(scene).astype(int)
    assert tuple(image[0, 0]) == scene.background
    obj = scene.objects[0]
    assert tuple(image[int(obj.cy), int(obj.cx)]) == COLOURS["blue"]
    large = render(scene, 64).astype(float)
    assert large.shape == (64, 64, 3)
    assert np.abs(large.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)) - image).mean() < 1.0


def test_backgrounds_are_lighter_than_every_colour():
    def luma(rgb: tuple[int, int, int]) -> float:
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    assert min(map(luma, BACKGROUNDS)) > max(map(luma, COLOURS.values())) + 40
