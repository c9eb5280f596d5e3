"""The training loop: AdamW, one-cycle LR, keep-best, early stopping, checkpoints.

Parameters are always held as a committee (a leading axis K on every leaf; K = 1
for a single model).  One jitted step covers the whole batch:
:func:`neuralil_fast.committee.committee_evaluate_batch` (descriptors once per
configuration through the chosen backend, the K networks vmapped over parameters,
each on the batch as one system), the loss of each member, and one AdamW update (an
elementwise optimiser on stacked parameters = K independent optimisers).

Resuming is exact: the state file holds the parameters, the flattened optimiser
state, epoch, step, the JAX key, the data-order seed, the best parameters and the
history; the batch order of epoch e is ``default_rng([data_seed, e]).permutation``,
so a resumed run repeats the uninterrupted run's arithmetic bit for bit.

With ``ema`` set, an exponential moving average of the parameters follows the
optimiser (decay min(ema, (1 + t) / (10 + t)) after step t, so the random
initialisation is forgotten within the first steps); validation, keep-best and the
saved model then use the average, while the optimiser keeps training the raw
parameters.  The average is part of the state (a resumed run continues it).

Learning rate (computed on the host from the step count, fed to the jitted step):

- ``schedule="epoch"`` (the article's code): one cosine one-cycle per epoch,
  lr_start -> lr_peak -> lr_end.
- ``schedule="run"``: one cycle over the whole run: linear warm-up lr_start ->
  lr_peak over ``warmup_epochs``, then cosine decay to lr_end at the planned
  last step.  The plan is ``epochs`` epochs, or, with a time budget
  (``max_minutes``), what fits in it: estimated from the recent epoch times and
  re-planned after every epoch, stored in the state (a resumed run keeps it).  With few
  steps per epoch (48 configurations in batches of 8 = 6 steps) the per-epoch
  cycle never anneals; the run cycle does, and trains far better in a budget.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..backends import resolve_backend
from ..committee import committee_evaluate_batch, committee_size, stack
from ..model import NeuralIL, save, load
from .data import (GroupedData, PaddedData, SizeGroup, common_energy_per_atom,
                   fit_species_energies, force_atom_mask, narrow, regroup, size_groups,
                   species_counts, take, to_device)
from .losses import LossConfig, total_loss

__all__ = ["TrainConfig", "Trainer", "TrainState", "TrainingDiverged", "metrics",
           "learning_rate", "ema_decay", "SCHEDULES"]

SCHEDULES = ("epoch", "run")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (units: eV, Å, minutes)."""

    epochs: int | None = 100      # None: until max_minutes
    batch_size: int = 8
    committee: int = 1
    seed: int = 0                 # parameter initialisation
    data_seed: int = 0            # batch order
    lr_start: float = 1e-3
    lr_peak: float = 1e-2
    lr_end: float = 1e-5
    weight_decay: float = 1e-4
    schedule: str = "epoch"       # "epoch" | "run" (see the module docstring)
    warmup_epochs: int = 5        # "run" only
    patience: int | None = None   # epochs without validation improvement before stopping
    max_minutes: float | None = None
    backend: str = "auto"
    loss: LossConfig = LossConfig()
    fit_offset: bool = True       # least-squares energy offset at the start (and at the end
    #                               when the energy is not trained on)
    ema: float | None = None      # decay per step of the parameter average (None: no average)
    size_groups: int = 1          # batches drawn within up to this many groups of similar
    #                               atom counts, each padded to its own largest (data.size_groups)

    def __post_init__(self):
        if self.epochs is None and self.max_minutes is None:
            raise ValueError("give epochs or max_minutes (or both)")
        if (self.epochs is not None and self.epochs < 0) or self.batch_size < 1 \
                or self.committee < 1:
            raise ValueError("epochs must be >= 0, batch size and committee size >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.warmup_epochs < 0:
            raise ValueError("warmup_epochs must be >= 0")
        if not (0 < self.lr_start and 0 < self.lr_peak and 0 < self.lr_end):
            raise ValueError("learning rates must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.patience is not None and self.patience < 1:
            raise ValueError("patience must be >= 1 epochs")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError("max_minutes must be > 0")
        if self.size_groups < 1:
            raise ValueError(f"size_groups must be >= 1, got {self.size_groups}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"ema (the decay of the parameter average) must be in (0, 1), "
                             f"got {self.ema}")

    def identity(self) -> dict:
        """The settings a resumed run must share (everything that changes the arithmetic)."""
        d = dataclasses.asdict(self)
        for k in ("epochs", "patience", "max_minutes"):
            d.pop(k)
        if d["ema"] is None:   # states written before the average existed stay resumable
            d.pop("ema")
        if d["size_groups"] == 1:  # likewise for the size groups
            d.pop("size_groups")
        d["loss"] = dataclasses.asdict(self.loss)
        return d


class TrainingDiverged(RuntimeError):
    """The training loss of an epoch was not finite (NaN or inf): the parameters are lost,
    the state's ``best_params`` (epoch ``best_epoch``, 0: none) are those to keep."""

    def __init__(self, epoch: int, loss: float, best_epoch: int):
        kept = (f"the best parameters are those of epoch {best_epoch}" if best_epoch else
                "no epoch finished with a finite loss")
        super().__init__(f"training diverged in epoch {epoch} (mean training loss {loss}); "
                         f"{kept}: lower the learning rate (--lr-peak, --lr-start)")
        self.epoch, self.loss, self.best_epoch = epoch, loss, best_epoch


@dataclasses.dataclass
class TrainState:
    params: dict                  # committee parameters (leading axis K)
    opt_state: object
    epoch: int                    # completed epochs
    step: int                     # completed optimiser steps
    key: np.ndarray               # jax.random.key_data of the initialisation key
    best_params: dict
    best_metric: float
    best_epoch: int
    bad_epochs: int
    elapsed: float                # wall seconds of the epochs (checkpoints included), all runs
    history: list
    planned_steps: int | None = None   # schedule "run": the step where the LR reaches lr_end
    ema_params: dict | None = None     # the parameter average (TrainConfig.ema), else None

    @property
    def eval_params(self) -> dict:
        """The parameters validated and kept: the average if there is one."""
        return self.params if self.ema_params is None else self.ema_params


def ema_decay(ema: float, step: int) -> float:
    """Decay of the average after optimiser step ``step`` (1-based): short memory at first."""
    return min(ema, (1.0 + step) / (10.0 + step))


@jax.jit
def _ema_update(average, params, decay):
    return jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, params)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int,
                  planned_steps: int | None) -> float:
    """The LR of optimiser step ``step`` (0-based), float64 on the host."""
    lo, hi, end = cfg.lr_start, cfg.lr_peak, cfg.lr_end
    if cfg.schedule == "epoch":
        # cosine one-cycle within the epoch: 30% up, 70% down (optax's shape)
        n = max(2, steps_per_epoch)
        t = (step % steps_per_epoch) / n
        if t < 0.3:
            return hi + (lo - hi) * 0.5 * (1 + math.cos(math.pi * t / 0.3))
        return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))
    warm = cfg.warmup_epochs * steps_per_epoch
    if planned_steps is not None:    # a run shorter than the warm-up: warm up half of it
        warm = min(warm, planned_steps // 2)
    if step < warm:
        return lo + (hi - lo) * step / warm
    if planned_steps is None:        # budget not planned yet: hold the peak
        return hi
    t = min(1.0, (step - warm) / max(1, planned_steps - 1 - warm))  # lr_end at the last step
    return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(weight_decay):
    """AdamW (decoupled weight decay); the LR is a hyperparameter set at every step."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=weight_decay)


def _evaluate_batch(model, backend, params, batch):
    """The batch's configurations, members outermost: E (K, B) eV, F (K, B, N, 3) eV/Å."""
    out = committee_evaluate_batch(model, params, batch.positions, batch.cell, batch.species,
                                   batch.centers, batch.neighbors, batch.shifts,
                                   backend=backend, atom_mask=batch.atom_mask)
    return out["energy"], out["forces"]


def _loss_fn(model, backend, loss, params, data, idx, weight, window=None):
    """(sum over members, per-member losses (K,)) of the batch ``idx`` of ``data``;
    ``window`` (atoms, pairs): the slots its configurations fit in (see ``narrow``)."""
    batch = take(data, idx)
    if window is not None:
        batch = narrow(batch, *window)
    E, F = _evaluate_batch(model, backend, params, batch)
    per_member = jax.vmap(
        lambda e, f: total_loss(loss, e, batch.energy, batch.n_atoms, weight, f, batch.forces,
                                force_atom_mask(batch)))(E, F)
    return jnp.sum(per_member), per_member


# XLA:CPU hands the LayerNorm reductions of the vmapped second-order pass to YNNPACK
# fusions that run them several times slower than its own loops (0.2-0.7 ms each for
# 1 800 x 32 values); keeping YNNPACK to the dots made the step 1.13-1.14x faster for one
# model and 1.12x for a committee of 4 (same process, 2026-12-02). Scoped to this jit:
# the user's other programs keep XLA's defaults.
_CPU_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def step_compiler_options() -> dict | None:
    """XLA options of the training step: ``_CPU_STEP_OPTIONS`` on CPU, else None.

    None also where this XLA does not know the option (it rejects unknown ones when
    compiling).
    """
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=_CPU_STEP_OPTIONS)(jnp.zeros((), jnp.float32))
    except Exception:  # noqa: BLE001 - any rejection means: compile with the defaults
        return None
    return dict(_CPU_STEP_OPTIONS)


