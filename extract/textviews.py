"""A text that follows its image's dihedral view: the positional words rewritten to stay true of the view.

``rewrite_text(text, view, dataset)`` is ``text`` said of ``dihedral(image, view)`` (rot90 × (view % 4),
then a flip of the last axis if view ≥ 4): a horizontal flip swaps left and right, a vertical one upper and
lower (top and bottom), a 90° rotation turns one axis into the other (counter-clockwise: upper → left,
left → lower, lower → right, right → upper). Where each side goes is read off :func:`extract.shared.dihedral`
itself (:func:`view_directions`). Words without an image side are left alone; case, hyphens and plural /
"-most" forms are kept. ``mirror_text`` is the rewrite for the 180° rotation (left ↔ right and upper ↔ lower).

Each dataset has its word table and its word order (:data:`VOCABULARIES`):

- ``monuseg`` (and ``folder``, the default for any other name): "upper right" and the like name the
  image's sides; a corner keeps the axis order it was written in ("upper right" → "upper left", never
  "left upper").
- ``qata``: captions "<zones> <side> lung": left and right are the *patient's* (a PA chest X-ray shows
  the left lung on the image's right), upper / middle / lower the lung's zones from top to bottom. Zones
  are re-sorted top to bottom (left to right once a rotation lays them across), and the two clauses of a
  bilateral caption put the left (or upper) lung first, as the captions do — so a caption that is
  symmetric under a view comes back unchanged.
- ``synthetic``: the named regions (top, right, bottom, left) are re-listed in that order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from extract.shared import dihedral

VIEWS = 8
#: the rewrite's version, in the key of a store whose views keep their own text: a change to the word tables or
#: the word order that changes any rewritten text bumps it (such stores are then made anew)
TEXT_VIEWS_VERSION = "textviews-1"
_AXIS = {"U": "V", "D": "V", "L": "H", "R": "H", "C": "C"}  # image top, bottom, left, right; C: centre (middle)
_FORMS = ("", "most", "s")          # upper / uppermost; top / tops


@dataclass(frozen=True)
class _Word:
    """A positional word: the image side it names, its family ("upper/lower", "top/bottom", ...), its form."""

    side: str
    family: str
    form: str


@dataclass
class _Run:
    """Adjacent positional words (joined by a space or a hyphen), each slot's case and the separator before it
    (the first slot's is empty). Reordering moves words between slots; the slots keep their case."""

    words: list[_Word]
    cases: list[str]
    seps: list[str]


RunOrder = Callable[[list[_Run], list[_Run]], None]


@dataclass(frozen=True)
class Vocabulary:
    """One dataset's positional words. ``families[f][side]``: family f's word for an image side;
    ``vertical``: the family a left / right word joins when a rotation makes it vertical; ``run_order(original,
    moved)`` puts the moved words of each run in the dataset's order; ``text_order`` reorders the rendered text
    (clauses)."""

    families: dict[str, dict[str, str]]
    vertical: str
    run_order: RunOrder
    text_order: Callable[[str], str] = lambda text: text

    def lookup(self, token: str) -> _Word | None:
        low = token.lower()
        for family, words in self.families.items():
            for side, word in words.items():
                for form in _FORMS:
                    if low == word + form:
                        return _Word(side, family, form)
        return None

    def word(self, w: _Word) -> str:
        family = w.family if w.side in self.families[w.family] else (
            self.vertical if _AXIS[w.side] == "V" else "left/right")
        return self.families[family][w.side] + w.form


def view_directions(view: int) -> dict[str, str]:
    """Where each image side (U, D, L, R) goes under ``dihedral(·, view)``, read off a 3×3 grid of labels."""
    if not 0 <= view < VIEWS:
        raise ValueError(f"view must lie in [0, {VIEWS - 1}], got {view}")
    grid = np.array([["", "U", ""], ["L", "", "R"], ["", "D", ""]], dtype=object)
    out = dihedral(grid, view)
    at = {"U": out[0, 1], "D": out[2, 1], "L": out[1, 0], "R": out[1, 2]}
    return {label: side for side, label in at.items()}


def _case_of(token: str) -> str:
    if token.isupper() and len(token) > 1:
        return "upper"
    return "title" if token[:1].isupper() else "lower"


def _cased(word: str, case: str) -> str:
    return word.upper() if case == "upper" else word.capitalize() if case == "title" else word


def _parse(text: str, vocab: Vocabulary) -> list[str | _Run]:
    """``text`` as literal strings and runs of positional words."""
    tokens = re.split(r"([A-Za-z]+)", text)  # even indices: separators, odd: words
    segments: list[str | _Run] = []
    literal, run = "", None
    for i, token in enumerate(tokens):
        word = vocab.lookup(token) if i % 2 else None
        if word is None:
            if run is not None and token in (" ", "-") and i + 1 < len(tokens) \
                    and vocab.lookup(tokens[i + 1]) is not None:
                run.seps.append(token)
                continue
            if run is not None:
                segments.append(run)
                run = None
            literal += token
            continue
        if run is None:
            segments.append(literal)
            literal, run = "", _Run([], [], [""])
        run.words.append(word)
        run.cases.append(_case_of(token))
    segments.append(literal)  # re.split ends on a separator, which closed any run
    return segments


def _render(segments: list[str | _Run], vocab: Vocabulary) -> str:
    out = []
    for seg in segments:
        if isinstance(seg, str):
            out.append(seg)
        else:
            out.extend(sep + _cased(vocab.word(w), case) for w, case, sep in zip(seg.words, seg.cases, seg.seps))
    return "".join(out)


def _runs(segments: list[str | _Run]) -> list[_Run]:
    return [s for s in segments if isinstance(s, _Run)]


def corner_order(original: list[_Run], moved: list[_Run]) -> None:
    """Each run keeps the axis order it was written in ("upper right" → "upper left", not "left upper")."""
    for before, run in zip(original, moved):
        first = _AXIS[before.words[0].side]
        run.words.sort(key=lambda w: _AXIS[w.side] != first)


_ZONE_RANK = {"U": 0, "L": 0, "C": 1, "D": 2, "R": 2}  # top to bottom; left to right once laid across


def zone_order(original: list[_Run], moved: list[_Run]) -> None:
    """QaTa's "<zones> <side> lung": the zones (all words but the last) sorted top to bottom (left to right)."""
    for run in moved:
        run.words[:-1] = sorted(run.words[:-1], key=lambda w: _ZONE_RANK[w.side])


_CLAUSES = re.compile(r"\b(?P<a>(?:[\w-]+ )*?(?P<sa>left|right|upper|lower) lung) and "
                      r"(?P<b>(?:[\w-]+ )*?(?P<sb>left|right|upper|lower) lung)\b", re.IGNORECASE)
_CLAUSE_RANK = {"left": 0, "upper": 0, "right": 1, "lower": 1}


def clause_order(text: str) -> str:
    """A bilateral caption names the left lung first (the upper one once a rotation stacks them), as QaTa does."""

    def swap(m: re.Match[str]) -> str:
        if _CLAUSE_RANK[m["sa"].lower()] > _CLAUSE_RANK[m["sb"].lower()]:
            return f"{m['b']} and {m['a']}"
        return m[0]

    return _CLAUSES.sub(swap, text)


_REGION_RANK = {"U": 0, "R": 1, "D": 2, "L": 3}  # extract.datasets.synthetic.REGIONS: top, right, bottom, left


def region_order(original: list[_Run], moved: list[_Run]) -> None:
    """The synthetic set's named regions re-listed top, right, bottom, left (the generator's order)."""
    words = sorted((w for r in moved for w in r.words), key=lambda w: _REGION_RANK[w.side])
    for run in moved:
        run.words, words = words[:len(run.words)], words[len(run.words):]


_IMAGE_SIDES = {"upper/lower": {"U": "upper", "D": "lower"}, "top/bottom": {"U": "top", "D": "bottom"},
                "left/right": {"L": "left", "R": "right"}}
_LUNG_ZONES = {"upper/lower": {"U": "upper", "D": "lower"}, "middle": {"C": "middle"},
               "left/right": {"L": "right", "R": "left"}}  # a PA chest X-ray shows the patient's left on the right

VOCABULARIES: dict[str, Vocabulary] = {
    "monuseg": Vocabulary(_IMAGE_SIDES, "upper/lower", corner_order),
    "folder": Vocabulary(_IMAGE_SIDES, "upper/lower", corner_order),
    "qata": Vocabulary(_LUNG_ZONES, "upper/lower", zone_order, clause_order),
    "synthetic": Vocabulary({"top/bottom": {"U": "top", "D": "bottom"}, "left/right": {"L": "left", "R": "right"}},
                            "top/bottom", region_order),
}
"""Each dataset's positional words and word order; any other dataset name uses ``folder``'s."""


def rewrite_text(text: str, view: int, dataset: str) -> str:
    """``text`` said of view ``view`` of its image (:func:`extract.shared.dihedral`), in ``dataset``'s words.

    Datasets without a table of their own (anything but monuseg, qata, synthetic) use ``folder``'s: the
    image's upper / lower / top / bottom / left / right.
    """
    to = view_directions(view)
    if view == 0:  # the image itself: its text as written
        return text
    vocab = VOCABULARIES.get(dataset, VOCABULARIES["folder"])
    original = _parse(text, vocab)
    moved = [s if isinstance(s, str) else
             _Run([replace(w, side=to.get(w.side, w.side)) for w in s.words], s.cases, s.seps) for s in original]
    vocab.run_order(_runs(original), _runs(moved))
    return vocab.text_order(_render(moved, vocab))


VIEW_NAMES = ("identity", "rot90 (counter-clockwise)", "rot180", "rot270 (clockwise)", "horizontal flip",
              "rot90 + flip (anti-diagonal)", "vertical flip", "rot270 + flip (transpose)")


def word_changes(view: int, dataset: str) -> str:
    """How ``view`` changes ``dataset``'s side words, in the base forms (the README's table): "left ↔ right",
    "upper → left, left → lower, ...", or "—"."""
    to = view_directions(view)
    vocab = VOCABULARIES.get(dataset, VOCABULARIES["folder"])
    word = {side: vocab.word(_Word(side, vocab.vertical if _AXIS[side] == "V" else "left/right", ""))
            for side in ("U", "D", "L", "R")}
    parts, done = [], set()
    for side in sorted(word, key=lambda side: [word["U"], word["D"], "left", "right"].index(word[side])):
        if side in done or to[side] == side:
            continue
        if to[to[side]] == side:
            parts.append(f"{word[side]} ↔ {word[to[side]]}")
            done |= {side, to[side]}
        else:
            parts.append(f"{word[side]} → {word[to[side]]}")
    return ", ".join(parts) or "—"


def mirror_text(text: str, dataset: str) -> str:
    """``text`` said of its image rotated by 180° (left ↔ right and upper ↔ lower): view 2."""
    return rewrite_text(text, 2, dataset)
