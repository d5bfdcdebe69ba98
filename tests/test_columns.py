"""Every combination of the shard contract's optional columns runs end to end, and a property test over random
shard contents shows every row accounted for exactly once (real local Ray cluster, real MobileNetV2, real runs).

The first version crashed on every archive without a ``label`` column (Ray Data turned the all-null column into
floats between stages); these tests keep that class of bug from coming back."""

import io
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_hostile_input import _string_array

from raymmc.cli import main
from raymmc.config import load_config
from raymmc.io.rundir import RunDir
from raymmc.pipeline import run

pytestmark = pytest.mark.slow

CONTENT = [("image", "caption"), ("image",), ("caption",)]


def _png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), ((40 * k) % 256, (90 * k) % 256, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, ids, images=None, captions=None, labels=None) -> None:
    cols = {"id": pa.array(ids, pa.string())}
    if images is not None:
        cols["image"] = pa.array(images, pa.binary())
    if captions is not None:
        cols["caption"] = _string_array([c if c is None or isinstance(c, bytes) else c.encode() for c in captions])
    if labels is not None:
        cols["label"] = pa.array(labels, pa.string())
    pq.write_table(pa.table(cols), path)


# Each content without a label column (the crash class above), and the full contract once; the property test
# below mixes the rest (labelled and unlabelled files of every content in one archive).
COMBINATIONS = [(content, False) for content in CONTENT] + [(CONTENT[0], True)]


@pytest.mark.parametrize("content,labelled", COMBINATIONS,
                         ids=lambda v: "+".join(v) if isinstance(v, tuple) else ("label" if v else "no-label"))
def test_every_optional_column_combination(ray_session, tmp_path, content, labelled):
    n = 12
    ids = [f"item-{i}" for i in range(n)]
    _write(tmp_path / "a.parquet", ids,
           images=[_png(i % 3) for i in range(n)] if "image" in content else None,
           captions=[f"a {['red', 'green', 'blue'][i % 3]} square number {i}" for i in range(n)]
           if "caption" in content else None,
           labels=[["r", "g", "b"][i % 3] for i in range(n)] if labelled else None)
    cfg = load_config(values={"input": str(tmp_path), "output": str(tmp_path / "runs"), "run_name": "r",
                              "cluster": {"clusters": 3}, "extract": {"text": {"model": "tfidf"}}})
    result = run(cfg, log=lambda _: None)
    rundir = RunDir(result.run_uri)
    assigned = rundir.read_table("assignments").column("id").to_pylist()
    assert sorted(assigned) == sorted(ids) and rundir.read_table("rejects").num_rows == 0
    metrics = rundir.read_json("metrics.json")
    assert ("nmi" in metrics) == labelled and sum(metrics["cluster_sizes"].values()) == n
    assert rundir.exists("report/index.html")
    counts = result.manifest["counts"]
    assert counts["with_image"] == (n if "image" in content else 0)
    assert counts["with_text"] == (n if "caption" in content else 0)


def test_extract_command_on_an_unlabelled_archive(ray_session, tmp_path, capsys):
    _write(tmp_path / "a.parquet", ["x", "y", "z"], images=[_png(k) for k in range(3)],
           captions=["one", "two", "three"])
    assert main(["extract", "--input", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "cache"),
                 "--set", "extract.text.model=tfidf"]) == 0
    assert "features of 1 file(s)" in capsys.readouterr().out


# --- the property ----------------------------------------------------------------------------------------------

IMAGES = {"valid": lambda k: _png(k), "corrupt": lambda k: b"\x89PNG\r\n\x1a\n broken", "empty": lambda k: b"",
          "none": lambda k: None}
CAPTIONS = {"text": "a small picture", "empty": "", "blank": "  \t ", "none": None, "huge": "word " * 30_000,
            "non-utf8": b"caf\xe9 cr\xe8me"}
row = st.tuples(st.sampled_from(["a", "b", "c", "d", "e", None, ""]), st.sampled_from(sorted(IMAGES)),
                st.sampled_from(sorted(CAPTIONS)), st.sampled_from(["l1", "l2", None]))
shard = st.tuples(st.sampled_from(CONTENT), st.booleans(), st.lists(row, min_size=0, max_size=5))


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=st.lists(shard, min_size=1, max_size=3))
def test_every_row_is_accounted_for_exactly_once(ray_session, files):
    with tempfile.TemporaryDirectory() as tmp:
        # Two good rows, so that k = 2 is always possible; the rest is drawn.
        _write(f"{tmp}/part-0.parquet", ["anchor-1", "anchor-2"], images=[_png(1), _png(2)],
               captions=["red square", "blue square"])
        expected_rows = 2
        first: dict[str, bool] = {"anchor-1": True, "anchor-2": True}  # id -> usable at its first occurrence
        for f, (content, labelled, rows) in enumerate(files, start=1):
            ids = [r[0] for r in rows]
            images = [IMAGES[r[1]](k) for k, r in enumerate(rows)] if "image" in content else None
            captions = [CAPTIONS[r[2]] for r in rows] if "caption" in content else None
            _write(f"{tmp}/part-{f}.parquet", ids, images, captions, [r[3] for r in rows] if labelled else None)
            expected_rows += len(rows)
            for r in rows:
                usable = ("image" in content and r[1] == "valid") or ("caption" in content and r[2] in
                                                                      ("text", "huge", "non-utf8"))
                if r[0]:
                    first.setdefault(r[0], usable)
        cfg = load_config(values={"input": tmp, "output": f"{tmp}/runs", "run_name": "p", "report": False,
                                  "cluster": {"clusters": 2}, "extract": {"text": {"model": "tfidf"}}})
        result = run(cfg, log=lambda _: None)
        rundir = RunDir(result.run_uri)
        assigned = rundir.read_table("assignments").column("id").to_pylist()
        rejects = rundir.read_table("rejects").to_pylist()
        counts = result.manifest["counts"]
        assert counts["read"] == expected_rows == counts["assigned"] + counts["rejected"]
        assert len(assigned) + len(rejects) == expected_rows
        assert len(assigned) == len(set(assigned))  # no id twice
        assert sorted(assigned) == sorted(i for i, ok in first.items() if ok)  # first occurrence decides
        for r in rejects:
            assert r["reason"] and r["source"] and r["row"] is not None
            if r["id"] in assigned:
                assert r["reason"].startswith("duplicate id: first seen in")
