"""Triton kernels for the element-resolved spherical Bessel descriptors.

Math: neuralil-model.md §1-2; the oracle is ``neuralil_fast.descriptors``.

Three ``@triton.jit`` kernels, one program per centre atom, each looping over the
centre's CSR run of pairs in blocks of ``BLOCK_P`` pairs with the radial and the
angular work fused on a (BLOCK_P, NLM_PAD) tile (one column per (n, l, m)):

* ``_fwd_kernel``:  X (N, F) descriptors and A (N, S, n_nlm) density coefficients.
* ``_vjp_kernel``:  d_bar (P, 3) = d/d(displacements) of sum(X_bar * X), from A.
* ``_jvp_kernel``:  X_dot (N, F) = directional derivative along d_dot, from A.

Per-pair derivative tensors are recomputed in the vjp / jvp, never stored; only A
(a few hundred numbers per atom) is kept as the residual of the forward.

Pair layout (see ``neuralil_fast.neighbors``): displacements (P, 3) = x_j + S@cell - x_i,
neighbor_species (P,) int32, offsets (N+1,) int32 with pairs of centre i in rows
offsets[i] .. offsets[i+1]-1; rows past offsets[N] are padding (never read; the vjp
gives them 0).  A pair contributes only when 0 < r < r_cut.

Constants live in two small tables built on the host (``build_tables``) and passed
by pointer, so one compiled kernel serves every r_cut; n_max and the species count
are compile-time constants.  Column c of the nlm axis is (n, l, m) in the
reference's order (l-major (n, l), then m = -l..l); the radial function of column
c is written directly in the spherical Bessel functions of its l,

    g_nl(r) = sum_k W[k, c] j_l(U[k, c] r),   U[k, c] = u_{l,k} / r_c,  k = 0..n_max+1

(W folds c1, c2, the orthogonalisation T_l and r_c^-3/2), and the angular part is
Y_lm(û), polynomial in the unit vector, normalised as ``real_spherical_harmonics``.

Launchers: ``descriptors_{fwd,vjp,jvp}_torch`` (torch tensors; CPU tensors run in
the Triton interpreter when TRITON_INTERPRET=1) and ``descriptors_{fwd,vjp,jvp}_jax``
(jax arrays, through ``jax_triton.triton_call``; GPU only, imported lazily).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

import triton
import triton.language as tl

__all__ = [
    "DescriptorTables",
    "build_tables",
    "offsets_from_centers",
    "descriptors_fwd_torch",
    "descriptors_vjp_torch",
    "descriptors_jvp_torch",
    "descriptors_fwd_jax",
    "descriptors_vjp_jax",
    "descriptors_jvp_jax",
]

# Most terms of the small-x power series of j_l (the reference's basis._SERIES_TERMS);
# build_tables keeps only those that matter below the thresholds (relative 1e-18).
MAX_SERIES_TERMS = 20


# --------------------------------------------------------------------------- host tables


def _next_pow2(n: int, minimum: int = 2) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _dfact(n: int) -> int:
    """n!! for odd n >= -1."""
    return math.prod(range(1, n + 1, 2)) if n > 0 else 1


@dataclasses.dataclass(frozen=True, eq=False)
class DescriptorTables:
    """Host tables for one (n_max, r_cut), float64 numpy (cast to the kernel dtype at launch).

    ftab rows (each NLM_PAD wide, one entry per nlm column; padding columns are 0):
      [0, K)       U[k]  = u_{l,k} / r_cut (roots of j_l over the cutoff)
      [K, 2K)      W[k]  radial weights (c1, c2, T_l and r_cut^-3/2 folded)
      2K           series threshold of j_l (as ``basis._series_threshold``)
      2K+1         1 / (2l+1)!!  (leading series coefficient)
      2K+2         Y_lm normalisation (sqrt(2) included for m != 0)
      2K+3         (2|m|-1)!!    (start of the associated Legendre recurrence)
      2K+4         r_cut^2
    with K = n_max + 2.  itab rows (int32): l, m, (n, l) index (-1 on padding columns).
    """

    n_max: int
    r_cut: float
    ftab: np.ndarray
    itab: np.ndarray
    n_nl: int
    n_nlm: int
    nl_pad: int
    nlm_pad: int
    n_terms: int

    def n_features(self, n_species: int) -> int:
        return n_species * (n_species + 1) // 2 * self.n_nl

    def constexprs(self, n_species: int, block_p: int) -> dict:
        if block_p < 1 or block_p & (block_p - 1):
            raise ValueError(f"block_p must be a power of two, got {block_p}")
        return dict(N_MAX=self.n_max, N_SPECIES=int(n_species), N_NL=self.n_nl,
                    N_NLM=self.n_nlm, NL_PAD=self.nl_pad, NLM_PAD=self.nlm_pad,
                    S_PAD=_next_pow2(n_species), N_TERMS=self.n_terms, BLOCK_P=int(block_p))


@functools.lru_cache(maxsize=32)
def build_tables(n_max: int, r_cut: float) -> DescriptorTables:
    """The kernel tables for (n_max, r_cut), from ``neuralil_fast.basis.radial_basis``."""
    from neuralil_fast.basis import _series_threshold, nl_pairs, radial_basis

    basis = radial_basis(int(n_max), float(r_cut))
    n_max, r_cut = basis.n_max, basis.r_cut
    nl = nl_pairs(n_max)
    n_nl = len(nl)
    cols = [(c, n, l, m) for c, (n, l) in enumerate(nl) for m in range(-l, l + 1)]
    n_nlm = len(cols)
    nlm_pad = _next_pow2(n_nlm)
    K = n_max + 2
    ftab = np.zeros((2 * K + 5, nlm_pad))
    itab = np.zeros((3, nlm_pad), dtype=np.int32)
    itab[2, :] = -1
    scale = r_cut ** -1.5
    for col, (c, n, l, m) in enumerate(cols):
        T = basis.transforms[l]
        # g_n = sum_{n' <= n} T[n, n'] (c1[n'] j_l(u_n' r) - c2[n'] j_l(u_{n'+1} r)) / r_c^1.5
        for k in range(n + 2):
            ftab[k, col] = basis.roots[l, k] / r_cut
            w = 0.0
            if k <= n:
                w += T[n, k] * basis.c1[l, k]
            if 1 <= k <= n + 1:
                w -= T[n, k - 1] * basis.c2[l, k - 1]
            ftab[K + k, col] = w * scale
        am = abs(m)
        norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.factorial(l - am) / math.factorial(l + am))
        ftab[2 * K, col] = _series_threshold(l)
        ftab[2 * K + 1, col] = 1.0 / _dfact(2 * l + 1)
        ftab[2 * K + 2, col] = norm if m == 0 else math.sqrt(2.0) * norm
        ftab[2 * K + 3, col] = float(_dfact(2 * am - 1))
        itab[:, col] = (l, m, c)
    ftab[2 * K + 4, :] = r_cut * r_cut
    ftab.setflags(write=False)
    itab.setflags(write=False)
    return DescriptorTables(n_max, r_cut, ftab, itab, n_nl, n_nlm, _next_pow2(n_nl), nlm_pad,
                            _series_terms(n_max))


def _series_terms(n_max: int) -> int:
    """Series terms for j_0..j_{n_max} below their thresholds: the first dropped term is
    under 1e-18 of the sum (float64-exact), at most the reference's count."""
    from neuralil_fast.basis import _series_threshold

    need = 2
    for l in range(n_max + 1):
        y = _series_threshold(l) ** 2
        a = 1.0 / _dfact(2 * l + 1)
        total = a
        k = 1
        while k < MAX_SERIES_TERMS:
            a *= -y / (2.0 * k * (2 * l + 2 * k + 1))
            if abs(a) < 1e-18 * abs(total):
                break
            total += a
            k += 1
        need = max(need, k)
    return min(need + 1, MAX_SERIES_TERMS)  # one more for the derivative


