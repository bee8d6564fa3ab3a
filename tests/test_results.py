import h5py
import numpy as np
import pytest

from alignfl_mpi.errors import ConfigError, SchemaError
from alignfl_mpi.results import ResultsWriter, load, round_key
from alignfl_mpi.schema import SCHEMA_VERSION


def _writer(path, **kw):
    return ResultsWriter(path, config_json='{"rounds": 3}', attrs={"n_clients": 2}, **kw)


def _round(w, r, acc):
    w.write_round(r, clients={0: {"status": "ok", "loss": 1.0 + r, "message_bytes": 10},
                              1: {"status": "error", "error": "boom"}},
                  server={"loss": 5.0 - r}, evaluation={"latent_accuracy": acc},
                  timings={"round": 1.5, "sampling": 0.1},
                  synthetic=(np.full((4, 28, 28), r, np.uint8), np.array([0, 0, 1, 1])))


def test_write_and_load_partial_then_final(tmp_path):
    path = tmp_path / "results.h5"
    w = _writer(path)
    _round(w, 0, 0.5)
    _round(w, 1, 0.6)
    res = load(path)  # a partial run reads fine
    assert res.rounds == [0, 1] and not res.finished
    assert res.attrs["schema_version"] == SCHEMA_VERSION and res.config == {"rounds": 3}
    np.testing.assert_allclose(res.eval["latent_accuracy"], [0.5, 0.6])
    np.testing.assert_allclose(res.clients[0]["loss"], [1.0, 2.0])
    assert list(res.clients[1]["status"]) == ["error", "error"]
    assert "loss" not in res.clients[1]
    images, labels = res.synthetic(1)
    assert images.shape == (4, 28, 28) and int(images[0, 0, 0]) == 1
    assert res.final_global() is None
    w.update_timings(1, {"round": 2.5, "io": 0.2})
    w.write_final(global_state={"w": np.ones((2, 2), np.float32)}, global_spec={"arch": "mlp"},
                  decoders={0: {"spec": {"arch": "mlp"}, "round": 1,
                                "state": {"a": np.zeros(3, np.float32)},
                                "prior": {"weights": np.ones(1)}}})
    res = load(path)
    assert res.finished and res.timings["round"][1] == 2.5
    spec, state = res.final_global()
    assert spec == {"arch": "mlp"} and state["w"].shape == (2, 2)
    assert res.final_decoders()[0]["round"] == 1


def test_refuses_to_overwrite_and_resume_drops_later_rounds(tmp_path):
    path = tmp_path / "results.h5"
    w = _writer(path)
    for r in range(3):
        _round(w, r, 0.1 * r)
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        _writer(path)
    _writer(path, resume_from_round=1)
    res = load(path)
    assert res.rounds == [0] and res.attrs["resumed_at_round"] == 1


def test_crash_during_update_keeps_last_good_file(tmp_path):
    path = tmp_path / "results.h5"
    w = _writer(path)
    _round(w, 0, 0.5)
    before = path.read_bytes()

    def explode(f):
        f["rounds"].create_group("0001")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        w._update(explode)
    assert path.read_bytes() == before
    assert load(path).rounds == [0]
    assert not list(tmp_path.glob(".results.h5.*"))  # no temporary left behind


def test_load_rejects_other_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["kind"] = "partition"
        f.attrs["schema_version"] = SCHEMA_VERSION
    with pytest.raises(SchemaError, match="not a results file"):
        load(tmp_path / "x.h5")
    assert round_key(12) == "0012"