@functools.cache
def _jitted_train_step():
    # built on first use: asking for the backend at import would start JAX's runtime
    return jax.jit(_train_step, static_argnames=("model", "backend", "loss", "opt", "window"),
                   compiler_options=step_compiler_options())


def _train_step(params, opt_state, data, idx, weight, lr, *, model, backend, loss, opt,
                window=None):
    """One AdamW step: (params, opt_state, per-member losses (K,)); jitted by the above."""
    (_, per_member), grads = jax.value_and_grad(_loss_fn, argnums=3, has_aux=True)(
        model, backend, loss, params, data, idx, weight, window)
    hyper = dict(opt_state.hyperparams, learning_rate=lr)
    opt_state = opt_state._replace(hyperparams=hyper)
    updates, opt_state = make_optimizer(*opt).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, per_member


@functools.partial(jax.jit, static_argnames=("model", "backend"))
def _predict_batch(params, batch, *, model, backend):
    """E (B, K) eV, F (B, K, N, 3) eV/Å."""
    E, F = _evaluate_batch(model, backend, params, batch)
    return E.T, jnp.moveaxis(F, 0, 1)


# Validation runs every epoch: one call for the whole set (12 EAN configurations in one
# call instead of 8 + a padded 8 took 82 instead of 125 ms for a committee of 8, 3.5% of
# an epoch); the cap keeps a call of large configurations within memory.
PREDICT_ATOMS = 16384


