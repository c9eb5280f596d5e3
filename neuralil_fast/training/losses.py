"""Training losses (neuralil-model.md §4).

All losses take a batch of predictions and references with masks:

    energy_pred, energy_ref (B,) eV; n_atoms (B,); weight (B,) 0/1 (batch padding)
    forces_pred, forces_ref (B, N, 3) eV/Å; atom_mask (B, N) 0/1 (atom padding)

Terms (each a weighted mean over the real configurations / atoms):

- ``logcosh-norm`` (default, the later NeuralIL releases):
  force term  mean_atoms  log cosh(|F_pred - F_ref| / s_F),   s_F = 0.2 eV/Å
  energy term mean_confs  log cosh(((E_pred - E_ref) / N) / s_E), s_E = 0.02 eV/atom
- ``logcosh-components`` (the article's code):
  force term  mean_components  log(cosh(p ΔF)) / p,  p = 10 Å/eV  (eV/Å)
  energy term as above
- ``mse``: force term mean_atoms |ΔF|^2 / s_F^2, energy term mean_confs (ΔE/N)^2 / s_E^2

total = w_F · force term + w_E · energy term (w_F = w_E = 0.5 by default;
energy-only: w_F = 0; forces-only: w_E = 0).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

__all__ = ["LossConfig", "log_cosh", "loss_terms", "total_loss", "LOSSES"]

LOSSES = ("logcosh-norm", "logcosh-components", "mse")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "logcosh-norm"
    force_weight: float = 0.5
    energy_weight: float = 0.5
    force_scale: float = 0.2       # eV/Å, the norm and MSE forms
    energy_scale: float = 0.02     # eV/atom
    p: float = 10.0                # Å/eV, the component form

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"unknown loss {self.kind!r}; choose one of {LOSSES}")
        if self.force_weight < 0 or self.energy_weight < 0 or \
                self.force_weight + self.energy_weight <= 0:
            raise ValueError("loss weights must be >= 0 and not both 0")
        for name in ("force_scale", "energy_scale", "p"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def uses_forces(self) -> bool:
        return self.force_weight > 0

    @property
    def uses_energy(self) -> bool:
        return self.energy_weight > 0


def log_cosh(x):
    """log(cosh(x)), stable for large |x|: |x| + log1p(exp(-2|x|)) - log 2."""
    a = jnp.abs(x)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - math.log(2.0)


def _safe_norm(v):
    sq = jnp.sum(v * v, axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _wmean(values, weights):
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-30)


def loss_terms(cfg: LossConfig, energy_pred, energy_ref, n_atoms, weight, forces_pred,
               forces_ref, atom_mask):
    """(force term, energy term), scalars (see the module docstring)."""
    w_atoms = weight[:, None] * atom_mask
    dF = (forces_pred - forces_ref) * atom_mask[..., None]
    dE = (energy_pred - energy_ref) / n_atoms
    if cfg.kind == "logcosh-norm":
        f = _wmean(log_cosh(_safe_norm(dF) / cfg.force_scale), w_atoms)
        e = _wmean(log_cosh(dE / cfg.energy_scale), weight)
    elif cfg.kind == "logcosh-components":
        f = _wmean(log_cosh(cfg.p * dF) / cfg.p, w_atoms[..., None] * jnp.ones((3,), dF.dtype))
        e = _wmean(log_cosh(dE / cfg.energy_scale), weight)
    else:
        f = _wmean(jnp.sum(dF * dF, axis=-1) / cfg.force_scale**2, w_atoms)
        e = _wmean((dE / cfg.energy_scale) ** 2, weight)
    return f, e


def total_loss(cfg: LossConfig, *args):
    f, e = loss_terms(cfg, *args)
    total = 0.0
    if cfg.uses_forces:
        total = total + cfg.force_weight * f
    if cfg.uses_energy:
        total = total + cfg.energy_weight * e
    return total
