import pyarrow as pa
import pytest

from raymmc.train.blocks import concat_blocks


def test_empty_blocks_without_columns_are_left_out():
    a, b = pa.table({"id": ["x"], "index": [1]}), pa.table({"id": ["y"], "index": [0]})
    with pytest.raises(pa.ArrowInvalid):  # what Ray Data's empty block does to a plain concatenation
        pa.concat_tables([a, pa.table({}), b])
    assert concat_blocks([a, pa.table({}), b]).to_pydict() == {"id": ["x", "y"], "index": [1, 0]}
    empty = a.slice(0, 0)
    assert concat_blocks([pa.table({}), empty]).num_rows == 0 and concat_blocks([]).num_rows == 0
    with pytest.raises(pa.ArrowInvalid):  # blocks with rows keep their strict schema check
        concat_blocks([a, pa.table({"other": [1]})])