def offsets_from_centers(centers, n_atoms: int):
    """CSR offsets (n_atoms+1,) int32 of centre-sorted ``centers`` (numpy, torch or jax)."""
    mod = type(centers).__module__
    if mod.startswith("torch"):
        import torch

        q = torch.arange(n_atoms + 1, dtype=centers.dtype, device=centers.device)
        return torch.searchsorted(centers.contiguous(), q, side="left").to(torch.int32)
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        import jax.numpy as jnp

        return jnp.searchsorted(centers, jnp.arange(n_atoms + 1, dtype=centers.dtype),
                                side="left").astype(jnp.int32)
    centers = np.asarray(centers)
    return np.searchsorted(centers, np.arange(n_atoms + 1), side="left").astype(np.int32)


# --------------------------------------------------------------------------- device functions


@triton.jit
def _sph_jl(x, l, lf, thr, c0, LMAX: tl.constexpr, NTERMS: tl.constexpr):
    """j_l(x) and dj_l/dx on a tile; l (int) / lf (float) / thr / c0 broadcast per column.

    Upward recurrence from sin/cos above the per-l threshold, power series below
    (the reference's two branches, differentiated in forward mode): finite
    everywhere, no division by a small x.
    """
    xs = tl.maximum(x, 0.25)
    s = tl.sin(xs)
    c = tl.cos(xs)
    inv = 1.0 / xs
    j0 = s * inv
    dj0 = (c - j0) * inv
    rec = j0
    drec = dj0
    if LMAX >= 1:
        j1 = (s * inv - c) * inv
        dj1 = (dj0 + s - j1) * inv
        rec = tl.where(l == 1, j1, rec)
        drec = tl.where(l == 1, dj1, drec)
        jp = j0
        jc = j1
        dp = dj0
        dc = dj1
        for n in tl.static_range(1, LMAX):
            jn = (2 * n + 1) * inv * jc - jp
            djn = (2 * n + 1) * inv * (dc - inv * jc) - dp
            rec = tl.where(l == n + 1, jn, rec)
            drec = tl.where(l == n + 1, djn, drec)
            jp = jc
            jc = jn
            dp = dc
            dc = djn
    # Series: j_l = x^l S(x^2),  S(y) = sum_k a_k y^k,  a_k = a_{k-1} * (-1 / (2k (2l+2k+1))).
    y = x * x
    zero = x * 0.0
    term = c0 + zero
    total = term
    dtot = zero  # S'(y) = sum_k k a_k y^(k-1)
    q = zero     # a_k y^(k-1)
    for k in tl.static_range(1, NTERMS):
        den = (2.0 * k) * (2.0 * lf + (2 * k + 1))
        if k == 1:
            q = zero - c0 / den
        else:
            q = q * (-y / den)
        term = term * (-y / den)
        total = total + term
        dtot = dtot + k * q
    pl = zero + 1.0    # x^l
    plm1 = zero + 1.0  # x^(l-1) (unused for l = 0)
    for i in tl.static_range(LMAX):
        pl = tl.where(l > i, pl * x, pl)
        plm1 = tl.where(l - 1 > i, plm1 * x, plm1)
    ser = total * pl
    dser = lf * plm1 * total + 2.0 * x * pl * dtot
    small = x < thr
    return tl.where(small, ser, rec), tl.where(small, dser, drec)


