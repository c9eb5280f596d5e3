"""``neuralil-fast bench``: every task timed on every backend asked for, the backends'
forces agree on the same input, the JSON holds the table; bad options fail in one line."""
from __future__ import annotations

import json
import math

import pytest

from neuralil_fast.backends import triton_available
from neuralil_fast.cli import main


def test_bench_times_each_task_and_backend(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # numba first: the differences are still taken from the reference backend's forces
    assert main(["bench", "--replicas", "1", "--repeat", "1", "--backends", "numba",
                 "reference", "--tasks", "neighbours", "forces", "md", "--dtype", "float64",
                 "--json", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert sorted((r["task"], r["backend"]) for r in rows) == sorted(
        (t, b) for t in ("neighbours", "forces", "md") for b in ("reference", "numba"))
    assert all(r["atoms"] == 60 and 0 < r["seconds"] < 60 for r in rows)
    forces = {r["backend"]: r["max_force_difference_eV_A"] for r in rows
              if r["task"] == "forces"}
    assert forces["reference"] == 0 and forces["numba"] < 1e-9      # float64
    assert report["machine"]["cores"] >= 1 and report["machine"]["versions"]["jax"]
    for label in ("neighbour list (build)", "energy + forces + stress", "MD step (ASE)",
                  "numba speed-up", "atom-steps/s", "max |difference|"):
        assert label in table, table
    md = {r["backend"]: r["seconds"] for r in rows if r["task"] == "md"}
    assert f"{md['reference'] / md['numba']:.1f}x" in table


def test_bench_training_step(capsys):
    assert main(["bench", "--tasks", "training", "--backends", "numba", "--repeat", "1",
                 "--no-progress"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines()
                if l.startswith("training step (8 configs)"))
    assert line.split()[4] == "480"  # 8 bundled configurations of 60 atoms
    assert math.isfinite(float(line.split()[5]))


def test_bench_skips_the_dense_reference_list_of_large_systems(capsys, monkeypatch):
    from neuralil_fast import bench

    monkeypatch.setattr(bench, "REFERENCE_MAX_ATOMS", 100)
    assert main(["bench", "--replicas", "1", "2", "--repeat", "1", "--backends", "reference",
                 "numba", "--tasks", "neighbours", "--no-progress"]) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines()
            if l.startswith("neighbour list")]
    assert rows[0][3] == "60" and rows[0][-1].endswith("x")         # both timed
    assert rows[1][3:5] == ["480", "skipped"] and rows[1][-1] == "n/a"
    assert rows[1][6] == "ms"                                           # numba timed


@pytest.mark.parametrize("argv, message", [
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--replicas", "2", "0"], "--replicas must be >= 1"),
    (["--backends", "nonsense"], "unknown backend"),
    (["--json", "/no/such/folder/b.json"], "--json: folder /no/such/folder does not exist"),
])
def test_bench_bad_options(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.skipif(triton_available(), reason="a GPU with Triton is present here")
def test_bench_triton_without_a_gpu_says_why(capsys):
    assert main(["bench", "--backends", "triton"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