def metrics(energy_pred, energy_ref, n_atoms, forces_pred, forces_ref) -> dict:
    """MAE / RMSE of energies (meV/atom) and force components (meV/Å), numpy float64.

    energy_pred, energy_ref, n_atoms (C,); forces_pred, forces_ref (M, 3): the labelled
    atoms' forces (none: no force entries)."""
    dE = (np.asarray(energy_pred, np.float64) - np.asarray(energy_ref, np.float64)) / n_atoms
    dF = np.asarray(forces_pred, np.float64) - np.asarray(forces_ref, np.float64)
    if dE.size == 0:
        return {"n_configs": 0}
    out = {
        "n_configs": int(dE.size),
        "energy_mae_mev_atom": float(1e3 * np.mean(np.abs(dE))),
        "energy_rmse_mev_atom": float(1e3 * np.sqrt(np.mean(dE**2))),
    }
    if dF.size:
        out["force_mae_mev_A"] = float(1e3 * np.mean(np.abs(dF)))
        out["force_rmse_mev_A"] = float(1e3 * np.sqrt(np.mean(dF**2)))
    return out


class Trainer:
    """Trains ``model`` on padded data.

    train, valid: :class:`PaddedData` (numpy or device arrays) or :class:`GroupedData`
    (numpy; data of mixed sizes without the whole set padded to the largest; re-stored
    where its groups are not this run's); valid may be None.
    energy_ref64: optional float64 reference energies of the validation set (metrics).
    valid_ids: dataset indices of the validation configurations; ``outliers``: the
    indices to leave out of the "without outliers" metrics.
    """

    def __init__(self, model: NeuralIL, train: PaddedData, valid: PaddedData | None,
                 cfg: TrainConfig, valid_ids=None, outliers=(), valid_energy64=None,
                 train_energy64=None):
        self.model = model
        self.cfg = cfg
        self.backend = resolve_backend(cfg.backend)
        valid = valid if valid is not None and len(valid) else None
        self.n_train = len(train)
        self.batch = min(cfg.batch_size, self.n_train)
        self.train_groups = size_groups(train, cfg.size_groups, self.batch)
        self.valid_groups = None if valid is None else size_groups(valid, cfg.size_groups, 1)
        # One group: the set on the device as given.  Several: each group's configurations
        # on the device narrowed to its window (memory: the sum over the groups of their
        # count x window instead of all configurations x the largest), the set as given
        # kept where it is (host numpy from pad_configurations or group_configurations).
        self._parts = {}
        for name, data, groups in (("train", train, self.train_groups),
                                   ("valid", valid, self.valid_groups)):
            if isinstance(data, GroupedData) and not _same_groups(data.groups, groups):
                data = regroup(data, groups)
            if isinstance(data, GroupedData) and len(groups) == 1:
                data = data.parts[0]                 # one group in data-set order: dense
            if isinstance(data, GroupedData):
                self._parts[name] = [to_device(p) for p in data.parts]
            elif data is not None and len(groups) > 1:
                self._parts[name] = [to_device(narrow(take(data, g.indices), g.atoms, g.pairs))
                                     for g in groups]
            elif data is not None:
                data = to_device(data)
            setattr(self, name, data)
        # each training configuration's group and row in that group's part
        self._group_of = np.zeros(self.n_train, np.int64)
        self._row_of = np.zeros(self.n_train, np.int64)
        for k, g in enumerate(self.train_groups):
            self._group_of[g.indices], self._row_of[g.indices] = k, np.arange(len(g.indices))
        self.steps_per_epoch = sum(math.ceil(len(g.indices) / self.batch)
                                   for g in self.train_groups)
        self._opt_key = (cfg.weight_decay,)
        self.optimizer = make_optimizer(*self._opt_key)
        on_device = self._parts["train"][0] if "train" in self._parts else self.train
        self.dtype = on_device.positions.dtype
        self.valid_ids = None if valid_ids is None else np.asarray(valid_ids)
        self.outliers = tuple(int(i) for i in outliers)
        self.valid_energy64 = (None if self.valid is None else
                               np.asarray(valid.energy if valid_energy64 is None
                                          else valid_energy64, np.float64))
        self.train_energy64 = np.asarray(train.energy if train_energy64 is None
                                         else train_energy64, np.float64)
        if cfg.loss.uses_forces and not np.any(np.asarray(train.force_mask)):
            raise ValueError("no training configuration carries forces: train on energies "
                             "only (force weight 0, --energy-only)")
        # keep-best and early stopping follow the force MAE where there is one to follow
        valid_forces = self.valid is not None and bool(np.any(np.asarray(valid.force_mask)))
        self.selection_key = ("force_mae_mev_A" if cfg.loss.uses_forces and valid_forces
                              else "energy_mae_mev_atom")

    # ------------------------------------------------------------------ jitted pieces
    # Module-level jitted functions with hashable static settings: a second Trainer with
    # the same model and settings (a resumed run in the same process) reuses the compiled code.

    def _loss(self, params, data, idx, weight):
        return _loss_fn(self.model, self.backend, self.cfg.loss, params, data, idx, weight)

    def _step(self, params, opt_state, data, idx, weight, lr, window=None):
        return _jitted_train_step()(params, opt_state, data, idx, weight, lr, model=self.model,
                                    backend=self.backend, loss=self.cfg.loss, opt=self._opt_key,
                                    window=window)

    def _predict(self, params, batch):
        return _predict_batch(params, batch, model=self.model, backend=self.backend)

    # ------------------------------------------------------------------ host helpers

    @staticmethod
    def _chunks(n, size):
        """Index batches of static ``size`` covering range(n) (the last padded with index 0)."""
        for start in range(0, n, size):
            idx = np.arange(start, min(n, start + size))
            pad = size - len(idx)
            yield np.concatenate([idx, np.zeros(pad, idx.dtype)]).astype(np.int32), len(idx)

    def predict_chunk(self, data: PaddedData, group: SizeGroup | None = None) -> int:
        """Configurations per prediction call: the whole set (group) where it holds at most
        ``PREDICT_ATOMS`` padded atoms, else that many (at least one training batch)."""
        atoms, n = (data.max_atoms, len(data)) if group is None else \
            (group.atoms, len(group.indices))
        return max(self.batch, min(n, PREDICT_ATOMS // max(1, atoms)))

    def groups(self, data: PaddedData | GroupedData) -> list[SizeGroup]:
        """The size groups of ``data`` (those of the training and validation sets are kept,
        and those GroupedData is stored in)."""
        if data is self.train:
            return self.train_groups
        if data is self.valid:
            return self.valid_groups
        if isinstance(data, GroupedData):
            return list(data.groups)
        return size_groups(data, self.cfg.size_groups, 1)

    def _group_parts(self, data: PaddedData | GroupedData):
        """The parts of ``data`` per size group, or None (one group of PaddedData)."""
        for name in self._parts:
            if data is getattr(self, name):
                return self._parts[name]
        return list(data.parts) if isinstance(data, GroupedData) else None

    def _predictions(self, params, data: PaddedData | GroupedData, forces: bool = True):
        """Each prediction call on ``data``: (indices (n,) into ``data``, E (n, K) eV,
        F (n, K, atoms, 3) eV/Å or None, the batch (PaddedData, its first n rows those
        configurations, ``atoms`` slots)), E and F numpy.  Each size group runs on arrays
        narrowed to its window."""
        parts = self._group_parts(data)
        for k, g in enumerate(self.groups(data)):
            for pos, n in self._chunks(len(g.indices), self.predict_chunk(data, g)):
                idx = g.indices[pos]         # the chunk's padding repeats a group member
                batch = (take(parts[k], jnp.asarray(pos)) if parts is not None else
                         narrow(take(data, jnp.asarray(idx)), g.atoms, g.pairs))
                E, F = self._predict(params, batch)
                yield idx[:n], np.asarray(E)[:n], np.asarray(F)[:n] if forces else None, batch

    def predict(self, params, data: PaddedData | GroupedData, forces: bool = True):
        """Committee predictions on a whole data set: E (C, K) eV, F (C, K, N, 3) eV/Å
        (None without ``forces``), numpy; a size group's forces land in its first
        ``group.atoms`` slots (the rest stay zero, as for padding atoms)."""
        E_all = F_all = None
        for idx, E, F, _ in self._predictions(params, data, forces):
            if E_all is None:
                E_all = np.zeros((len(data),) + E.shape[1:], E.dtype)
                if forces:
                    F_all = np.zeros((len(data), F.shape[1], data.max_atoms, 3), F.dtype)
            E_all[idx] = E
            if forces:
                F_all[idx, :, :F.shape[2]] = F
        return E_all, F_all

    def committee_mean(self, params, data: PaddedData | GroupedData):
        """The committee mean on ``data``: E (C,) eV, and over the labelled atoms in data-set
        and atom order, predicted and reference forces (M, 3) eV/Å and their configuration
        (M,).  Memory ~ the labelled forces, not C x K x the largest atom count."""
        E_all, pred, ref = None, [None] * len(data), [None] * len(data)
        for idx, E, F, batch in self._predictions(params, data):
            if E_all is None:
                E_all = np.zeros(len(data), E.dtype)
            E_all[idx] = E.mean(1)
            mask = np.asarray(force_atom_mask(batch), bool)[:len(idx)]
            F_ref = np.asarray(batch.forces)[:len(idx)]
            F_mean = F.mean(1)
            for row, i in enumerate(idx):
                pred[i], ref[i] = F_mean[row][mask[row]], F_ref[row][mask[row]]
        config = np.repeat(np.arange(len(data)), [len(f) for f in pred])
        return E_all, np.concatenate(pred), np.concatenate(ref), config

    def validate(self, params) -> dict:
        """Validation metrics of the committee mean, with and without the outliers."""
        if self.valid is None:
            return {}
        E, F, F_ref, config = self.committee_mean(params, self.valid)
        n_atoms = np.asarray(self.valid.n_atoms, np.float64)
        out = {"all": metrics(E, self.valid_energy64, n_atoms, F, F_ref)}
        if self.outliers and self.valid_ids is not None:
            keep = ~np.isin(self.valid_ids, self.outliers)
            out["without_outliers"] = metrics(E[keep], self.valid_energy64[keep],
                                              n_atoms[keep], F[keep[config]],
                                              F_ref[keep[config]])
        return out

    def fit_offset(self, params, data: PaddedData | None = None, energy64=None,
                   predicted=None):
        """Shift each member's per-atom bias by the least-squares offset c = Σ N ΔE / Σ N².

        ``predicted`` (C, K) eV: the members' energies on ``data`` where already known."""
        data = self.train if data is None else data
        energy64 = self.train_energy64 if energy64 is None else energy64
        E = self.predict(params, data, forces=False)[0] if predicted is None else predicted
        c = common_energy_per_atom(data.n_atoms, np.asarray(energy64)[:, None] - E)  # (K,)
        bias = params["params"]["denormalizer"]["bias"]
        new_bias = bias + jnp.asarray(c, bias.dtype).reshape((-1,) + (1,) * (bias.ndim - 1))
        params = jax.tree.map(lambda a: a, params)
        params["params"] = dict(params["params"])
        params["params"]["denormalizer"] = dict(params["params"]["denormalizer"], bias=new_bias)
        return params

    # ------------------------------------------------------------------ state

    def init_state(self) -> TrainState:
        key = jax.random.key(self.cfg.seed)
        keys = jax.random.split(key, self.cfg.committee)
        params = stack([self.model.init(k, self.dtype) for k in keys])
        if self.cfg.fit_offset:
            params = self.fit_offset(params)
        opt_state = self.optimizer.init(params)
        return TrainState(params=params, opt_state=opt_state, epoch=0, step=0,
                          key=np.asarray(jax.random.key_data(key)),
                          best_params=jax.tree.map(jnp.copy, params), best_metric=math.inf,
                          best_epoch=0, bad_epochs=0, elapsed=0.0, history=[],
                          ema_params=None if self.cfg.ema is None else
                          jax.tree.map(jnp.copy, params))

    def save_state(self, path, state: TrainState) -> None:
        extra = {"training": {
            "epoch": state.epoch, "step": state.step,
            "opt_state": [np.asarray(a) for a in jax.tree.leaves(state.opt_state)],
            "key": np.asarray(state.key), "data_seed": self.cfg.data_seed,
            "best_params": jax.tree.map(np.asarray, state.best_params),
            "best_metric": float(state.best_metric), "best_epoch": state.best_epoch,
            "bad_epochs": state.bad_epochs, "elapsed": float(state.elapsed),
            "history": state.history, "settings": _jsonable(self.cfg.identity()),
            "planned_steps": state.planned_steps,
        }}
        if state.ema_params is not None:
            extra["training"]["ema_params"] = jax.tree.map(np.asarray, state.ema_params)
        save(path, self.model, jax.tree.map(np.asarray, state.params), extra=extra,
             committee=True)  # the state keeps the member axis, K = 1 included

    def load_state(self, path) -> TrainState:
        model, params, extra = load(path, with_extra=True)
        t = (extra or {}).get("training")
        if t is None:
            raise ValueError(f"{path} is not a training state (no training entry); "
                             "start without --resume")
        if model != self.model:
            raise ValueError(f"{path}: its model settings {model.to_config()} differ from "
                             f"this run's {self.model.to_config()}")
        if t["settings"] != _jsonable(self.cfg.identity()):
            raise ValueError(f"{path}: training settings differ from this run's "
                             f"(stored {t['settings']}, now {_jsonable(self.cfg.identity())})")
        if committee_size(params) != self.cfg.committee:
            raise ValueError(f"{path}: committee size differs from this run's")
        params = jax.tree.map(jnp.asarray, params)
        template = self.optimizer.init(params)
        leaves, treedef = jax.tree.flatten(template)
        stored = t["opt_state"]
        if len(stored) != len(leaves) or any(
                np.shape(a) != np.shape(b) for a, b in zip(stored, leaves)):
            raise ValueError(f"{path}: optimiser state does not match this run")
        opt_state = jax.tree.unflatten(treedef, [jnp.asarray(a, b.dtype)
                                                 for a, b in zip(stored, leaves)])
        ema_params = None
        if self.cfg.ema is not None:
            if "ema_params" not in t:
                raise ValueError(f"{path}: no parameter average in the state of this run")
            ema_params = jax.tree.map(jnp.asarray, t["ema_params"])
        return TrainState(params=params, opt_state=opt_state, epoch=int(t["epoch"]),
                          step=int(t["step"]), key=np.asarray(t["key"]),
                          best_params=jax.tree.map(jnp.asarray, t["best_params"]),
                          best_metric=float(t["best_metric"]), best_epoch=int(t["best_epoch"]),
                          bad_epochs=int(t["bad_epochs"]), elapsed=float(t["elapsed"]),
                          history=list(t["history"]), planned_steps=t.get("planned_steps"),
                          ema_params=ema_params)

    # ------------------------------------------------------------------ the loop

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.data_seed, epoch]).permutation(self.n_train)

    def epoch_batches(self, epoch: int) -> list[tuple]:
        """The batches of epoch ``epoch``: (indices, padding index, window) each.

        One size group: consecutive slices of :meth:`epoch_order`.  Several: each group
        shuffled and sliced, then the batches of all groups shuffled, by the same
        ``default_rng([data_seed, epoch])``; a batch is padded with one of its own group.
        """
        if len(self.train_groups) == 1:
            order = self.epoch_order(epoch)
            return [(order[s:s + self.batch], order[0], None)
                    for s in range(0, self.n_train, self.batch)]
        rng = np.random.default_rng([self.cfg.data_seed, epoch])
        batches = []
        for g in self.train_groups:
            order = g.indices[rng.permutation(len(g.indices))]
            batches += [(order[s:s + self.batch], order[0], (g.atoms, g.pairs))
                        for s in range(0, len(order), self.batch)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def run_epoch(self, state: TrainState):
        """One epoch in place; returns the mean training loss (over steps and members)."""
        losses = []
        for idx, pad, window in self.epoch_batches(state.epoch):
            weight = np.zeros(self.batch, np.float32)
            weight[:len(idx)] = 1
            idx = np.concatenate([idx, np.full(self.batch - len(idx), pad)])
            data = self.train
            if "train" in self._parts:  # the group's own part, already narrowed
                data, idx, window = (self._parts["train"][self._group_of[pad]],
                                     self._row_of[idx], None)
            lr = learning_rate(self.cfg, state.step, self.steps_per_epoch, state.planned_steps)
            state.params, state.opt_state, per = self._step(
                state.params, state.opt_state, data, jnp.asarray(idx, jnp.int32),
                jnp.asarray(weight, self.dtype), jnp.asarray(lr, self.dtype), window)
            losses.append(per)
            state.step += 1
            if state.ema_params is not None:
                decay = ema_decay(self.cfg.ema, state.step)
                state.ema_params = _ema_update(state.ema_params, state.params,
                                               jnp.asarray(decay, self.dtype))
        state.epoch += 1
        return float(np.mean(np.stack([np.asarray(l) for l in losses])))

    def selection_metric(self, valid: dict) -> float:
        return float(valid.get("all", {}).get(self.selection_key, math.nan))

    def fit(self, state: TrainState, state_path=None, on_epoch=None, on_checkpoint=None,
            checkpoint_seconds: float = 0.0) -> TrainState:
        """Train until cfg.epochs, the patience or the time budget runs out.

        ``on_epoch(state, entry)`` is called with the history entry of each epoch.
        ``state_path`` is written (atomic) after the first epoch, then whenever
        ``checkpoint_seconds`` have passed since the last write, and after the last
        epoch; ``on_checkpoint(state)`` follows each write.  (Writing the whole history
        after every one of thousands of 0.2 s epochs would cost more than the training.)
        Raises :class:`TrainingDiverged` after an epoch whose loss is not finite, before
        anything of that epoch is written (``state.best_params`` stay valid).
        """
        t_start = time.perf_counter()
        cfg = self.cfg
        last = math.inf if cfg.epochs is None else cfg.epochs
        if cfg.schedule == "run" and state.planned_steps is None and cfg.max_minutes is None:
            state.planned_steps = cfg.epochs * self.steps_per_epoch
        # a budget run plans (and keeps re-planning) its cycle; a resumed one keeps the plan
        budget_plan = cfg.schedule == "run" and cfg.max_minutes is not None and \
            state.planned_steps is None
        epoch_times = []                 # wall time per epoch, checkpoints included
        last_write, written = -math.inf, True

        def checkpoint():
            nonlocal last_write, written
            if state_path is not None:
                self.save_state(state_path, state)
            if on_checkpoint is not None:
                on_checkpoint(state)
            last_write, written = time.perf_counter(), True

        t_mark = time.perf_counter()
        while state.epoch < last:
            loss = self.run_epoch(state)
            if not math.isfinite(loss):  # every later epoch would be lost time
                raise TrainingDiverged(state.epoch, loss, state.best_epoch)
            valid = self.validate(state.eval_params)
            metric = self.selection_metric(valid) if valid else -float(state.epoch)
            improved = metric < state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.bad_epochs = metric, state.epoch, 0
                state.best_params = jax.tree.map(jnp.copy, state.eval_params)
            else:
                state.bad_epochs += 1
            # this epoch's wall time: training, validation, and the previous epoch's
            # callbacks and checkpoint
            dt, t_mark = time.perf_counter() - t_mark, time.perf_counter()
            state.elapsed += dt
            epoch_times.append(dt)
            entry = {"epoch": state.epoch, "step": state.step, "wall_time_s": state.elapsed,
                     "epoch_time_s": dt, "train_loss": loss,
                     "valid": valid, "best": improved,
                     "lr": learning_rate(cfg, state.step - 1, self.steps_per_epoch,
                                         state.planned_steps)}
            state.history.append(entry)
            written = False
            stop = (cfg.patience is not None and state.bad_epochs >= cfg.patience) or \
                state.epoch >= last or (cfg.max_minutes is not None and
                                        time.perf_counter() - t_start >= 60.0 * cfg.max_minutes)
            if stop or time.perf_counter() - last_write >= checkpoint_seconds:
                checkpoint()
            if on_epoch is not None:
                on_epoch(state, entry)
            if budget_plan and len(epoch_times) >= 3:
                # Re-planned after every epoch from the recent epoch times (the first epoch
                # of a process includes compilation), so a machine that slows down or
                # speeds up still ends the cycle, at lr_end, inside the budget.
                left = 60.0 * cfg.max_minutes - (time.perf_counter() - t_start)
                recent = epoch_times[1:][-50:]
                fits = state.epoch + int(0.98 * max(0.0, left) * len(recent) / sum(recent))
                state.planned_steps = max(state.step, min(last, fits) * self.steps_per_epoch)
            if stop:
                break
        if not written:
            checkpoint()
        return state

    def refit_species_energies(self, params, data: PaddedData | None = None, energy64=None):
        """``self.model`` with its species energies moved by the least-squares fit of the
        residual energies of the committee mean on ``data`` (default: the training set),
        and the members' energies (C, K) eV on ``data`` under the new table.

        For training on forces only, which leaves the network's energy per species free
        (one table for all members; :meth:`final_params` then fits each member's offset)."""
        data = self.train if data is None else data
        energy64 = self.train_energy64 if energy64 is None else energy64
        E = self.predict(params, data, forces=False)[0]  # (C, K)
        counts = species_counts(data, self.model.n_species)
        delta = fit_species_energies(counts, np.asarray(energy64) - E.mean(1))
        table = np.asarray(self.model.species_energies or np.zeros(self.model.n_species))
        # the table adds counts @ delta to every member's energy: no second prediction
        return (dataclasses.replace(self.model, species_energies=tuple(table + delta)),
                E + (counts @ delta)[:, None])

    def final_params(self, state: TrainState):
        """The best parameters; with the offset refitted when energies were not trained on.

        Then a model with species energies also gets its table refitted first (the
        committee mean's energy per species), so save ``self.model`` with these."""
        params = state.best_params
        if self.cfg.fit_offset and not self.cfg.loss.uses_energy:
            predicted = None
            if self.model.species_energies is not None:
                self.model, predicted = self.refit_species_energies(params)
            params = self.fit_offset(params, predicted=predicted)  # each member's own offset
        return params


def _same_groups(a, b) -> bool:
    return len(a) == len(b) and all(
        (x.atoms, x.pairs) == (y.atoms, y.pairs) and np.array_equal(x.indices, y.indices)
        for x, y in zip(a, b))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