@triton.jit
def _radial(r, ftab, cols, l, lf, thr, c0,
            NLM_PAD: tl.constexpr, LMAX: tl.constexpr, NTERMS: tl.constexpr):
    """g_c(r) and dg_c/dr on the (BLOCK_P, NLM_PAD) tile."""
    rr = r[:, None]
    g = rr * 0.0 * c0
    dg = g
    for k in tl.static_range(LMAX + 2):
        u = tl.load(ftab + k * NLM_PAD + cols)[None, :]
        w = tl.load(ftab + (LMAX + 2 + k) * NLM_PAD + cols)[None, :]
        j, dj = _sph_jl(rr * u, l, lf, thr, c0, LMAX, NTERMS)
        g = g + w * j
        dg = dg + (w * u) * dj
    return g, dg


@triton.jit
def _angular(ux, uy, uz, l, m, yk, qmm, LMAX: tl.constexpr):
    """Y_c(û) and its partial derivatives in the unit-vector components (x, y, z).

    Y_lm = norm * Q_l^|m|(z) * (C_|m| for m > 0, S_|m| for m < 0, 1 for m = 0),
    C_m + i S_m = (x + i y)^m, Q as in ``real_spherical_harmonics``.
    """
    x = ux[:, None]
    y = uy[:, None]
    z = uz[:, None]
    zero = (x * 0.0) * yk  # (BLOCK_P, NLM_PAD)
    am = tl.abs(m)
    amf = am.to(yk.dtype)
    Cc = x * 0.0 + 1.0
    Sc = x * 0.0
    cm = tl.where(am == 0, Cc, zero)
    sm = zero
    cm1 = zero
    sm1 = zero
    for i in tl.static_range(1, LMAX + 1):
        Cn = x * Cc - y * Sc
        Sn = x * Sc + y * Cc
        cm1 = tl.where(am == i, Cc, cm1)
        sm1 = tl.where(am == i, Sc, sm1)
        cm = tl.where(am == i, Cn, cm)
        sm = tl.where(am == i, Sn, sm)
        Cc = Cn
        Sc = Sn
    q = zero + qmm
    qp = zero
    dq = zero
    dqp = zero
    for s in tl.static_range(LMAX):
        ll = am + (s + 1)
        llf = ll.to(yk.dtype)
        upd = ll <= l
        qn = ((2.0 * llf - 1.0) * z * q - (llf + amf - 1.0) * qp) / (s + 1)
        dqn = ((2.0 * llf - 1.0) * (q + z * dq) - (llf + amf - 1.0) * dqp) / (s + 1)
        qp = tl.where(upd, q, qp)
        dqp = tl.where(upd, dq, dqp)
        q = tl.where(upd, qn, q)
        dq = tl.where(upd, dqn, dq)
    pos = m > 0
    trig = tl.where(pos, cm, tl.where(m < 0, sm, zero + 1.0))
    tx = amf * tl.where(pos, cm1, sm1)
    ty = amf * tl.where(pos, -sm1, cm1)
    kq = yk * q
    return kq * trig, kq * tx, kq * ty, (yk * dq) * trig


