"""Tests for extract/textviews.py: hand-made sentences of MoNuSeg, QaTa-COV19 and the synthetic set under the
8 dihedral views, the synthetic set's masks as ground truth, the group law, and the real sets' texts."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from extract.datasets import open_dataset
from extract.datasets.synthetic import REGIONS, region_map, synthetic_sample
from extract.shared import dihedral
from extract.textviews import VIEW_NAMES, mirror_text, rewrite_text, view_directions, word_changes

CORNER = "The nuclei density in the upper right is high."
ONE_ZONE = "unilateral pulmonary infection, one infected area, upper left lung."
FIVE = "bilateral pulmonary infection, five infected areas, middle lower left lung and upper middle lower right lung."

CASES = [
    # (dataset, text, view, expected): 1 = rot90 counter-clockwise, 2 = 180°, 3 = clockwise, 4 = horizontal flip,
    # 5 = anti-diagonal reflection (top ↔ right), 6 = vertical flip, 7 = transpose (top ↔ left)
    ("monuseg", CORNER, 0, CORNER),
    ("monuseg", CORNER, 1, "The nuclei density in the upper left is high."),
    ("monuseg", CORNER, 2, "The nuclei density in the lower left is high."),
    ("monuseg", CORNER, 3, "The nuclei density in the lower right is high."),
    ("monuseg", CORNER, 4, "The nuclei density in the upper left is high."),
    ("monuseg", CORNER, 5, CORNER),
    ("monuseg", CORNER, 6, "The nuclei density in the lower right is high."),
    ("monuseg", CORNER, 7, "The nuclei density in the lower left is high."),
    ("monuseg", "The nuclei density in the left is high.", 1, "The nuclei density in the lower is high."),
    ("monuseg", "The nuclei density in the left is high.", 3, "The nuclei density in the upper is high."),
    ("monuseg", "The nuclei density in the lower is high.", 4, "The nuclei density in the lower is high."),
    ("monuseg", "The nuclei density in the lower is high.", 5, "The nuclei density in the left is high."),
    ("monuseg", "Upper-left corner dense, TOP rows sparse.", 4, "Upper-right corner dense, TOP rows sparse."),
    ("monuseg", "Upper-left corner dense, TOP rows sparse.", 1, "Lower-left corner dense, LEFT rows sparse."),
    ("monuseg", "Right upper quadrant crowded.", 6, "Right lower quadrant crowded."),
    ("monuseg", "Right upper quadrant crowded.", 1, "Left upper quadrant crowded."),  # side first, as written
    ("monuseg", "the leftmost columns and the tops", 2, "the rightmost columns and the bottoms"),
    ("monuseg", "the uppermost row", 3, "the rightmost row"),
    ("monuseg", "The nuclei are evenly distributed.", 4, "The nuclei are evenly distributed."),
    ("monuseg", "The nuclei density is higher around.", 2, "The nuclei density is higher around."),
    ("monuseg", "A bright, leftover, copyright stain.", 2, "A bright, leftover, copyright stain."),
    ("qata", ONE_ZONE, 4, "unilateral pulmonary infection, one infected area, upper right lung."),
    ("qata", ONE_ZONE, 6, "unilateral pulmonary infection, one infected area, lower left lung."),
    ("qata", ONE_ZONE, 2, "unilateral pulmonary infection, one infected area, lower right lung."),
    # left = the patient's = the image's right, which a counter-clockwise turn brings to the top
    ("qata", ONE_ZONE, 1, "unilateral pulmonary infection, one infected area, right upper lung."),
    ("qata", ONE_ZONE, 3, "unilateral pulmonary infection, one infected area, left lower lung."),
    ("qata", FIVE, 4,
     "bilateral pulmonary infection, five infected areas, upper middle lower left lung and middle lower right lung."),
    ("qata", FIVE, 6,
     "bilateral pulmonary infection, five infected areas, upper middle left lung and upper middle lower right lung."),
    ("qata", FIVE, 2,
     "bilateral pulmonary infection, five infected areas, upper middle lower left lung and upper middle right lung."),
    ("qata", "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.", 4,
     "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."),
    ("qata", "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.", 6,
     "bilateral pulmonary infection, two infected areas, upper left lung and upper right lung."),
    ("qata", "Bilateral pulmonary infection, two infected areas, all left lung and middle right lung.", 4,
     "Bilateral pulmonary infection, two infected areas, middle left lung and all right lung."),
    ("qata", "unilateral pulmonary infection, two infected areas, upper middle right lung.", 6,
     "unilateral pulmonary infection, two infected areas, middle lower right lung."),
    ("synthetic", "Three lesions in the top, right and bottom regions.", 4,
     "Three lesions in the top, bottom and left regions."),
    ("synthetic", "Lesion seen in the left region.", 1, "Lesion seen in the bottom region."),
]


@pytest.mark.parametrize(("dataset", "text", "view", "expected"), CASES)
def test_rewrite_cases(dataset, text, view, expected):
    assert rewrite_text(text, view, dataset) == expected


def test_view_directions_follow_dihedral():
    # rot90 of numpy turns counter-clockwise: the top goes left; view 4 is a flip of the last axis
    assert view_directions(1) == {"U": "L", "L": "D", "D": "R", "R": "U"}
    assert view_directions(4) == {"U": "U", "D": "D", "L": "R", "R": "L"}
    assert view_directions(6) == {"U": "D", "D": "U", "L": "L", "R": "R"}
    with pytest.raises(ValueError, match="view must lie"):
        view_directions(8)


def test_mirror_is_the_half_turn():
    assert mirror_text(CORNER, "monuseg") == "The nuclei density in the lower left is high."
    assert mirror_text(mirror_text(FIVE, "qata"), "qata") == FIVE
    assert mirror_text(FIVE, "qata") == rewrite_text(FIVE, 2, "qata")


def test_unknown_dataset_uses_the_image_sides():
    assert rewrite_text(CORNER, 4, "mine") == rewrite_text(CORNER, 4, "folder") == \
        "The nuclei density in the upper left is high."


def _compose(v: int, w: int) -> int:
    """The view c with dihedral(dihedral(x, w), v) == dihedral(x, c)."""
    x = np.arange(9).reshape(3, 3)
    return next(c for c in range(8) if np.array_equal(dihedral(dihedral(x, w), v), dihedral(x, c)))


def _group_law(texts: list[str], dataset: str) -> None:
    for text in texts:
        for w in range(8):
            once = rewrite_text(text, w, dataset)
            for v in range(8):
                assert rewrite_text(once, v, dataset) == rewrite_text(text, _compose(v, w), dataset), (text, v, w)


def test_group_law_on_hand_made_texts():
    # (top / bottom come back as upper / lower after a quarter turn: the dataset's vertical family)
    _group_law([CORNER, "Upper-left corner dense, LOWER rows sparse.", "the leftmost columns"], "monuseg")
    _group_law([ONE_ZONE, FIVE], "qata")


def _named(text: str) -> set[str]:
    return set(re.findall("|".join(REGIONS), text))


def test_synthetic_rewrite_names_the_regions_of_the_view_mask():
    """The synthetic set's ground truth: after a view, the mask's discs lie in exactly the regions the rewritten
    text names (its diagonal regions map onto each other under every view)."""
    regions = region_map(64)
    for index in range(6):
        sample = synthetic_sample(0, "train", index, 64)
        assert _named(sample.text) == set(sample.named)
        for view in range(8):
            seen = {REGIONS[q] for q in np.unique(regions[dihedral(sample.mask, view) > 0])}
            assert _named(rewrite_text(sample.text, view, "synthetic")) == seen, (index, view)


def test_real_texts(monuseg_root, qata_root):
    """10 of MoNuSeg's 24 training texts name a side, all of QaTa's 600 training captions; every rewrite obeys the
    group law; the flips of QaTa captions stay in QaTa's wording (zones top to bottom, left lung first)."""
    monuseg = [i.text for i in open_dataset("monuseg", monuseg_root, splits=["train"]).items]
    qata = [i.text for i in open_dataset("qata", qata_root, splits=["train"]).items]
    assert len(monuseg) == 24 and len(qata) == 600
    moved = [t for t in monuseg if any(rewrite_text(t, v, "monuseg") != t for v in range(8))]
    assert len(moved) == 10
    assert all(any(rewrite_text(t, v, "qata") != t for v in range(8)) for t in qata)
    _group_law(sorted(set(monuseg)), "monuseg")
    _group_law(sorted(set(qata)), "qata")
    zones = re.compile(r"(?:(?:upper )?(?:middle )?(?:lower )?(?:left|right) lung(?: and )?)+\.$")
    for text in set(qata):
        for view in (2, 4, 6):
            out = rewrite_text(text, view, "qata")
            assert zones.search(out) and out.count("left") == text.count("left") + text.count("right") - \
                out.count("right"), out
            if " and " in out:
                assert out.index("left") < out.index("right"), out


def test_readme_table_is_the_rewrite():
    """README's table of the rewrite, view by view, is what the code does."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for view in range(8):
        row = (f"| {view} | {VIEW_NAMES[view]} | {word_changes(view, 'monuseg')} | {word_changes(view, 'qata')} | "
               f"{word_changes(view, 'synthetic')} |")
        assert row in readme, row
    assert word_changes(4, "qata") == "left ↔ right" and word_changes(0, "monuseg") == "—"
    assert word_changes(1, "monuseg") == "upper → left, lower → right, left → lower, right → upper"
    # view 1 of a QaTa caption moves the patient's left lung (the image's right) to the top
    assert word_changes(1, "qata") == "upper → right, lower → left, left → upper, right → lower"
