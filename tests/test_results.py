import doctest
import json
import sys

import h5py
import numpy as np
import pytest

from alignfl_mpi import results
from alignfl_mpi.errors import ConfigError, SchemaError
from alignfl_mpi.results import ResultsWriter, load, round_key
from alignfl_mpi.schema import RESULTS_SCHEMA_VERSION, SCHEMA_VERSION


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
    assert res.rounds == [1, 2] and not res.finished  # loop index 0 is round 1
    assert res.attrs["rounds_completed"] == 2
    assert res.attrs["schema_version"] == RESULTS_SCHEMA_VERSION == 2
    assert res.config == {"rounds": 3}
    with h5py.File(path, "r") as f:
        assert sorted(f["rounds"]) == ["0001", "0002"]
        assert f["rounds/0001"].attrs["round"] == 1
    np.testing.assert_allclose(res.eval["latent_accuracy"], [0.5, 0.6])
    np.testing.assert_allclose(res.clients[0]["loss"], [1.0, 2.0])
    assert list(res.clients[1]["status"]) == ["error", "error"]
    assert "loss" not in res.clients[1]
    images, labels = res.synthetic(2)  # round 2 = loop index 1
    assert images.shape == (4, 28, 28) and int(images[0, 0, 0]) == 1
    assert res.synthetic(3) is None
    assert res.final_global() is None
    w.update_timings(1, {"round": 2.5, "io": 0.2})
    w.write_final(global_state={"w": np.ones((2, 2), np.float32)}, global_spec={"arch": "mlp"},
                  decoders={0: {"spec": {"arch": "mlp"}, "round": 1,
                                "state": {"a": np.zeros(3, np.float32)},
                                "prior": {"weights": np.ones(1)}}})
    res = load(path)
    assert res.finished and list(res.timings["round"]) == [1.5, 2.5]
    spec, state = res.final_global()
    assert spec == {"arch": "mlp"} and state["w"].shape == (2, 2)
    assert res.final_decoders()[0]["round"] == 2


def test_refuses_to_overwrite_and_resume_drops_later_rounds(tmp_path):
    path = tmp_path / "results.h5"
    w = _writer(path)
    for r in range(3):
        _round(w, r, 0.1 * r)
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        _writer(path)
    _writer(path, resume_from_round=1)  # the checkpoint covers one round: keep round 1
    res = load(path)
    assert res.rounds == [1] and res.attrs["rounds_completed"] == 1
    assert res.attrs["resumed_at_round"] == 2  # the first round run again
    w = _writer(path, resume_from_round=1)
    _round(w, 1, 0.7)
    _round(w, 2, 0.8)
    res = load(path)
    assert res.rounds == [1, 2, 3] and res.attrs["rounds_completed"] == 3
    np.testing.assert_allclose(res.eval["latent_accuracy"], [0.0, 0.7, 0.8])


def test_crash_during_update_keeps_last_good_file(tmp_path):
    path = tmp_path / "results.h5"
    w = _writer(path)
    _round(w, 0, 0.5)
    before = path.read_bytes()

    def explode(f):
        f["rounds"].create_group("0002")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        w._update(explode)
    assert path.read_bytes() == before
    assert load(path).rounds == [1]
    assert not list(tmp_path.glob(".results.h5.*"))  # no temporary left behind


def test_load_rejects_other_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["kind"] = "partition"
        f.attrs["schema_version"] = SCHEMA_VERSION
    with pytest.raises(SchemaError, match="not a results file"):
        load(tmp_path / "x.h5")
    assert round_key(12) == "0012"