@triton.jit
def _pair_block(disp_ptr, sp_ptr, p0, end, rc2, BLOCK_P: tl.constexpr):
    """Geometry of one block of pairs: p, in-run mask, valid mask, species, r, û."""
    p = p0 + tl.arange(0, BLOCK_P)
    inrun = p < end
    dx = tl.load(disp_ptr + p * 3 + 0, mask=inrun, other=0.0)
    dy = tl.load(disp_ptr + p * 3 + 1, mask=inrun, other=0.0)
    dz = tl.load(disp_ptr + p * 3 + 2, mask=inrun, other=0.0)
    sp = tl.load(sp_ptr + p, mask=inrun, other=-1)
    r2 = dx * dx + dy * dy + dz * dz
    valid = inrun & (r2 > 0.0) & (r2 < rc2)
    r = tl.sqrt(tl.where(valid, r2, 1.0))
    ux = tl.where(valid, dx / r, 0.0)
    uy = tl.where(valid, dy / r, 0.0)
    uz = tl.where(valid, dz / r, 0.0)
    return p, inrun, valid, sp, r, ux, uy, uz


@triton.jit
def _column_tables(ftab, itab, cols, NLM_PAD: tl.constexpr, LMAX: tl.constexpr):
    K: tl.constexpr = LMAX + 2
    l = tl.load(itab + cols)[None, :]
    m = tl.load(itab + NLM_PAD + cols)[None, :]
    nlc = tl.load(itab + 2 * NLM_PAD + cols)
    thr = tl.load(ftab + (2 * K) * NLM_PAD + cols)[None, :]
    c0 = tl.load(ftab + (2 * K + 1) * NLM_PAD + cols)[None, :]
    yk = tl.load(ftab + (2 * K + 2) * NLM_PAD + cols)[None, :]
    qmm = tl.load(ftab + (2 * K + 3) * NLM_PAD + cols)[None, :]
    rc2 = tl.load(ftab + (2 * K + 4) * NLM_PAD)
    lf = l.to(c0.dtype)
    return l, m, nlc, lf, thr, c0, yk, qmm, rc2


@triton.jit
def _row(T, rows, a):
    """Row a of a (S_PAD, NLM_PAD) tile as a (NLM_PAD,) vector."""
    return tl.sum(tl.where(rows[:, None] == a, T, 0.0), axis=0)


