"""``neuralil-fast demo`` end to end on the bundled data, with a tiny budget."""
from __future__ import annotations

import re

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    from neuralil_fast.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-minutes", "0.05", "--md-steps", "20",
                 "--backend", "numba"]) == 0
    text = capsys.readouterr().out
    assert (out / "model.nil").is_file() and (out / "parity.png").stat().st_size > 0
    mae = re.search(r"energy ([\d.]+) meV/atom, forces ([\d.]+) meV/Å \(([\d.]+)%", text)
    assert mae, text
    assert all(float(g) > 0 for g in mae.groups())
    md = re.search(r"drift ([-+\d.]+) meV/atom .* ([\d,]+) atom-steps/s", text)
    assert md, text
    # 20 steps of 0.5 fs from 300 K with any half-trained model: energy still conserved
    assert abs(float(md.group(1))) < 5.0


@pytest.mark.parametrize("option, value, message", [
    ("--max-minutes", "0", "--max-minutes"),
    ("--md-steps", "0", "--md-steps"),
    ("--backend", "gpu", "unknown backend"),
    ("--out", "FILE", "is a file"),
])
def test_demo_rejects_bad_options_before_training(tmp_path, capsys, option, value, message):
    from neuralil_fast.cli import main

    file = tmp_path / "a_file"
    file.write_text("")
    value = str(file) if value == "FILE" else value
    argv = ["demo", "--out", str(tmp_path / "demo"), option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuralil-fast demo: error:") and message in err, err
    assert not (tmp_path / "demo").exists()
