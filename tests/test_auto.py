"""`--algorithm auto` picks from the archive's modalities, read from Parquet metadata."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymmc.io.shards import discover, present_counts
from raymmc.pipeline import choose_algorithm


def archive(tmp_path, images, captions):
    t = pa.table({"id": [str(i) for i in range(len(images))], "image": pa.array(images, pa.binary()),
                  "caption": pa.array(captions, pa.string())})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=3)
    return discover(str(tmp_path))


@pytest.mark.parametrize("images,captions,expected", [
    ([b"x"] * 6, ["c"] * 5 + [None], "jecl"),
    ([b"x"] * 3 + [None] * 3, [None] * 3 + ["c"] * 3, "dm2c"),
    ([b"x"] * 6, [None] * 6, "mmdc"),
    ([None] * 6, ["c"] * 6, "dec"),
])
def test_choice(tmp_path, images, captions, expected):
    counts = present_counts(archive(tmp_path, images, captions))
    assert counts == {"rows": 6, "image": sum(i is not None for i in images),
                      "caption": sum(c is not None for c in captions)}
    algorithm, why = choose_algorithm(counts)
    assert algorithm == expected and why


def test_files_without_a_column_count_as_absent(tmp_path):
    pq.write_table(pa.table({"id": ["1", "2"], "caption": ["a", "b"]}), tmp_path / "t.parquet")
    assert present_counts(discover(str(tmp_path))) == {"rows": 2, "image": 0, "caption": 2}