@triton.jit
def _power_spectrum_store(out_ptr, pid, Aa_t, Ab_t, rows, onehot_nl, nlr,
                          N_SPECIES: tl.constexpr, N_NL: tl.constexpr, SYM: tl.constexpr):
    """out[pid, (a,b), nl] = sum_{c in nl} Aa[a,c] Ab[b,c] (+ Ab[a,c] Aa[b,c] when SYM)."""
    F: tl.constexpr = N_SPECIES * (N_SPECIES + 1) // 2 * N_NL
    for a in tl.static_range(N_SPECIES):
        for b in tl.static_range(a, N_SPECIES):
            q: tl.constexpr = a * N_SPECIES - (a * (a - 1)) // 2 + (b - a)
            prod = _row(Aa_t, rows, a) * _row(Ab_t, rows, b)
            if SYM:
                prod = prod + _row(Ab_t, rows, a) * _row(Aa_t, rows, b)
            xv = tl.sum(prod[:, None] * onehot_nl, axis=0)
            tl.store(out_ptr + pid * F + q * N_NL + nlr, xv, mask=nlr < N_NL)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(disp_ptr, off_ptr, sp_ptr, ftab, itab, X_ptr, A_ptr,
                N_MAX: tl.constexpr, N_SPECIES: tl.constexpr, N_NL: tl.constexpr,
                N_NLM: tl.constexpr, NL_PAD: tl.constexpr, NLM_PAD: tl.constexpr,
                S_PAD: tl.constexpr, N_TERMS: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    DT = disp_ptr.dtype.element_ty
    cols = tl.arange(0, NLM_PAD)
    rows = tl.arange(0, S_PAD)
    nlr = tl.arange(0, NL_PAD)
    l, m, nlc, lf, thr, c0, yk, qmm, rc2 = _column_tables(ftab, itab, cols, NLM_PAD, N_MAX)
    start = tl.load(off_ptr + pid)
    end = tl.load(off_ptr + pid + 1)
    acc = tl.zeros((S_PAD, NLM_PAD), dtype=DT)
    for p0 in range(start, end, BLOCK_P):
        p, inrun, valid, sp, r, ux, uy, uz = _pair_block(disp_ptr, sp_ptr, p0, end, rc2, BLOCK_P)
        g, dg = _radial(r, ftab, cols, l, lf, thr, c0, NLM_PAD, N_MAX, N_TERMS)
        Y, Yx, Yy, Yz = _angular(ux, uy, uz, l, m, yk, qmm, N_MAX)
        h = tl.where(valid[:, None], g * Y, 0.0)
        oh = ((sp[:, None] == rows[None, :]) & valid[:, None]).to(DT)
        acc += tl.sum(oh[:, :, None] * h[:, None, :], axis=0)
    tl.store(A_ptr + (pid * N_SPECIES + rows[:, None]) * N_NLM + cols[None, :], acc,
             mask=(rows[:, None] < N_SPECIES) & (cols[None, :] < N_NLM))
    onehot_nl = (nlc[:, None] == nlr[None, :]).to(DT)
    _power_spectrum_store(X_ptr, pid, acc, acc, rows, onehot_nl, nlr, N_SPECIES, N_NL, False)


@triton.jit
def _vjp_kernel(disp_ptr, off_ptr, sp_ptr, ftab, itab, A_ptr, Xbar_ptr, dbar_ptr,
                N_MAX: tl.constexpr, N_SPECIES: tl.constexpr, N_NL: tl.constexpr,
                N_NLM: tl.constexpr, NL_PAD: tl.constexpr, NLM_PAD: tl.constexpr,
                S_PAD: tl.constexpr, N_TERMS: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    DT = disp_ptr.dtype.element_ty
    F: tl.constexpr = N_SPECIES * (N_SPECIES + 1) // 2 * N_NL
    cols = tl.arange(0, NLM_PAD)
    rows = tl.arange(0, S_PAD)
    cmask = cols < N_NLM
    l, m, nlc, lf, thr, c0, yk, qmm, rc2 = _column_tables(ftab, itab, cols, NLM_PAD, N_MAX)
    A_t = tl.load(A_ptr + (pid * N_SPECIES + rows[:, None]) * N_NLM + cols[None, :],
                  mask=(rows[:, None] < N_SPECIES) & cmask[None, :], other=0.0)
    # Abar^a_c = sum_b w_ab Xbar^{min(a,b) max(a,b)}_{nl(c)} A^b_c, w_aa = 2.
    Abar = tl.zeros((S_PAD, NLM_PAD), dtype=DT)
    for a in tl.static_range(N_SPECIES):
        for b in tl.static_range(N_SPECIES):
            if a <= b:
                q: tl.constexpr = a * N_SPECIES - (a * (a - 1)) // 2 + (b - a)
            else:
                q: tl.constexpr = b * N_SPECIES - (b * (b - 1)) // 2 + (a - b)
            xb = tl.load(Xbar_ptr + pid * F + q * N_NL + nlc, mask=cmask, other=0.0)
            contrib = xb * _row(A_t, rows, b)
            if a == b:
                contrib = 2.0 * contrib
            Abar += tl.where(rows[:, None] == a, contrib[None, :], 0.0)
    start = tl.load(off_ptr + pid)
    end = tl.load(off_ptr + pid + 1)
    for p0 in range(start, end, BLOCK_P):
        p, inrun, valid, sp, r, ux, uy, uz = _pair_block(disp_ptr, sp_ptr, p0, end, rc2, BLOCK_P)
        g, dg = _radial(r, ftab, cols, l, lf, thr, c0, NLM_PAD, N_MAX, N_TERMS)
        Y, Yx, Yy, Yz = _angular(ux, uy, uz, l, m, yk, qmm, N_MAX)
        oh = ((sp[:, None] == rows[None, :]) & valid[:, None]).to(DT)
        Ab = tl.sum(oh[:, :, None] * Abar[None, :, :], axis=1)  # (BLOCK_P, NLM_PAD)
        rinv = 1.0 / r
        radial = tl.sum(Ab * dg * Y, axis=1)
        gA = Ab * g
        vx = tl.sum(gA * Yx, axis=1) * rinv
        vy = tl.sum(gA * Yy, axis=1) * rinv
        vz = tl.sum(gA * Yz, axis=1) * rinv
        # d/dd [g(r) Y(d/r)] = g'(r) Y û + g(r) (1 - û û^T) grad_u Y / r
        uv = ux * vx + uy * vy + uz * vz
        bx = tl.where(valid, radial * ux + vx - ux * uv, 0.0)
        by = tl.where(valid, radial * uy + vy - uy * uv, 0.0)
        bz = tl.where(valid, radial * uz + vz - uz * uv, 0.0)
        tl.store(dbar_ptr + p * 3 + 0, bx, mask=inrun)
        tl.store(dbar_ptr + p * 3 + 1, by, mask=inrun)
        tl.store(dbar_ptr + p * 3 + 2, bz, mask=inrun)


@triton.jit
def _jvp_kernel(disp_ptr, off_ptr, sp_ptr, ftab, itab, A_ptr, ddot_ptr, Xdot_ptr,
                N_MAX: tl.constexpr, N_SPECIES: tl.constexpr, N_NL: tl.constexpr,
                N_NLM: tl.constexpr, NL_PAD: tl.constexpr, NLM_PAD: tl.constexpr,
                S_PAD: tl.constexpr, N_TERMS: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    DT = disp_ptr.dtype.element_ty
    cols = tl.arange(0, NLM_PAD)
    rows = tl.arange(0, S_PAD)
    nlr = tl.arange(0, NL_PAD)
    cmask = cols < N_NLM
    l, m, nlc, lf, thr, c0, yk, qmm, rc2 = _column_tables(ftab, itab, cols, NLM_PAD, N_MAX)
    start = tl.load(off_ptr + pid)
    end = tl.load(off_ptr + pid + 1)
    acc = tl.zeros((S_PAD, NLM_PAD), dtype=DT)
    for p0 in range(start, end, BLOCK_P):
        p, inrun, valid, sp, r, ux, uy, uz = _pair_block(disp_ptr, sp_ptr, p0, end, rc2, BLOCK_P)
        tx = tl.load(ddot_ptr + p * 3 + 0, mask=inrun, other=0.0)
        ty = tl.load(ddot_ptr + p * 3 + 1, mask=inrun, other=0.0)
        tz = tl.load(ddot_ptr + p * 3 + 2, mask=inrun, other=0.0)
        g, dg = _radial(r, ftab, cols, l, lf, thr, c0, NLM_PAD, N_MAX, N_TERMS)
        Y, Yx, Yy, Yz = _angular(ux, uy, uz, l, m, yk, qmm, N_MAX)
        ut = ux * tx + uy * ty + uz * tz  # dr
        rinv = 1.0 / r
        wx = (tx - ux * ut) * rinv        # dû
        wy = (ty - uy * ut) * rinv
        wz = (tz - uz * ut) * rinv
        hd = dg * Y * ut[:, None] + g * (Yx * wx[:, None] + Yy * wy[:, None] + Yz * wz[:, None])
        hd = tl.where(valid[:, None], hd, 0.0)
        oh = ((sp[:, None] == rows[None, :]) & valid[:, None]).to(DT)
        acc += tl.sum(oh[:, :, None] * hd[:, None, :], axis=0)
    A_t = tl.load(A_ptr + (pid * N_SPECIES + rows[:, None]) * N_NLM + cols[None, :],
                  mask=(rows[:, None] < N_SPECIES) & cmask[None, :], other=0.0)
    onehot_nl = (nlc[:, None] == nlr[None, :]).to(DT)
    _power_spectrum_store(Xdot_ptr, pid, acc, A_t, rows, onehot_nl, nlr, N_SPECIES, N_NL, True)


# --------------------------------------------------------------------------- torch launchers


def _torch_tables(tables: DescriptorTables, like):
    import torch

    ftab = torch.tensor(np.array(tables.ftab), dtype=like.dtype).to(like.device)
    itab = torch.tensor(np.array(tables.itab), dtype=torch.int32).to(like.device)
    return ftab, itab


def _torch_check(displacements, offsets, neighbor_species):
    import torch

    if displacements.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"displacements must be float32 or float64, got {displacements.dtype}")
    if displacements.ndim != 2 or displacements.shape[1] != 3:
        raise ValueError(f"displacements must be (P, 3), got {tuple(displacements.shape)}")
    if offsets.dtype != torch.int32 or neighbor_species.dtype != torch.int32:
        raise TypeError("offsets and neighbor_species must be int32")
    return (displacements.contiguous(), offsets.contiguous(), neighbor_species.contiguous())


def descriptors_fwd_torch(displacements, offsets, neighbor_species, tables: DescriptorTables,
                          n_species: int, *, block_p: int = 16, num_warps: int = 4):
    """(X (N, F), A (N, S, n_nlm)) on torch tensors; N = len(offsets) - 1."""
    import torch

    d, off, sp = _torch_check(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _torch_tables(tables, d)
    X = torch.empty((n_atoms, tables.n_features(n_species)), dtype=d.dtype, device=d.device)
    A = torch.empty((n_atoms, n_species, tables.n_nlm), dtype=d.dtype, device=d.device)
    if n_atoms > 0:
        _fwd_kernel[(n_atoms,)](d, off, sp, ftab, itab, X, A, num_warps=num_warps,
                                **tables.constexprs(n_species, block_p))
    return X, A


def descriptors_vjp_torch(displacements, offsets, neighbor_species, A, X_bar,
                          tables: DescriptorTables, n_species: int, *, block_p: int = 16,
                          num_warps: int = 4):
    """d_bar (P, 3) = d sum(X_bar * X) / d displacements; padding rows 0."""
    import torch

    d, off, sp = _torch_check(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _torch_tables(tables, d)
    d_bar = torch.zeros_like(d)
    if n_atoms > 0:
        _vjp_kernel[(n_atoms,)](d, off, sp, ftab, itab, A.to(d.dtype).contiguous(),
                                X_bar.to(d.dtype).contiguous(), d_bar, num_warps=num_warps,
                                **tables.constexprs(n_species, block_p))
    return d_bar


def descriptors_jvp_torch(displacements, offsets, neighbor_species, A, d_dot,
                          tables: DescriptorTables, n_species: int, *, block_p: int = 16,
                          num_warps: int = 4):
    """X_dot (N, F): derivative of X along d_dot (P, 3)."""
    import torch

    d, off, sp = _torch_check(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _torch_tables(tables, d)
    X_dot = torch.empty((n_atoms, tables.n_features(n_species)), dtype=d.dtype, device=d.device)
    if n_atoms > 0:
        _jvp_kernel[(n_atoms,)](d, off, sp, ftab, itab, A.to(d.dtype).contiguous(),
                                d_dot.to(d.dtype).contiguous(), X_dot, num_warps=num_warps,
                                **tables.constexprs(n_species, block_p))
    return X_dot


# --------------------------------------------------------------------------- jax launchers


def _jax_tables(tables: DescriptorTables, dtype):
    import jax.numpy as jnp

    return jnp.asarray(tables.ftab, dtype), jnp.asarray(tables.itab, jnp.int32)


def _jax_common(displacements, offsets, neighbor_species):
    import jax.numpy as jnp

    if displacements.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"displacements must be float32 or float64, got {displacements.dtype}")
    return (displacements, jnp.asarray(offsets, jnp.int32),
            jnp.asarray(neighbor_species, jnp.int32))


def descriptors_fwd_jax(displacements, offsets, neighbor_species, tables: DescriptorTables,
                        n_species: int, *, block_p: int = 16, num_warps: int = 4):
    """(X (N, F), A (N, S, n_nlm)) on jax arrays through jax_triton (GPU; jit-able).

    ``tables`` and ``n_species`` are static; N = offsets.shape[0] - 1.
    """
    import jax
    import jax_triton as jt

    d, off, sp = _jax_common(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _jax_tables(tables, d.dtype)
    out_shape = (jax.ShapeDtypeStruct((n_atoms, tables.n_features(n_species)), d.dtype),
                 jax.ShapeDtypeStruct((n_atoms, n_species, tables.n_nlm), d.dtype))
    if n_atoms == 0:
        return tuple(jax.numpy.zeros(o.shape, o.dtype) for o in out_shape)
    X, A = jt.triton_call(d, off, sp, ftab, itab, kernel=_fwd_kernel, out_shape=out_shape,
                          grid=(n_atoms,), num_warps=num_warps,
                          **tables.constexprs(n_species, block_p))
    return X, A


def descriptors_vjp_jax(displacements, offsets, neighbor_species, A, X_bar,
                        tables: DescriptorTables, n_species: int, *, block_p: int = 16,
                        num_warps: int = 4):
    """d_bar (P, 3) on jax arrays through jax_triton; padding rows 0 (zeroed output)."""
    import jax
    import jax_triton as jt

    d, off, sp = _jax_common(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _jax_tables(tables, d.dtype)
    out_shape = jax.ShapeDtypeStruct(d.shape, d.dtype)
    if n_atoms == 0:
        return jax.numpy.zeros(d.shape, d.dtype)
    return jt.triton_call(d, off, sp, ftab, itab, A.astype(d.dtype), X_bar.astype(d.dtype),
                          kernel=_vjp_kernel, out_shape=out_shape, grid=(n_atoms,),
                          num_warps=num_warps, zeroed_outputs=(0,),
                          **tables.constexprs(n_species, block_p))


def descriptors_jvp_jax(displacements, offsets, neighbor_species, A, d_dot,
                        tables: DescriptorTables, n_species: int, *, block_p: int = 16,
                        num_warps: int = 4):
    """X_dot (N, F) on jax arrays through jax_triton."""
    import jax
    import jax_triton as jt

    d, off, sp = _jax_common(displacements, offsets, neighbor_species)
    n_atoms = off.shape[0] - 1
    ftab, itab = _jax_tables(tables, d.dtype)
    out_shape = jax.ShapeDtypeStruct((n_atoms, tables.n_features(n_species)), d.dtype)
    if n_atoms == 0:
        return jax.numpy.zeros(out_shape.shape, d.dtype)
    return jt.triton_call(d, off, sp, ftab, itab, A.astype(d.dtype), d_dot.astype(d.dtype),
                          kernel=_jvp_kernel, out_shape=out_shape, grid=(n_atoms,),
                          num_warps=num_warps, **tables.constexprs(n_species, block_p))