def _v1_file(path):
    """A results file as version 1 wrote it: rounds 0 and 1 (0-based), finished."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema_version": 1, "kind": "results", "status": "finished",
                        "rounds_completed": 2, "resumed_at_round": 1,
                        "config": json.dumps({"rounds": 2})})
        for r in range(2):
            g = f.create_group(f"rounds/{round_key(r)}")
            g.attrs["round"] = r
            c = g.create_group("clients/0")
            c.attrs.update({"status": "ok", "loss": 3.0 - r, "update_round": r})
            g.create_group("server").attrs["loss"] = 9.0 - r
            g.create_group("eval").attrs["latent_accuracy"] = 0.4 + 0.1 * r
            g.create_group("timings").attrs["round"] = 2.0
            s = g.create_group("synthetic")
            s.create_dataset("images", data=np.full((2, 28, 28), r, np.uint8))
            s.create_dataset("client", data=np.zeros(2, np.int64))
        d = f.create_group("final/decoders/0")
        d.attrs.update({"spec": "{}", "round": 1})
        d.create_group("state")
        d.create_group("prior")
    return path


def test_version_1_files_are_renumbered_from_1(tmp_path):
    res = load(_v1_file(tmp_path / "old.h5"))
    assert res.attrs["schema_version"] == 1
    assert res.rounds == [1, 2] and res.attrs["resumed_at_round"] == 2
    np.testing.assert_allclose(res.eval["latent_accuracy"], [0.4, 0.5])
    np.testing.assert_allclose(res.clients[0]["update_round"], [1, 2])
    assert int(res.synthetic(2)[0][0, 0, 0]) == 1 and res.synthetic(3) is None
    assert res.final_decoders()[0]["round"] == 2
    assert [r["round"] for r in res.per_round_rows()] == [1, 2]


def test_resuming_a_version_1_file_upgrades_it(tmp_path):
    path = _v1_file(tmp_path / "results.h5")
    w = _writer(path, resume_from_round=1)
    _round(w, 1, 0.9)
    res = load(path)
    assert res.attrs["schema_version"] == 2 and res.rounds == [1, 2]
    np.testing.assert_allclose(res.eval["latent_accuracy"], [0.4, 0.9])
    assert res.clients[0]["update_round"][0] == 1 and res.attrs["resumed_at_round"] == 2


def test_other_versions_are_refused(tmp_path):
    path = _v1_file(tmp_path / "future.h5")
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(SchemaError, match="schema_version 3 is not supported .* version 1 or 2"):
        load(path)
    assert SCHEMA_VERSION == 1  # partition files keep version 1


def test_epsilon_spent_is_the_recorded_one(tmp_path):
    def run(name, mode, clients):
        w = ResultsWriter(tmp_path / name, attrs={},
                          config_json=json.dumps({"client": {"privacy": {"mode": mode,
                                                                         "epsilon": 10.0}}}))
        for r, values in enumerate(clients):
            w.write_round(r, clients=values, server={}, evaluation={}, timings={})
        return load(tmp_path / name).epsilon_spent()

    none = run("none.h5", "none", [{0: {"status": "ok"}}])
    assert none.value == float("inf") and not none.dp and none.label == "∞ (no DP)"
    full = run("full.h5", "full", [{0: {"epsilon": 4.0, "dp_accounted": 1.0},
                                    1: {"epsilon": 4.5, "dp_accounted": 1.0}},
                                   {0: {"epsilon": 9.5, "dp_accounted": 1.0},
                                    1: {"status": "error"}}])
    assert full.value == 9.5 and full.accounted and full.label == "9.5"  # never the target 10
    dec = run("dec.h5", "decoder", [{0: {"epsilon": 2.0, "dp_accounted": 0.0}}])
    assert dec.value == 2.0 and not dec.accounted and dec.label == "not accounted"
    empty = run("empty.h5", "full", [])
    assert empty.value is None and empty.label == "—"


def test_to_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "results.h5"
    w = _writer(path)
    _round(w, 0, 0.5)
    _round(w, 1, 0.6)
    df = load(path).to_pandas()
    assert isinstance(df, pd.DataFrame) and list(df.index) == [1, 2]
    assert df.index.name == "round"
    assert list(df["eval.latent_accuracy"]) == [0.5, 0.6]
    assert list(df["client_1.status"]) == ["error", "error"]


def test_to_pandas_without_pandas_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "results.h5"
    _round(_writer(path), 0, 0.5)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas"):
        load(path).to_pandas()


def test_doctests():
    assert doctest.testmod(results).failed == 0
