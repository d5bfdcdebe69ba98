"""State files: every state the clusterers, optimizers and random streams produce survives the safetensors
format exactly, and anything else (a pickle above all) is refused without being run."""

import io
import os
import pickle

import numpy as np
import pytest
import torch

from raymmc.features.text import (Doc2VecConfig, Doc2VecEncoder, TfidfConfig, TfidfSvdEncoder,
                                  text_encoder_from_state)
from raymmc.io import safestate
from raymmc.io.safestate import UnsafeStateError


class Planted:
    """A pickle that creates a file when it is unpickled: the attack the state format exists to stop."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def hostile_pickle(marker: str) -> bytes:
    return pickle.dumps({"model": Planted(marker)})


def test_every_kind_of_value_round_trips():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    rng = np.random.default_rng(5)
    rng.random(3)
    state = {
        "weights": net.state_dict(), "optimizer": opt.state_dict(),  # int keys, tuples (betas), tensors
        "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),  # 128-bit ints, a ByteTensor
                "legacy": np.random.RandomState(3).get_state()},
        "labels": np.array([2, 0, 1], dtype=np.int64), "mask": np.array([True, False]), "half": torch.ones(2).half(),
        "empty": np.zeros((0, 4), np.float32), "scalar": np.float64(0.25), "nan": float("nan"),
        "ids": np.array(["a", "b/../c"], dtype=object), "none": None, "nested": [(1, "x"), {"k": [1.5, True]}],
        7: "int key",
    }
    back = safestate.loads(safestate.dumps(state))
    assert back.keys() == state.keys()
    for k, v in net.state_dict().items():
        assert torch.equal(back["weights"][k], v)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    restored = np.random.default_rng()
    restored.bit_generator.state = back["rng"]["numpy"]
    assert (restored.random(4) == rng.random(4)).all()
    legacy = np.random.RandomState()
    legacy.set_state(back["rng"]["legacy"])
    assert legacy.rand() == np.random.RandomState(3).rand()
    assert torch.equal(back["rng"]["torch"], torch.get_rng_state())
    assert back["labels"].dtype == np.int64 and back["labels"].tolist() == [2, 0, 1]
    assert back["mask"].dtype == bool and back["half"].dtype == torch.float16
    assert back["empty"].shape == (0, 4) and back["scalar"] == 0.25 and np.isnan(back["nan"])
    assert back["ids"].tolist() == ["a", "b/../c"] and back["none"] is None
    assert back["nested"] == [(1, "x"), {"k": [1.5, True]}] and back[7] == "int key"


def test_a_value_that_needs_pickle_is_refused_when_saving():
    with pytest.raises(TypeError, match="cannot store set"):
        safestate.dumps({"x": {1, 2}})
    with pytest.raises(TypeError, match="cannot store"):
        safestate.dumps({"x": np.array([{"a": 1}], dtype=object)})


def test_a_planted_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    data = hostile_pickle(str(marker))
    pickle.loads(data)  # the payload really runs when unpickled ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeStateError, match=r"run/model/state.safetensors: refused: a Python pickle"):
        safestate.loads(data, where="run/model/state.safetensors")
    assert not marker.exists()  # ... and the state reader never unpickles it


@pytest.mark.parametrize("kind", ["torch.save zip", "truncated", "empty", "foreign safetensors", "garbage"])
def test_other_files_are_refused(kind):
    from safetensors.torch import save

    good = safestate.dumps({"w": torch.ones(3)})
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    data = {"torch.save zip": buf.getvalue(), "truncated": good[: len(good) // 2], "empty": b"",
            "foreign safetensors": save({"w": torch.ones(3)}), "garbage": os.urandom(64)}[kind]
    with pytest.raises(UnsafeStateError, match="f.safetensors: refused"):
        safestate.loads(data, where="f.safetensors")


@pytest.mark.parametrize("make", [lambda: Doc2VecEncoder(Doc2VecConfig(vector_size=16, epochs=5, min_count=1), 3),
                                  lambda: TfidfSvdEncoder(TfidfConfig(dims=6), 1)], ids=["doc2vec", "tfidf"])
def test_fitted_text_encoders_are_stored_without_pickle(make):
    texts = [f"a {c} {t} on a table" for c in ("red", "green", "blue", "big") for t in ("cat", "cup", "car")]
    enc = make().fit(texts)
    stored = safestate.dumps(enc.to_state())
    back = text_encoder_from_state(safestate.loads(stored))
    queries = texts[:3] + ["a purple cat", "no known words here", "cup cup cup"]  # seen and unseen captions
    np.testing.assert_array_equal(back.encode(queries), enc.encode(queries))
    assert back.dim == enc.dim


def test_unknown_text_encoder_state_is_an_error():
    with pytest.raises(ValueError, match="not a stored text encoder"):
        text_encoder_from_state({"kind": "pickle"})
