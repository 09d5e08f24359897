"""The shapes world's vocabulary and prompt specifications (what a prompt asks for).

A :class:`PromptSpec` is the attribute combination behind a caption, without its wording:
``"a red circle left of a blue square"`` and ``"the red circle is to the left of the blue square"``
have the same spec. Specs state facts (:meth:`PromptSpec.facts`) that the evaluator checks and
decide the held-out split (:func:`is_heldout`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 190, 20),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
}
SHAPES = ("circle", "square", "triangle")
STYLES = ("solid", "outlined", "striped")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "count", "relation")
MAX_COUNT = 3

# The relation that says the same with subject and reference swapped.
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELDOUT_PERMILLE = 120


@dataclass(frozen=True)
class Fact:
    """One checkable statement of a prompt; ``obj`` indexes the spec's objects it is about."""

    category: str  # "shape" | "colour" | "count" | "position" | "style"
    text: str
    obj: int = 0


@dataclass(frozen=True)
class ObjectSpec:
    """An object a prompt asks for; ``style`` is None when the prompt does not state it."""

    shape: str
    colour: str
    style: str | None = None

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(COLOURS))
        if self.style is not None:
            _check_choice("style", self.style, STYLES)

    @property
    def noun(self) -> str:
        """``"red circle"``: colour and shape, the identity the evaluator matches on."""
        return f"{self.colour} {self.shape}"

    def key(self) -> str:
        """``"red circle solid"``, or ``"red circle -"`` when the style is not stated."""
        return f"{self.noun} {self.style or '-'}"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for: one object, ``count`` identical objects, or two in a relation."""

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        n_objects = 2 if self.kind == "relation" else 1
        if len(self.objects) != n_objects:
            raise ValueError(f"a {self.kind} prompt has {n_objects} object(s), got {len(self.objects)}")
        if not 1 <= self.count <= MAX_COUNT or (self.kind != "count" and self.count != 1):
            raise ValueError(f"count {self.count} is invalid for a {self.kind} prompt")
        if self.kind == "relation":
            _check_choice("relation", self.relation, RELATIONS)
            if self.objects[0].noun == self.objects[1].noun:
                raise ValueError(f"the two objects of a relation differ, got two {self.objects[0].noun}s")
        elif self.relation is not None:
            raise ValueError(f"a {self.kind} prompt has no relation, got {self.relation!r}")

    def key(self) -> str:
        """Canonical string of the attribute combination, e.g. ``"count|2|blue triangle -"``."""
        if self.kind == "single":
            return f"single|{self.objects[0].key()}"
        if self.kind == "count":
            return f"count|{self.count}|{self.objects[0].key()}"
        subject, reference = self.objects
        return f"relation|{subject.key()}|{self.relation}|{reference.key()}"

    def converse(self) -> PromptSpec:
        """The same relation said the other way round (reference first); other kinds unchanged."""
        if self.kind != "relation":
            return self
        return PromptSpec("relation", self.objects[::-1], relation=CONVERSE[self.relation])

    def facts(self) -> list[Fact]:
        """The facts this prompt states, in a fixed order."""
        facts: list[Fact] = []
        for i, obj in enumerate(self.objects):
            facts.append(Fact("shape", f"there is a {obj.shape}", i))
            facts.append(Fact("colour", f"a {obj.shape} is {obj.colour}", i))
            facts.append(Fact("count", f"exactly {self.count} {obj.noun}{'s' * (self.count > 1)}", i))
            if obj.style is not None:
                facts.append(Fact("style", f"the {obj.noun} is {obj.style}", i))
        if self.kind == "relation":
            subject, reference = self.objects
            facts.append(Fact("position", f"the {subject.noun} is {self.relation} the {reference.noun}"))
        return facts


def is_heldout(spec: PromptSpec) -> bool:
    """Whether ``spec`` belongs to the held-out split (about 12% of combinations of every kind).

    Decided by a hash of the canonical key, so it is fixed across runs and machines; a relation
    and its converse (``A left of B`` / ``B right of A``) always fall in the same split.
    """
    key = min(spec.key(), spec.converse().key())
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 1000 < HELDOUT_PERMILLE


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
