"""Dataset readers: image + mask + text triples in train / val / test splits.

``open_dataset(name, root)`` reads one of four sources into a :class:`Dataset`: ``monuseg`` (LViT's
layout), ``qata`` (SGSeg's or LViT's layout, detected), ``folder`` (``images/``, ``masks/`` and a text
table, flat or per split) — see :mod:`extract.datasets.layouts` for each layout — and ``synthetic``
(generated from a seed, options ``seed``, ``counts``, ``native_size``; the text is necessary to
segment it — see :func:`synthetic_sample`). Other readers can :func:`register` under a new name.

Structural problems (missing mask, a text row with no image, an image with no text, empty text)
raise one :class:`DatasetError` listing every problem, or with ``skip_bad=True`` drop those items
and record them in ``Dataset.skipped``. Unreadable files raise when loaded.

Modules (one job each; this package re-exports their public names):

``core``       splits, :class:`Item`, :class:`DatasetError`, the one-line problem report
``decoding``   image / mask files → arrays (PIL, tifffile; DICOM with pydicom), resizing (masks: nearest or the
               authors'), the preprocessing record
``dataset``    :class:`Dataset`: items in order, loading, fingerprint
``tables``     text tables (.csv / .xlsx), and tables of image paths
``matching``   text rows ↔ image and mask files
``layouts``    the on-disk layouts, registered as ``monuseg``, ``qata``, ``folder``
``synthetic``  the generator, registered as ``synthetic``
``registry``   :func:`open_dataset`: dispatch by name to a registered reader
``checks``     :func:`check_files`: decode every file before extraction writes anything
"""

from __future__ import annotations

from extract.datasets.core import DEFAULT_BLOCKS, DICOM_EXTS, IMAGE_EXTS, SPLITS, DatasetError, Item, problems_error
from extract.datasets.decoding import (MASK_RESIZES, MissingExtraError, check_mask_resize, decode_image, decode_mask,
                                       is_dicom, preprocessing, quiet_decoders, read_image, resize_image, resize_mask)
from extract.datasets.dataset import Dataset
from extract.datasets.tables import Row, read_column, read_table
from extract.datasets.registry import open_dataset, register
from extract.datasets import layouts as _layouts  # noqa: F401  (registers monuseg, qata, folder)
from extract.datasets.synthetic import (DEFAULT_COUNTS, OBJECT_RGB, REGIONS, SYNTHETIC_VERSION, SyntheticSample,
                                        region_map, region_map_at, synthetic_sample)
from extract.datasets.checks import check_files
from extract.shared import to_unit_range

__all__ = [
    "DEFAULT_BLOCKS", "DEFAULT_COUNTS", "DICOM_EXTS", "IMAGE_EXTS", "MASK_RESIZES", "OBJECT_RGB", "REGIONS", "SPLITS",
    "SYNTHETIC_VERSION", "Dataset", "DatasetError", "Item", "MissingExtraError", "Row", "SyntheticSample",
    "check_files", "check_mask_resize", "decode_image", "decode_mask", "is_dicom", "open_dataset", "preprocessing",
    "problems_error", "quiet_decoders", "read_column", "read_image", "read_table", "region_map", "region_map_at",
    "register", "resize_image", "resize_mask",
    "synthetic_sample", "to_unit_range",
]
