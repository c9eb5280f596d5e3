"""The NeuralIL network (neuralil-model.md §3, §5): embedding, core MLP, Morse term.

``NeuralIL`` is the static configuration (a frozen, hashable dataclass) and the
pure functions on it; the flax modules below are thin wrappers whose parameter
names follow the original code's tree, so its parameters load unchanged:

    params/embed/embedding (S, embed_dim)
    params/core_model/{Inlet, Stage_1.., LayerNorm_0.., Outlet}
    params/denormalizer/{kernel (1, 1), bias (1,)}
    params/morse/{embed/embedding (S, 3), switch_param (1, 1)}
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .descriptors import DescriptorSpec

__all__ = ["NeuralIL", "save", "load", "from_neuralil", "swish", "morse_atomic_energies",
           "core_repulsion_energies", "pair_atomic_energies", "zbl_pair"]

ACTIVATIONS = ("swish", "selu")
FORMAT_NAME = "NeuralIL"


@jax.custom_jvp
def swish(x):
    """Swish-1, x sigmoid(x) (= ``nn.swish``), with its derivative written from sigmoid(x).

    The rule s + y (1 - s) (y = x s) reuses the forward's sigmoid, and differentiating it
    again needs only s (1 - s): the training step's second-order pass evaluates one
    sigmoid per activation where ``nn.swish``'s derivative graph had XLA evaluate several
    (a training step 1.03-1.06x faster, same results to rounding).
    """
    return x * jax.nn.sigmoid(x)


@swish.defjvp
def _swish_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    y = x * s
    return y, t * (s + y * (1 - s))


class Inlet(nn.Module):
    """``nn.Dense`` on concat([x, table[species]]) without forming the concatenation.

    Same parameters (kernel (F + E, w), bias (w,)) and initialisers as the Dense it
    replaces.  The descriptor part is one matmul whose left operand a committee shares
    (vmapped over members it stays one GEMM against the K kernels side by side); the
    embedding part is an (S, w) table gathered per atom.
    """

    features: int

    @nn.compact
    def __call__(self, x, table, species):
        n_x = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (n_x + table.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        kernel, bias, table = (a.astype(x.dtype) for a in (kernel, bias, table))
        return x @ kernel[:n_x] + (table @ kernel[n_x:] + bias)[species]


class Core(nn.Module):
    """Dense(w0) → act, then [Dense(w) → LayerNorm → act]..., then Dense(1) → act.

    The first Dense acts on concat([descriptors, embedding table[species]]) (:class:`Inlet`).
    With ``layer_norm=False`` (the article's SELU variant) the LayerNorms are left out.
    """

    widths: Sequence[int]
    activation: str = "swish"
    layer_norm: bool = True

    @nn.compact
    def __call__(self, x, table, species):
        act = swish if self.activation == "swish" else nn.selu
        x = act(Inlet(self.widths[0], name="Inlet")(x, table, species))
        for k, w in enumerate(self.widths[1:]):
            x = nn.Dense(w, name=f"Stage_{k + 1}")(x)
            if self.layer_norm:
                x = nn.LayerNorm(epsilon=1e-6, name=f"LayerNorm_{k}")(x)
            x = act(x)
        return act(nn.Dense(1, name="Outlet")(x))


class MorseParams(nn.Module):
    """Per-species (a, b, d) = 0.01 + v_s^2 and the switching parameter."""

    n_species: int

    @nn.compact
    def __call__(self):
        switch = self.param("switch_param", nn.initializers.lecun_normal(), (1, 1))
        v = nn.Embed(self.n_species, 3, name="embed").embedding
        return 0.01 + v**2, switch[0, 0]


class AtomicNetwork(nn.Module):
    """Descriptors (N, F) and species (N,) → NN atomic energies (N,), eV; plus Morse parameters."""

    n_species: int
    embed_dim: int
    widths: Sequence[int]
    activation: str
    layer_norm: bool
    use_morse: bool

    def setup(self):
        self.embed = nn.Embed(self.n_species, self.embed_dim)
        self.core_model = Core(tuple(self.widths), self.activation, self.layer_norm)
        self.denormalizer = nn.Dense(1)
        if self.use_morse:
            self.morse = MorseParams(self.n_species)

    def __call__(self, descriptors, species):
        e = self.denormalizer(self.core_model(descriptors, self.embed.embedding, species))[..., 0]
        morse = self.morse() if self.use_morse else None
        return e, morse


def _switch_off(t):
    """1 - G(t), G(t) = h(t) / (h(t) + h(1 - t)), h(t) = exp(-1/t) for t > 0 else 0.

    Written as sigmoid(1/t - 1/(1 - t)) on 0 < t < 1 (one exp instead of two and no
    division of two vanishing numbers), 1 below, 0 above; NaN-safe at the edges.
    """
    inside = (t > 0.0) & (t < 1.0)
    u = jnp.where(inside, t, 0.5)
    return jnp.where(inside, jax.nn.sigmoid(1.0 / u - 1.0 / (1.0 - u)),
                     jnp.where(t <= 0.0, 1.0, 0.0))


def morse_atomic_energies(abd, switch_param, r, valid, species_i, species_j, centers, n_atoms,
                          r_cut):
    """Repulsive Morse energy per atom (N,), eV, from pairs.

    abd: (S, 3) per-species (a 1/Å, b Å, d eV); r (P,) Å; valid (P,) bool.
    E_i = 1/2 sum_j S(r_ij) d_i exp(-2 a_i (2 r1_ij - b_i)), r1_ij the probe's mixing radius
    r1 = (a_j r + log(a_i d_i / (a_j d_j)) / 4 + (a_i b_i - a_j b_j) / 2) / (a_i + a_j).
    """
    # linear in r, so d_i exp(-2 a_i (2 r1 - b_i)) = exp(c0_ij - c1_ij r): the (S, S) table
    # of (c0, c1) is built once, each pair gathers one row and takes one exp (training a
    # committee repeats the per-pair work for every member and both derivative orders)
    n_species = abd.shape[0]
    a, b, d = abd[:, 0], abd[:, 1], abd[:, 2]
    ai, aj = a[:, None], a[None, :]
    beta = (0.25 * jnp.log((a * d)[:, None] / (a * d)[None, :])
            + 0.5 * ((a * b)[:, None] - (a * b)[None, :])) / (ai + aj)
    c0 = jnp.log(d)[:, None] - 4.0 * ai * beta + 2.0 * (a * b)[:, None]
    c1 = 4.0 * ai * aj / (ai + aj)
    table = jnp.stack([c0, c1], axis=-1).reshape(n_species * n_species, 2)
    coef = table[species_i * n_species + species_j]
    phi = jnp.exp(coef[:, 0] - coef[:, 1] * r)
    r_s = 0.5 * (1.0 + jax.nn.sigmoid(switch_param)) * r_cut
    cutoff = _switch_off((r * r - r_s * r_s) / (r_cut * r_cut - r_s * r_s))
    pair = jnp.where(valid, 0.5 * cutoff * phi, 0.0)
    return jax.ops.segment_sum(pair, jnp.where(valid, centers, n_atoms), num_segments=n_atoms)


# Universal screened-nuclear (ZBL) repulsion: Ziegler, Biersack, Littmark (1985).
_ZBL_TERMS = ((0.18175, 3.19980), (0.50986, 0.94229), (0.28022, 0.40290), (0.02817, 0.20162))
_COULOMB = 14.399645   # e^2 / (4 pi eps0), eV Å


def zbl_pair(r, z_i, z_j):
    """(V (eV), dV/dr (eV/Å)) of the ZBL repulsion at r > 0 Å between nuclear charges z_i, z_j."""
    a = 0.46850 / (z_i**0.23 + z_j**0.23)
    phi = dphi = 0.0
    for c, k in _ZBL_TERMS:
        t = c * jnp.exp(-k * r / a)
        phi, dphi = phi + t, dphi - (k / a) * t
    q = _COULOMB * z_i * z_j
    return q * phi / r, q * (dphi / r - phi / (r * r))


def core_repulsion_energies(onset, z, r, valid, species_i, species_j, centers, n_atoms):
    """Core repulsion per atom (N,), eV: 1/2 sum_j V_ij(r_ij) over the (full) pair list.

    onset (S, S) Å: per species pair, the radius below which the wall acts (the training
    set's closest approach); z (S,) nuclear charges.  Below the onset r0,
    V(r) = Z(r) - Z(r0) - Z'(r0) (r - r0) with Z the ZBL repulsion, so energy and force
    are continuous and zero at r0 and beyond: a model fitted to data with no pair closer
    than r0 is unchanged on that data, and atoms pushed closer meet a nuclear wall instead
    of the network's unconstrained extrapolation.
    """
    r0 = onset[species_i, species_j]
    active = valid & (r < r0)
    rs = jnp.where(active, r, r0)      # r = 0 on padding rows: never reaches the 1/r
    zi, zj = z[species_i], z[species_j]
    v, _ = zbl_pair(rs, zi, zj)
    v0, dv0 = zbl_pair(r0, zi, zj)
    pair = jnp.where(active, 0.5 * (v - v0 - dv0 * (rs - r0)), 0.0)
    return jax.ops.segment_sum(pair, jnp.where(active, centers, n_atoms), num_segments=n_atoms)


def pair_atomic_energies(model: "NeuralIL", morse, r, valid, species_i, species_j, centers,
                         n_atoms):
    """(N,) eV: the pair terms of ``model`` (Morse with ``morse`` = (abd, switch), core wall)."""
    with jax.named_scope("pair_terms"):  # names these ops in profiles
        e = 0.0
        if morse is not None:
            abd, switch = morse
            e = morse_atomic_energies(abd, switch, r, valid, species_i, species_j, centers,
                                      n_atoms, model.r_cut)
        if model.core_repulsion is not None:
            from ase.data import atomic_numbers

            onset = jnp.asarray(model.core_repulsion, r.dtype)
            z = jnp.asarray([atomic_numbers[s] for s in model.species], r.dtype)
            e = e + core_repulsion_energies(onset, z, r, valid, species_i, species_j,
                                            centers, n_atoms)
        return e


@dataclasses.dataclass(frozen=True)
class NeuralIL:
    """A NeuralIL potential: descriptors + species embedding + MLP (+ repulsive Morse).

    species: element symbols; sorted alphabetically, as NeuralIL does (index = position).
    r_cut (Å), n_max: descriptor settings.  widths: core layer widths.
    activation: "swish" (Swish-1 with LayerNorm) or "selu" (SELU without LayerNorm).
    element_resolved: False = the ablation with one density for all neighbour species.
    core_repulsion: None, or per species pair (S x S nested tuple, Å) the onset radius of a
      fixed ZBL wall (see :func:`core_repulsion_energies`); usually the training data's
      closest approach of each pair (``training.data.closest_approach``).
    species_energies: None, or a fixed reference energy per species (eV per atom; a
      mapping symbol -> eV, or a sequence in the sorted ``species`` order) added to each
      atom's energy: the composition-dependent part of the total energy, fitted by least
      squares before training (``training.data.fit_species_energies``) so that the
      network learns the rest.  Forces and stress do not depend on it.
    """

    species: tuple
    r_cut: float = 3.5
    n_max: int = 4
    embed_dim: int = 2
    widths: tuple = (64, 32, 16, 16, 16)
    activation: str = "swish"
    morse: bool = True
    element_resolved: bool = True
    core_repulsion: tuple | None = None
    species_energies: tuple | None = None

    def __post_init__(self):
        from ase.data import atomic_numbers

        species = tuple(sorted(self.species))
        if len(set(species)) != len(species) or not species:
            raise ValueError(f"species must be distinct element symbols, got {self.species}")
        unknown = [s for s in species if s not in atomic_numbers]
        if unknown:
            raise ValueError(f"unknown element symbols {unknown}")
        object.__setattr__(self, "species", species)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive layer sizes, got {self.widths}")
        if isinstance(self.embed_dim, bool) or int(self.embed_dim) != self.embed_dim \
                or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be an integer >= 1, got {self.embed_dim!r}")
        self.spec  # validates r_cut and n_max
        if self.core_repulsion is not None:
            onset = np.asarray(self.core_repulsion, dtype=np.float64)
            S = len(species)
            if onset.shape != (S, S) or not np.all(np.isfinite(onset)) or np.any(onset <= 0) \
                    or not np.array_equal(onset, onset.T):
                raise ValueError(f"core_repulsion must be a symmetric {S} x {S} table of "
                                 f"positive onset radii (Å), got {self.core_repulsion!r}")
            object.__setattr__(self, "core_repulsion",
                               tuple(tuple(float(x) for x in row) for row in onset))
        if self.species_energies is not None:
            object.__setattr__(self, "species_energies",
                               _species_table(self.species_energies, species))

    @property
    def n_species(self) -> int:
        return len(self.species)

    @property
    def spec(self) -> DescriptorSpec:
        n = self.n_species if self.element_resolved else 1
        return DescriptorSpec(n, float(self.r_cut), int(self.n_max))

    @property
    def network(self) -> AtomicNetwork:
        return AtomicNetwork(self.n_species, self.embed_dim, self.widths, self.activation,
                             self.activation == "swish", self.morse)

    def init(self, key, dtype=jnp.float32):
        """Random parameters (a dict pytree), flax's default initialisers."""
        X = jnp.zeros((1, self.spec.n_features), dtype)
        params = self.network.init(key, X, jnp.zeros((1,), jnp.int32))
        return jax.tree.map(lambda a: a.astype(dtype), _unfreeze(params))

    def check_params(self, params, committee: bool = False) -> None:
        """ValueError unless ``params`` has this model's tree and shapes (+ a leading K axis).

        Names the first leaf that differs: parameters of a model with other species,
        n_max, widths, embed_dim or Morse/no-Morse fail here, not deep inside flax.
        """
        expected = jax.eval_shape(lambda: self.init(jax.random.key(0)))
        want = {jax.tree_util.keystr(k): v.shape
                for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
        try:
            got = {jax.tree_util.keystr(k): np.shape(v)
                   for k, v in jax.tree_util.tree_flatten_with_path(_unfreeze(params))[0]}
        except Exception as err:  # noqa: BLE001 - any non-tree input
            raise ValueError(f"params are not a parameter tree: {err}") from None
        hint = "(are they the parameters of a model with other settings?)"
        if sorted(got) != sorted(want):
            extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            raise ValueError(f"params do not fit this model: unexpected {extra[:3]}, missing "
                             f"{missing[:3]} {hint}")
        for name, shape in want.items():
            have = got[name][1:] if committee else got[name]
            if committee and not got[name]:
                raise ValueError(f"committee params{name} has no leading member axis")
            if tuple(have) != tuple(shape):
                if not committee and tuple(got[name][1:]) == tuple(shape):
                    hint = ("(a committee's parameters, a leading member axis? take one "
                            "with committee.member(params, k), or pass committee=True where "
                            "the call takes it: Calculator, save)")
                raise ValueError(f"params{name} has shape {got[name]}, this model expects "
                                 f"{('(K, ' + str(shape)[1:]) if committee else shape} {hint}")

    def to_config(self) -> dict:
        config = dataclasses.asdict(self)
        config["species"] = list(self.species)
        config["widths"] = list(self.widths)
        if self.core_repulsion is not None:
            config["core_repulsion"] = [list(row) for row in self.core_repulsion]
        if self.species_energies is None:  # files of models without them stay as they were
            config.pop("species_energies")
        else:
            config["species_energies"] = list(self.species_energies)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "NeuralIL":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")

        def frozen(v):
            return tuple(frozen(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: frozen(v) for k, v in config.items()})

    def apply_network(self, params, descriptors, species):
        """(NN atomic energies (N,) + the species energies, morse parameters or None)."""
        params = jax.tree.map(lambda a: a.astype(descriptors.dtype), params)
        e, morse = self.network.apply(params, descriptors, species)
        if self.species_energies is not None:
            e = e + jnp.asarray(self.species_energies, e.dtype)[species]
        return e, morse


def _species_table(values, species: tuple) -> tuple:
    """``values`` (symbol -> eV, or a sequence in ``species`` order) as a tuple of floats."""
    if isinstance(values, dict):
        missing = [s for s in species if s not in values]
        extra = [s for s in values if s not in species]
        if missing or extra:
            raise ValueError(f"species_energies must give one energy per species {species}: "
                             f"missing {missing}, unexpected {extra}")
        values = [values[s] for s in species]
    try:
        table = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        table = np.full(0, np.nan)
    if table.shape != (len(species),) or not np.all(np.isfinite(table)):
        raise ValueError(f"species_energies must be {len(species)} finite energies (eV, in "
                         f"the order {species}) or a mapping symbol -> eV, got {values!r}")
    return tuple(float(x) for x in table)


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, dict):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------
# Saving and loading


def save(path, model: NeuralIL, params, extra: dict | None = None, *,
         committee: bool | None = None) -> None:
    """Write ``model`` and ``params`` to ``path`` atomically in the safe checkpoint format.

    committee: whether ``params`` carry a leading member axis K (checked against the
    model); None: as ``extra["committee"]`` says (see :mod:`neuralil_fast.committee`).
    """
    from .io import write_checkpoint

    if committee is None:
        committee = bool((extra or {}).get("committee"))
    model.check_params(params, committee=committee)
    config = {"model": FORMAT_NAME, "settings": model.to_config()}
    write_checkpoint(path, config, jax.tree.map(np.asarray, _unfreeze(params)), extra=extra)


def load(path, with_extra: bool = False):
    """(model, params) from a file written by :func:`save`; ValueError if it is not one."""
    from .io import read_checkpoint

    config, params, extra = read_checkpoint(path)
    if not isinstance(config, dict) or config.get("model") != FORMAT_NAME:
        raise ValueError(f"{path}: not a neuralil_fast model checkpoint (model={config.get('model')!r})")
    model = NeuralIL.from_config(config["settings"])
    # numpy leaves keep the stored dtype exactly (jnp would narrow float64 without x64)
    return (model, params, extra) if with_extra else (model, params)


def from_neuralil(path, species=None, r_cut=None, n_max=None):
    """(model, params) from a parameter pickle written by the original NeuralIL code.

    The pickle is read with a restricted unpickler (no code from the file runs).
    ``species``, ``r_cut``, ``n_max`` override or check the values stored in it.
    """
    from .io import read_neuralil_pickle

    info = read_neuralil_pickle(path)
    stored_species = tuple(info["sorted_elements"])
    if species is not None and tuple(sorted(species)) != tuple(sorted(stored_species)):
        raise ValueError(f"{path}: the model was trained for {stored_species}, not {tuple(species)}")
    tree = info["params"]
    tree = tree.get("params", tree) if "params" in tree and len(tree) == 1 else tree
    has_morse = "morse" in tree
    model = NeuralIL(
        species=stored_species,
        r_cut=float(r_cut if r_cut is not None else info["r_cut"]),
        n_max=int(n_max if n_max is not None else info["n_max"]),
        embed_dim=int(info["embed_d"]),
        widths=tuple(int(w) for w in info["core_widths"]),
        morse=has_morse,
    )
    params = {"params": jax.tree.map(jnp.asarray, tree)}
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or any(
        e.shape != g.shape for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got))
    ):
        raise ValueError(f"{path}: parameter tree does not match a NeuralIL model with these settings")
    return model, params
