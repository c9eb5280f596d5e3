"""Training epochs on data of mixed sizes: one padding for all against size groups.

Run::

    pytest benchmarks/test_bench_size_groups.py --benchmark-enable \
        --benchmark-columns=min,mean,rounds

The bundled GFN2-xTB EAN data (60 atoms, 4 ion pairs) mixed with supercells of it: 40
configurations as they are and 8 repeated 2 x 2 x 2 (480 atoms; a periodic configuration
repeated is a configuration, energies x 8, forces tiled). The article's model, numba
kernels, float32, batches of 8: one epoch (6 steps) with every batch padded to 480 atoms
(``size_groups=1``) against batches drawn within two size groups (``size_groups=2``:
five batches of 60-atom configurations, one of 480-atom ones), and the megabytes of
training data each keeps on the device and on the host (size groups: the set built as
``group_configurations``, as ``train --size-groups`` does, never padded to the largest).
Self-contained: no ../shared.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import module_summary, timed_pedantic

_RESULTS: dict[int, float] = {}
_DEVICE_MB: dict[int, float] = {}   # the training set's arrays on the device
_HOST_MB: dict[int, float] = {}     # the training set's arrays given to the Trainer


def _megabytes(tree) -> float:
    return sum(a.nbytes for a in jax.tree.leaves(tree)) / 2**20


def _lines():
    out = ["training epoch, 40 x 60 + 8 x 480 atoms, batches of 8 (numba, float32):"]
    for groups, seconds in sorted(_RESULTS.items()):
        out.append(f"  size_groups {groups}: {1e3 * seconds:8.1f} ms per epoch (min), "
                   f"data on the device {_DEVICE_MB[groups]:.1f} MB, "
                   f"on the host {_HOST_MB[groups]:.1f} MB")
    if len(_RESULTS) == 2:
        out.append(f"  ratio: {_RESULTS[1] / _RESULTS[2]:.2f}x")
    return out


_summary = module_summary(_RESULTS, _lines)


@pytest.fixture(scope="module")
def mixed_data():
    from importlib.resources import files

    from neuralil_fast.io import Configuration, read_dataset
    from neuralil_fast.model import NeuralIL

    configs = read_dataset(files("neuralil_fast") / "data" / "ean_xtb.xyz")[:48]
    rep = 2 * 2 * 2
    shifts = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)])
    for k in range(40, 48):
        c = configs[k]
        pos = (c.positions[None] + (shifts @ c.cell)[:, None]).reshape(-1, 3)
        configs[k] = Configuration(symbols=c.symbols * rep, positions=pos, cell=2 * c.cell,
                                   pbc=c.pbc, energy=rep * c.energy,
                                   forces=np.tile(c.forces, (rep, 1)))
    return NeuralIL(species=("C", "H", "N", "O")), configs


@pytest.mark.parametrize("groups", [1, 2])
def test_epoch_mixed_sizes(benchmark, mixed_data, groups):
    from neuralil_fast.training.data import group_configurations, pad_configurations
    from neuralil_fast.training.loop import TrainConfig, Trainer

    model, configs = mixed_data
    if groups == 1:
        data = pad_configurations(configs, model.species, model.r_cut, "numba")
        _HOST_MB[groups] = _megabytes(data)
    else:
        data = group_configurations(configs, model.species, model.r_cut, "numba",
                                    max_groups=groups, batch=8)
        _HOST_MB[groups] = _megabytes(data.parts)
    trainer = Trainer(model, data, None, TrainConfig(batch_size=8, backend="numba",
                                                     size_groups=groups, fit_offset=False))
    assert len(trainer.train_groups) == groups
    on_device = trainer._parts.get("train", [trainer.train])
    _DEVICE_MB[groups] = _megabytes(on_device)
    state = trainer.init_state()

    def epoch():
        trainer.run_epoch(state)
        return state.params

    _, best = timed_pedantic(benchmark, epoch, rounds=3, warmup_rounds=1)
    _RESULTS[groups] = best
