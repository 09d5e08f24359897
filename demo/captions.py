"""Captions of the shapes world: a small grammar with paraphrases, and its parser.

Every caption :func:`caption` writes parses back to its spec with :func:`parse_prompt`, which
also accepts any case and punctuation, word order variants of the adjectives and a prompt that
leaves the style of a single object unstated (``"a red circle"``).
"""

from __future__ import annotations

import re

import numpy as np

from .spec import COLOURS, RELATIONS, SHAPES, STYLES, ObjectSpec, PromptSpec

STYLE_WORDS = {"solid": ("solid", "filled"), "outlined": ("outlined", "hollow"), "striped": ("striped",)}
STRIPES_SUFFIX = ("with", "stripes")
NUMBER_WORDS = {1: ("one",), 2: ("two",), 3: ("three",)}
DIGIT_PROBABILITY = 0.1
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

_ARTICLES = ("a", "an", "the")
_NUMBERS = {word: n for n, words in NUMBER_WORDS.items() for word in (*words, str(n))}
_STYLE_BY_WORD = {word: style for style, words in STYLE_WORDS.items() for word in words}
_SHAPE_BY_WORD = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
_RELATION_KEYWORDS = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(obj: ObjectSpec, rng: np.random.Generator, plural: bool = False) -> str:
    """``"striped red circle"``, ``"red striped circle"``, ``"red circles with stripes"``, ..."""
    shape = obj.shape + "s" * plural
    if obj.style is None:
        return f"{obj.colour} {shape}"
    adjective = _pick(rng, STYLE_WORDS[obj.style])
    forms = [f"{adjective} {obj.colour} {shape}", f"{obj.colour} {adjective} {shape}"]
    if obj.style == "striped":
        forms.append(f"{obj.colour} {shape} {' '.join(STRIPES_SUFFIX)}")
    return forms[int(rng.integers(len(forms)))]


def _with_article(article: str, phrase: str) -> str:
    if article == "a" and phrase[0] in "aeiou":
        article = "an"
    return f"{article} {phrase}"


def caption(spec: PromptSpec, rng: np.random.Generator) -> str:
    """A caption for ``spec``, one of several paraphrases chosen by ``rng``."""
    if spec.kind == "single":
        return _with_article(_pick(rng, ("a", "one")), noun_phrase(spec.objects[0], rng))
    if spec.kind == "count":
        number = str(spec.count) if rng.random() < DIGIT_PROBABILITY else _pick(rng, NUMBER_WORDS[spec.count])
        return f"{number} {noun_phrase(spec.objects[0], rng, plural=spec.count > 1)}"
    article = _pick(rng, ("a", "the"))
    subject, reference = (_with_article(article, noun_phrase(obj, rng)) for obj in spec.objects)
    verb = _pick(rng, ("", "is "))
    return f"{subject} {verb}{_pick(rng, RELATION_PHRASES[spec.relation])} {reference}"


def parse_prompt(text: str) -> PromptSpec:
    """The spec of a shapes-world prompt; raises ValueError naming what it cannot read."""
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if not words:
        raise ValueError("empty prompt; try e.g. 'a red circle left of a blue square'")
    try:
        where = next(i for i, word in enumerate(words) if word in _RELATION_KEYWORDS)
    except StopIteration:
        obj, count = _parse_object(words, text)
        return PromptSpec("count" if count > 1 else "single", (obj,), count=count)
    relation = _RELATION_KEYWORDS[words[where]]
    start, end = _relation_span(words, where, relation, text)
    left = words[:start]
    if left and left[-1] in ("is", "are"):
        left = left[:-1]
    sides = [_parse_object(side, text) for side in (left, words[end:])]
    if any(count != 1 for _, count in sides):
        raise ValueError(f"a relation takes one object on each side: {text!r}")
    return PromptSpec("relation", (sides[0][0], sides[1][0]), relation=relation)


def word_sides(text: str) -> list[int]:
    """Per word of a caption (``text.split()``): +1 if it describes the object on the left or on top,
    -1 the other object, 0 the relation phrase and every word of a single or count caption.

    What a relation caption says about each object's side follows from the grammar alone: the
    subject is named first, and "left of" or "above" puts it left or on top. The demo model's
    text head learns to write this into the token states (``recipes/shapes_demo/train.py``).
    """
    words = text.lower().split()
    where = next((i for i, word in enumerate(words) if word in _RELATION_KEYWORDS), None)
    if where is None:
        return [0] * len(words)
    relation = _RELATION_KEYWORDS[words[where]]
    start, end = _relation_span(words, where, relation, text)
    if start > 0 and words[start - 1] in ("is", "are"):
        start -= 1
    sign = 1 if relation in ("left of", "above") else -1
    return [sign] * start + [0] * (end - start) + [-sign] * (len(words) - end)


def _relation_span(words: list[str], where: int, relation: str, text: str) -> tuple[int, int]:
    """Token range of the relation phrase whose keyword is at ``where``."""
    if relation not in ("left of", "right of"):
        return where, where + 1
    if words[where + 1 : where + 2] != ["of"]:
        raise ValueError(f"expected '{words[where]} of' in {text!r}")
    start = where
    if start > 0 and words[start - 1] == "the":
        start -= 1
        if start > 0 and words[start - 1] in ("to", "on"):
            start -= 1
    return start, where + 2


def _parse_object(words: list[str], text: str) -> tuple[ObjectSpec, int]:
    """One object phrase: optional article or number, colour, shape, optional style."""
    if not words:
        raise ValueError(f"missing an object in {text!r}; relations read '<object> left of <object>'")
    count = 1
    if words[0] in _NUMBERS:
        count, words = _NUMBERS[words[0]], words[1:]
    elif words[0] in _ARTICLES:
        words = words[1:]
    if len(words) >= 2 and tuple(words[-2:]) == STRIPES_SUFFIX:
        words = [*words[:-2], "striped"]
    found: dict[str, str] = {}
    for word in words:
        category, value = _classify(word, text)
        if category in found:
            raise ValueError(f"two {category}s ({found[category]}, {value}) for one object in {text!r}")
        found[category] = value
    for category in ("colour", "shape"):
        if category not in found:
            raise ValueError(f"no {category} in {text!r}; {category}s: {', '.join(_choices(category))}")
    return ObjectSpec(found["shape"], found["colour"], found.get("style")), count


def _classify(word: str, text: str) -> tuple[str, str]:
    if word in COLOURS:
        return "colour", word
    if word in _SHAPE_BY_WORD:
        return "shape", _SHAPE_BY_WORD[word]
    if word in _STYLE_BY_WORD:
        return "style", _STYLE_BY_WORD[word]
    vocabulary = ", ".join([*COLOURS, *SHAPES, *_STYLE_BY_WORD, "with stripes", *RELATIONS])
    raise ValueError(f"unknown word {word!r} in {text!r}; the shapes world knows: {vocabulary}")


def _choices(category: str) -> tuple[str, ...]:
    return {"colour": tuple(COLOURS), "shape": SHAPES, "style": STYLES}[category]
