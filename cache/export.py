"""``pipeline cache export``: the same store in the other format (zarr folder <-> HDF5 file).

Rows are copied the way extraction writes them (data, checksum, then the done flag), so an
interrupted export leaves a valid, partial store, and running the export again copies only the
rows still missing. Only rows marked done in the source are copied.
"""

from __future__ import annotations

from collections.abc import Callable
from cache.backends import FORMATS, Location, as_location, basename, dirname, join
from cache.key import FORMAT_VERSION
from cache.schema import BASE_ARRAYS, VIEW_TEXT_ARRAYS, StoreError, feat_rel
from cache.store import FeatureStore, format_of

# root attributes a new store sets itself; everything else (how it was made) is carried over
_OWN_ATTRS = {"textdiff", "key", "key_hash", "format_version", "size", "textdiff_version", "created",
              "token_len", "token_dim", "splits"}


def export_target(src: Location, store_format: str, dest: Location | None = None) -> Location:
    """Where ``export_store`` writes: ``dest`` (a path or URL), or the source's path with the other suffix."""
    if store_format not in FORMATS:
        raise StoreError(f"store_format must be one of {list(FORMATS)}, got {store_format!r}")
    if dest is None:
        src = as_location(src)
        stem = basename(src).rsplit(".", 1)[0]
        dest = join(dirname(src), f"{stem}.{store_format}")
    dest = as_location(dest)
    if format_of(dest) != store_format:
        raise StoreError(f"{dest}: an {store_format} store's name must end in .{store_format}")
    return dest


def export_store(src_path: Location, store_format: str, dest: Location | None = None,
                 progress: Callable[[], None] | None = None) -> Location:
    """Copy the store at ``src_path`` into a store of ``store_format``; returns its path."""
    src = FeatureStore.open(src_path)
    target = export_target(src.path, store_format, dest)
    if src.format == store_format and str(target) in (str(src.path), src.location):
        raise StoreError(f"{src.path} is already a {store_format} store")
    if src.version != FORMAT_VERSION:  # its rows would sit in a store that says they are of today's format
        raise StoreError(f"{src.path}: a store of format {src.version} is read, never copied; re-extract it "
                         f"(format {FORMAT_VERSION}) to have it as {store_format}")
    attrs = src.attrs
    out = FeatureStore.create(target, src.key, size=src.size, splits={s: src.layout(s) for s in src.splits()},
                              token_len=attrs["token_len"], token_dim=attrs["token_dim"],
                              extra_attrs={**{k: v for k, v in attrs.items() if k not in _OWN_ATTRS},
                                           "exported_from": {"path": str(src.path)}})
    pairs = src.pairs()
    shapes = {p: src.feature_shape(*p) for p in pairs}
    out.writer.ensure_pairs([(s, b, shapes[s, b][0], shapes[s, b][1:]) for s, b in pairs])
    for split in src.splits():
        have = out.done(split)
        names = BASE_ARRAYS + (VIEW_TEXT_ARRAYS if src.view_texts(split) is not None else ())
        for i in src.done(split).nonzero()[0]:
            if not have[i]:
                out.writer.write_base(split, int(i), **{name: src.read(f"{split}/{name}", int(i)) for name in names})
            if progress:
                progress()
        for step, block in pairs:
            have = out.done(split, step, block)
            for i in src.done(split, step, block).nonzero()[0]:
                if not have[i]:
                    out.writer.write_features(split, int(i), step, block, src.read(feat_rel(split, step, block), int(i)))
                if progress:
                    progress()
    out.close()
    src.close()
    return target
