"""Tests for neuralil_fast.kernels.ffi (numba kernels as XLA FFI custom calls)."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import numba

from neuralil_fast.kernels import ffi
from neuralil_fast.kernels.ffi import NumbaFFIKernel

# ---------------------------------------------------------------------------
# the toy kernel: prod = a * b, seg[k] = sum_{i: idx[i] == k} a[i] * b[i]
# ---------------------------------------------------------------------------


@numba.njit(parallel=True)
def _toy_impl(a, b, idx, prod, seg):
    n, d = a.shape
    m = seg.shape[0]
    for i in numba.prange(n):
        for j in range(d):
            prod[i, j] = a[i, j] * b[i, j]
    for j in numba.prange(d):
        for k in range(m):  # outputs arrive uninitialised: zero first
            seg[k, j] = 0.0
        for i in range(n):
            k = idx[i]
            if 0 <= k < m:
                seg[k, j] += a[i, j] * b[i, j]


def _toy_kernel(dtype):
    return NumbaFFIKernel(
        "nf_test_toy",
        _toy_impl,
        in_specs=((dtype, 2), (dtype, 2), (np.int32, 1)),
        out_specs=((dtype, 2), (dtype, 2)),
    )


KERNELS = {np.float32: _toy_kernel(np.float32), np.float64: _toy_kernel(np.float64)}
N_SEG = 7


def toy(a, b, idx):
    kern = KERNELS[np.dtype(a.dtype).type]
    n, d = a.shape
    return kern(
        a,
        b,
        idx,
        out_shapes=[jax.ShapeDtypeStruct((n, d), a.dtype), jax.ShapeDtypeStruct((N_SEG, d), a.dtype)],
    )


def toy_ref(a, b, idx):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    p = a * b
    s = np.zeros((N_SEG,) + p.shape[1:])
    np.add.at(s, np.asarray(idx), p)
    return p, s


def _data(dtype, n=50, d=3, batch=None, seed=0):
    rng = np.random.default_rng(seed)
    shp = (n, d) if batch is None else (batch, n, d)
    a = rng.normal(size=shp).astype(dtype)
    b = rng.normal(size=shp).astype(dtype)
    idx = rng.integers(0, N_SEG, size=shp[:-1]).astype(np.int32)
    return a, b, idx


@pytest.fixture(params=["ffi", "callback"])
def mode(request, monkeypatch):
    if request.param == "callback":
        monkeypatch.setenv("NEURALIL_FAST_FFI", "callback")
    else:
        monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    assert ffi.ffi_mode() == request.param
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    if request.param == np.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# ABI check
# ---------------------------------------------------------------------------


def _header_text():
    p = ffi.header_path()
    assert p is not None, "jaxlib ships no c_api.h"
    with open(p) as f:
        return f.read()


def test_abi_ok_on_installed_jaxlib():
    assert ffi.abi_problems() == ()
    assert ffi.abi_ok() is True
    assert ffi.check_header_text(_header_text()) == []


CORRUPTIONS = [
    # (description, pattern, replacement, expected substring of a problem)
    (
        "frame fields swapped",
        r"const XLA_FFI_Api\* api;\s*XLA_FFI_ExecutionContext\* ctx;",
        "XLA_FFI_ExecutionContext* ctx; const XLA_FFI_Api* api;",
        "XLA_FFI_CallFrame.api",
    ),
    (
        "field inserted in call frame",
        r"XLA_FFI_ExecutionStage stage;",
        "XLA_FFI_ExecutionStage stage; int64_t new_field;",
        "XLA_FFI_CallFrame.args",
    ),
    ("rank narrowed", r"int64_t rank;", "int32_t rank;", "XLA_FFI_Buffer.rank"),
    ("buffer dims renamed", r"int64_t\* dims;", "int64_t* shape;", "XLA_FFI_Buffer.dims"),
    ("F32 renumbered", r"XLA_FFI_DataType_F32 = 11", "XLA_FFI_DataType_F32 = 40", "XLA_FFI_DataType_F32"),
    ("S32 renumbered", r"XLA_FFI_DataType_S32 = 4", "XLA_FFI_DataType_S32 = 41", "XLA_FFI_DataType_S32"),
    ("metadata ext type", r"XLA_FFI_Extension_Metadata = 1", "XLA_FFI_Extension_Metadata = 2", "Extension_Metadata"),
    (
        "api version widened",
        r"int major_version;  // out",
        "int64_t major_version;",
        "XLA_FFI_Api_Version",
    ),
    (
        "metadata traits moved",
        r"XLA_FFI_Api_Version api_version;\s*XLA_FFI_Handler_Traits traits;",
        "XLA_FFI_Handler_Traits traits; XLA_FFI_Api_Version api_version;",
        "XLA_FFI_Metadata",
    ),
    (
        "Error_Create moved in api table",
        r"_XLA_FFI_API_STRUCT_FIELD\(XLA_FFI_Error_Create\);",
        "void* reserved; _XLA_FFI_API_STRUCT_FIELD(XLA_FFI_Error_Create);",
        "XLA_FFI_Error_Create",
    ),
    ("major bumped", r"#define XLA_FFI_API_MAJOR 0", "#define XLA_FFI_API_MAJOR 1", "XLA_FFI_API_MAJOR"),
    ("execute stage renumbered", r"XLA_FFI_ExecutionStage_EXECUTE = 3", "XLA_FFI_ExecutionStage_EXECUTE = 4", "EXECUTE"),
    ("buffer struct gone", r"struct XLA_FFI_Buffer \{", "struct XLA_FFI_Buffer_Old {", "XLA_FFI_Buffer"),
    ("empty file", r"(?s).*", "", "XLA_FFI"),
]


@pytest.mark.parametrize("desc,pat,rep,needle", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupted_header_detected(desc, pat, rep, needle):
    text = _header_text()
    bad, n = re.subn(pat, rep, text, count=1)
    assert n == 1, f"corruption pattern for {desc!r} did not match the header"
    problems = ffi.check_header_text(bad)
    assert problems, f"{desc}: not detected"
    assert any(needle in p for p in problems), problems


def test_abi_not_ok_without_header(monkeypatch):
    monkeypatch.setattr(ffi, "header_path", lambda: None)
    ffi.abi_problems.cache_clear()
    try:
        assert not ffi.abi_ok()
        assert ffi.ffi_mode() == "callback"
    finally:
        monkeypatch.undo()
        ffi.abi_problems.cache_clear()
    assert ffi.abi_ok()


def test_parser_agrees_with_compiler_offsetof(tmp_path):
    """Extra check: every field of every parsed struct against ``cc``'s offsetof."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    hdr = ffi.parse_c_header(_header_text())
    lines = []
    for sname, fields in hdr.structs.items():
        if sname.startswith("XLA_FFI_Api") and sname != "XLA_FFI_Api_Version" and sname != "XLA_FFI_Api":
            continue
        for _, fname, _ in fields:
            lines.append(
                f'printf("{sname}.{fname} %zu %zu\\n", offsetof({sname}, {fname}), '
                f"sizeof((({sname}*)0)->{fname}));"
            )
        lines.append(f'printf("{sname} 0 %zu\\n", sizeof({sname}));')
    for e in ffi.EXPECTED_ENUMS:
        lines.append(f'printf("enum {e} %d 0\\n", (int){e});')
    for t in ("XLA_FFI_ArgType", "XLA_FFI_RetType", "XLA_FFI_DataType", "XLA_FFI_ExecutionStage"):
        lines.append(f'printf("{t} 0 %zu\\n", sizeof({t}));')
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"xla/ffi/api/c_api.h\"\nint main(void){\n"
        + "\n".join(lines)
        + "\nreturn 0;}\n"
    )
    exe = tmp_path / "probe"
    r = subprocess.run(
        [cc, "-std=c11", "-I", jax.ffi.include_dir(), str(src), "-o", str(exe)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    got = {}
    for line in out.splitlines():
        k, o, s = line.rsplit(" ", 2)
        got[k] = (int(o), int(s))
    n_checked = 0
    for sname, fields in hdr.structs.items():
        if f"{sname} 0" not in " ".join(got) and sname not in got:
            continue
        lay = hdr.layout(sname)
        for _, fname, _ in fields:
            assert got[f"{sname}.{fname}"] == lay[fname], (sname, fname)
            n_checked += 1
        assert got[sname][1] == lay["__size__"], sname
    assert n_checked > 50
    for key, want in ffi.EXPECTED_LAYOUT.items():
        assert got[key] == want if "." in key else got[key][1] == want[1], key
    for e, v in ffi.EXPECTED_ENUMS.items():
        assert got[f"enum {e}"][0] == v


# ---------------------------------------------------------------------------
# the handler, driven with a hand-made call frame (no XLA involved)
# ---------------------------------------------------------------------------


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", ctypes.c_void_p), ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32), ("state", ctypes.c_int64)]


class _ExtBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _MetadataExt(ctypes.Structure):
    _fields_ = [("base", _ExtBase), ("metadata", ctypes.POINTER(_Metadata))]


class _ErrArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", ctypes.c_void_p), ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrArgs))


class _Api(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("ext", ctypes.c_void_p),
        ("api_version", _ApiVersion),
        ("internal", ctypes.c_void_p),
        ("error_create", _ErrCreate),
    ]


class _Buffer(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("ext", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("dims", ctypes.POINTER(ctypes.c_int64)),
    ]


class _ArgsRets(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("ext", ctypes.c_void_p),
        ("size", ctypes.c_int64),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("ptrs", ctypes.POINTER(ctypes.c_void_p)),
    ]


class _Frame(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("ext", ctypes.c_void_p),
        ("api", ctypes.POINTER(_Api)),
        ("ctx", ctypes.c_void_p),
        ("stage", ctypes.c_int),
        ("args", _ArgsRets),
        ("rets", _ArgsRets),
        ("attrs", ctypes.c_byte * 48),
        ("future", ctypes.c_void_p),
    ]


_SCALE_DT = {np.dtype(np.float64): 12, np.dtype(np.int32): 4, np.dtype(np.float32): 11}


@numba.njit
def _scale_impl(x, s, out):
    for i in range(x.shape[0]):
        out[i] = x[i] * s[0]


def _fake_call(kern, inputs, outputs, stage=3, n_args=None):
    """Call the registered cfunc handler on a frame built with ctypes."""
    kern.ensure_registered()
    cf = ffi._TARGETS[kern.target_name]["cfunc"]
    messages = []

    @_ErrCreate
    def err_create(args):
        messages.append((args.contents.message.decode(), args.contents.errc, args.contents.struct_size))
        return 0xE770

    api = _Api(struct_size=ctypes.sizeof(_Api), error_create=err_create)
    keep = [api, err_create]

    def pack(arrays):
        bufs = (ctypes.c_void_p * len(arrays))()
        types = (ctypes.c_int * len(arrays))(*([1] * len(arrays)))
        for k, x in enumerate(arrays):
            dims = (ctypes.c_int64 * max(x.ndim, 1))(*x.shape)
            b = _Buffer(ctypes.sizeof(_Buffer), None, _SCALE_DT[x.dtype], x.ctypes.data, x.ndim, dims)
            keep.extend([dims, b])
            bufs[k] = ctypes.addressof(b)
        keep.extend([bufs, types])
        return _ArgsRets(40, None, len(arrays) if n_args is None else n_args, types, bufs)

    frame = _Frame(struct_size=ctypes.sizeof(_Frame), api=ctypes.pointer(api), stage=stage)
    frame.args = pack(inputs)
    frame.rets = pack(outputs)
    ret = cf.ctypes(ctypes.addressof(frame))
    return ret, messages


def test_handler_fake_frame_metadata_stage():
    kern = NumbaFFIKernel("nf_test_scale", _scale_impl, ((np.float64, 1), (np.float64, 1)), ((np.float64, 1),))
    kern.ensure_registered()
    cf = ffi._TARGETS[kern.target_name]["cfunc"]
    md = _Metadata(struct_size=36)
    md.api_version.major = md.api_version.minor = 77
    md.traits = 99
    ext = _MetadataExt(_ExtBase(32, 1, None), ctypes.pointer(md))
    frame = _Frame(struct_size=ctypes.sizeof(_Frame), ext=ctypes.addressof(ext), stage=0)
    assert cf.ctypes(ctypes.addressof(frame)) == 0
    assert md.api_version.struct_size == 24
    assert (md.api_version.major, md.api_version.minor) == ffi._api_version()
    assert md.traits == 0


def test_handler_fake_frame_execute_and_errors():
    kern = NumbaFFIKernel("nf_test_scale", _scale_impl, ((np.float64, 1), (np.float64, 1)), ((np.float64, 1),))
    x = np.arange(4.0)
    s = np.array([3.0])
    out = np.full(4, np.nan)
    ret, msgs = _fake_call(kern, [x, s], [out])
    assert ret == 0 and msgs == []
    np.testing.assert_array_equal(out, 3 * x)
    # wrong dtype of an argument: error, output untouched
    out[:] = -1
    ret, msgs = _fake_call(kern, [x.astype(np.float32), s], [out])
    assert ret == 0xE770 and "argument 0 is not a float64[rank 1]" in msgs[0][0]
    assert msgs[0][1] == 3 and msgs[0][2] == 28
    assert np.all(out == -1)
    # wrong rank of a result
    ret, msgs = _fake_call(kern, [x, s], [out.reshape(2, 2)])
    assert ret == 0xE770 and "result 0 is not" in msgs[0][0]
    # wrong number of arguments
    ret, msgs = _fake_call(kern, [x, s], [out], n_args=5)
    assert ret == 0xE770 and "expected 2 arguments" in msgs[0][0]
    # wrong stage
    ret, msgs = _fake_call(kern, [x, s], [out], stage=1)
    assert ret == 0xE770 and "stage" in msgs[0][0]
    assert np.all(out == -1)


# ---------------------------------------------------------------------------
# numerics through jit / vmap / scan, both paths, both precisions
# ---------------------------------------------------------------------------


def test_toy_jit(mode, dtype):
    a, b, idx = _data(dtype)
    p, s = jax.jit(toy)(a, b, idx)
    assert p.dtype == dtype and s.dtype == dtype
    pr, sr = toy_ref(a, b, idx)
    np.testing.assert_allclose(p, pr, **_tol(dtype))
    np.testing.assert_allclose(s, sr, **_tol(dtype))


def test_toy_eager(mode, dtype):
    a, b, idx = _data(dtype, n=9, d=2, seed=3)
    p, s = toy(a, b, idx)
    pr, sr = toy_ref(a, b, idx)
    np.testing.assert_allclose(p, pr, **_tol(dtype))
    np.testing.assert_allclose(s, sr, **_tol(dtype))


def test_toy_empty_input(mode):
    a, b, idx = _data(np.float32, n=0, d=3)
    p, s = jax.jit(toy)(a, b, idx)
    assert p.shape == (0, 3)
    np.testing.assert_array_equal(s, np.zeros((N_SEG, 3)))


def test_toy_vmap(mode, dtype):
    a, b, idx = _data(dtype, batch=4, seed=1)
    p, s = jax.jit(jax.vmap(toy))(a, b, idx)
    assert p.shape == a.shape and s.shape == (4, N_SEG, a.shape[-1])
    for k in range(4):
        pr, sr = toy_ref(a[k], b[k], idx[k])
        np.testing.assert_allclose(p[k], pr, **_tol(dtype))
        np.testing.assert_allclose(s[k], sr, **_tol(dtype))
    # vmap over one argument only (others broadcast)
    p2, s2 = jax.jit(jax.vmap(toy, in_axes=(0, None, None)))(a, b[0], idx[0])
    for k in range(4):
        pr, sr = toy_ref(a[k], b[0], idx[0])
        np.testing.assert_allclose(s2[k], sr, **_tol(dtype))


def test_toy_scan(mode, dtype):
    a, b, idx = _data(dtype, batch=5, seed=2)

    def step(carry, xs):
        ak, bk, ik = xs
        p, s = toy(ak + carry[: ak.shape[0]], bk, ik)
        return carry + p[:, :1].sum() * 0 + s.sum().astype(carry.dtype) * 0, s

    carry0 = jnp.zeros((a.shape[1], a.shape[2]), a.dtype)
    _, ss = jax.jit(lambda a, b, i: jax.lax.scan(step, carry0, (a, b, i)))(a, b, idx)
    for k in range(5):
        np.testing.assert_allclose(ss[k], toy_ref(a[k], b[k], idx[k])[1], **_tol(dtype))

    # a scan whose carry goes through the kernel
    def step2(c, _):
        p, s = toy(c, c, idx[0])
        return p * 0.5, s[0, 0]

    c0 = jnp.asarray(a[0] * 0.9)
    cT, hist = jax.jit(lambda c: jax.lax.scan(step2, c, None, length=3))(c0)
    c = np.asarray(c0, np.float64)
    for k in range(3):
        pr, sr = toy_ref(c, c, idx[0])
        np.testing.assert_allclose(hist[k], sr[0, 0], **_tol(dtype))
        c = pr * 0.5
    np.testing.assert_allclose(cT, c, **_tol(dtype))


def test_ffi_and_callback_agree(monkeypatch):
    a, b, idx = _data(np.float32, n=200, d=4, seed=5)
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    out_ffi = jax.jit(toy)(a, b, idx)
    monkeypatch.setenv("NEURALIL_FAST_FFI", "callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out_cb = jax.jit(toy)(a, b, idx)
    for x, y in zip(out_ffi, out_cb):
        np.testing.assert_array_equal(x, y)


def test_pure_callback_64_keeps_float64_on_another_thread():
    """The callback fallback's transport: float64 (and int64) arrays reach the host and
    come back bit for bit when the compiled computation runs on a thread where the
    scoped x64 of its tracing does not apply (as XLA's threads; a plain pure_callback
    fails there: its float64 result is canonicalised to float32)."""
    import threading

    seen = []

    def host(x, i, s):
        seen.append((x.dtype, i.dtype, s.dtype))
        return x + 1e-12, i * 3, np.float64(s) * 2

    def one(x):
        i = jnp.arange(3, dtype=jnp.int64)
        return ffi.pure_callback_64(
            host, [jax.ShapeDtypeStruct((3,), jnp.float64), jax.ShapeDtypeStruct((3,), jnp.int64),
                   jax.ShapeDtypeStruct((), jnp.float64)], x, i, x[0])

    with jax.enable_x64(True):
        xs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float64)
        compiled = jax.jit(lambda xs: jax.lax.map(one, xs)).lower(xs).compile()
    res = []
    worker = threading.Thread(target=lambda: res.append(compiled(xs)))
    worker.start()
    worker.join()
    y, i, s = res[0]
    assert y.dtype == jnp.float64 and i.dtype == jnp.int64 and s.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xs) + 1e-12)
    np.testing.assert_array_equal(np.asarray(i), np.tile(np.arange(3) * 3, (4, 1)))
    np.testing.assert_array_equal(np.asarray(s), 2 * np.asarray(xs)[:, 0])
    assert seen and all(t == (np.float64, np.int64, np.float64) for t in seen)


def test_f32_and_f64_variants_coexist():
    assert KERNELS[np.float32].target_name != KERNELS[np.float64].target_name
    assert KERNELS[np.float32].target_name.startswith("nf_test_toy__")
    a, b, idx = _data(np.float32, seed=7)
    with jax.enable_x64(True):
        p64, _ = jax.jit(toy)(a.astype(np.float64), b.astype(np.float64), idx)
        assert p64.dtype == np.float64
    p32, _ = jax.jit(toy)(a, b, idx)
    assert p32.dtype == np.float32
    np.testing.assert_allclose(p32, p64, rtol=1e-6)


def test_callback_fallback_warns_once(monkeypatch):
    monkeypatch.setenv("NEURALIL_FAST_FFI", "callback")
    kern32 = NumbaFFIKernel("nf_test_warn", _scale_impl, ((np.float32, 1), (np.float32, 1)), ((np.float32, 1),))
    x = jnp.arange(3.0, dtype=jnp.float32)
    shp = [jax.ShapeDtypeStruct((3,), jnp.float32)]
    with pytest.warns(RuntimeWarning, match="NEURALIL_FAST_FFI=callback"):
        (y,) = kern32(x, jnp.array([2.0], jnp.float32), out_shapes=shp)
    np.testing.assert_array_equal(y, [0.0, 2.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kern32(x, jnp.array([2.0], jnp.float32), out_shapes=shp)  # no second warning


def test_x64_hint_in_error():
    kern = KERNELS[np.float64]
    a, b, idx = _data(np.float64)
    with pytest.raises(TypeError, match="jax_enable_x64 is off"):
        kern(a, b, idx, out_shapes=[jax.ShapeDtypeStruct(a.shape, np.float64), jax.ShapeDtypeStruct((N_SEG, 3), np.float64)])


def test_fallback_when_abi_mismatch(monkeypatch):
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    monkeypatch.setattr(ffi, "abi_problems", lambda: ("XLA_FFI_Buffer.rank: simulated mismatch",))
    assert ffi.ffi_mode() == "callback"
    kern = NumbaFFIKernel("nf_test_abi_fallback", _scale_impl, ((np.float64, 1), (np.float64, 1)), ((np.float64, 1),))
    with jax.enable_x64(True):
        x = jnp.arange(3.0)
        with pytest.warns(RuntimeWarning, match="simulated mismatch"):
            (y,) = jax.jit(lambda x: kern(x, jnp.array([2.0]), out_shapes=[jax.ShapeDtypeStruct((3,), x.dtype)]))(x)
    np.testing.assert_array_equal(y, [0.0, 2.0, 4.0])
    assert kern.target_name not in ffi._TARGETS  # never registered


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def test_wrong_dtype_or_rank_raises(mode):
    kern = KERNELS[np.float32]
    a, b, idx = _data(np.float32)
    good = [jax.ShapeDtypeStruct(a.shape, jnp.float32), jax.ShapeDtypeStruct((N_SEG, 3), jnp.float32)]
    with pytest.raises(TypeError, match=r"input 2 must be int32 of rank 1, got float32"):
        kern(a, b, idx.astype(np.float32), out_shapes=good)
    with pytest.raises(TypeError, match=r"input 0 must be float32 of rank 2"):
        kern(a[0], b, idx, out_shapes=good)
    with pytest.raises(TypeError, match=r"input 1 must be float32 of rank 2, got int32"):
        jax.jit(lambda a, b, i: kern(a, b.astype(jnp.int32), i, out_shapes=good))(a, b, idx)
    with pytest.raises(TypeError, match=r"out_shapes\[1\] must be float32 of rank 2"):
        kern(a, b, idx, out_shapes=[good[0], jax.ShapeDtypeStruct((N_SEG,), jnp.float32)])
    with pytest.raises(TypeError, match=r"expected 3 input arrays"):
        kern(a, b, out_shapes=good)
    with pytest.raises(TypeError, match=r"expected 2 out_shapes"):
        kern(a, b, idx, out_shapes=good[:1])


def test_handler_rejects_bad_buffers_through_xla():
    """Bypass the Python checks: the handler itself returns an XLA error."""
    kern = KERNELS[np.float32]
    kern.ensure_registered()
    a, b, idx = _data(np.float32)
    good = [jax.ShapeDtypeStruct(a.shape, jnp.float32), jax.ShapeDtypeStruct((N_SEG, 3), jnp.float32)]
    call = jax.ffi.ffi_call(kern.target_name, good, vmap_method="sequential")
    with pytest.raises(Exception, match=r"argument 2 is not a int32\[rank 1\] buffer"):
        np.asarray(call(a, b, idx.astype(np.float32)))
    with pytest.raises(Exception, match=r"argument 0 is not a float32\[rank 2\] buffer"):
        np.asarray(call(a.reshape(-1), b, idx))
    with pytest.raises(Exception, match=r"expected 3 arguments"):
        np.asarray(call(a, b))
    call1 = jax.ffi.ffi_call(kern.target_name, good[:1], vmap_method="sequential")
    with pytest.raises(Exception, match=r"expected 2 results"):
        np.asarray(call1(a, b, idx))


@numba.njit
def _raising_impl(x, out):
    for i in range(x.shape[0]):
        if x[i] < 0:
            raise ValueError("negative input")
        out[i] = np.sqrt(x[i])


def test_impl_exception_becomes_error(mode):
    kern = NumbaFFIKernel("nf_test_raise", _raising_impl, ((np.float32, 1),), ((np.float32, 1),))
    shp = [jax.ShapeDtypeStruct((3,), jnp.float32)]
    f = jax.jit(lambda x: kern(x, out_shapes=shp))
    (y,) = f(jnp.array([1.0, 4.0, 9.0]))
    np.testing.assert_allclose(y, [1, 2, 3])
    with pytest.raises(Exception, match="raised|negative input"):
        np.asarray(f(jnp.array([1.0, -4.0, 9.0]))[0])


def test_same_target_other_impl_refused():
    kern = NumbaFFIKernel("nf_test_scale", _raising_impl, ((np.float64, 1), (np.float64, 1)), ((np.float64, 1),))
    NumbaFFIKernel("nf_test_scale", _scale_impl, ((np.float64, 1), (np.float64, 1)), ((np.float64, 1),)).ensure_registered()
    with pytest.raises(ValueError, match="already registered"):
        kern.ensure_registered()


def test_bad_specs():
    with pytest.raises(TypeError, match="unsupported dtype"):
        NumbaFFIKernel("nf_x", _scale_impl, ((np.complex64, 1),), ((np.float32, 1),))
    with pytest.raises(ValueError, match="C identifier"):
        NumbaFFIKernel("nf-x", _scale_impl, ((np.float32, 1),), ((np.float32, 1),))
    with pytest.raises(TypeError, match="numba.njit"):
        NumbaFFIKernel("nf_x", lambda x, o: None, ((np.float32, 1),), ((np.float32, 1),))


# ---------------------------------------------------------------------------
# rank-0 and boolean buffers
# ---------------------------------------------------------------------------


@numba.njit
def _masked_impl(s, mask, x, out, cnt):
    c = 0
    for i in range(x.shape[0]):
        if mask[i]:
            out[i] = x[i] * s[()]
            c += 1
        else:
            out[i] = 0.0
    cnt[()] = c


def test_rank0_and_bool(mode):
    kern = NumbaFFIKernel(
        "nf_test_masked", _masked_impl, ((np.float32, 0), (np.bool_, 1), (np.float32, 1)), ((np.float32, 1), (np.int32, 0))
    )
    x = jnp.arange(5.0, dtype=jnp.float32)
    mask = jnp.array([1, 0, 1, 1, 0], bool)
    shp = [jax.ShapeDtypeStruct((5,), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)]
    y, c = jax.jit(lambda s, m, x: kern(s, m, x, out_shapes=shp))(jnp.float32(2.0), mask, x)
    np.testing.assert_array_equal(y, [0, 0, 4, 6, 0])
    assert c.shape == () and int(c) == 3


# ---------------------------------------------------------------------------
# import has no side effects
# ---------------------------------------------------------------------------


def test_import_has_no_side_effects():
    code = textwrap.dedent(
        """
        import jax
        from neuralil_fast.kernels import ffi
        assert not jax.config.jax_enable_x64
        assert ffi._TARGETS == {}
        assert ffi._nb.cache_info().currsize == 0      # no numba code built
        assert ffi.abi_problems.cache_info().currsize == 0  # header not even read
        print("ok")
        """
    )
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


# ---------------------------------------------------------------------------
# threads: numba's prange pool inside an XLA custom call
# ---------------------------------------------------------------------------


@numba.njit(parallel=True)
def _tid_impl(x, out, tids):
    for i in numba.prange(x.shape[0]):
        out[i] = 2.0 * x[i]
        tids[i] = numba.get_thread_id()


def test_prange_inside_ffi_uses_numba_pool(monkeypatch):
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    kern = NumbaFFIKernel("nf_test_tids", _tid_impl, ((np.float32, 1),), ((np.float32, 1), (np.int32, 1)))
    n = 20_000
    x = jnp.arange(n, dtype=jnp.float32)
    shp = [jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32)]
    out, tids = jax.jit(lambda x: kern(x, out_shapes=shp))(x)
    np.testing.assert_array_equal(out, 2.0 * np.arange(n))
    used = np.unique(np.asarray(tids))
    assert used.min() >= 0 and used.max() < numba.get_num_threads()
    assert len(used) == numba.get_num_threads(), used  # static schedule: every thread gets a chunk


_CONC = np.zeros(1, np.int64)  # shared counter read/written by _conc_impl through its address
_CONC_ADDR = _CONC.ctypes.data


def _make_conc_impl():
    nb = ffi._nb()
    ld64, st64 = nb["ld64"], nb["st64"]

    @numba.njit
    def impl(x, out, seen):
        st64(_CONC_ADDR, ld64(_CONC_ADDR) + 1)
        m = 0
        for i in range(x.shape[0]):
            s = 0.0
            for k in range(50):
                s += np.sin(x[i] + k * 1e-3)
            out[i] = s
            c = ld64(_CONC_ADDR)
            m = max(m, c)
        st64(_CONC_ADDR, ld64(_CONC_ADDR) - 1)
        seen[0] = m

    return impl


def test_independent_calls_in_one_program(monkeypatch, capsys):
    """Correct results; prints whether XLA overlapped the independent calls."""
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    kern = NumbaFFIKernel("nf_test_conc", _make_conc_impl(), ((np.float32, 1),), ((np.float32, 1), (np.int64, 1)))
    n = 50_000
    xs = [jnp.asarray(np.random.default_rng(k).normal(size=n).astype(np.float32)) for k in range(4)]
    shp = [jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int64)]
    with jax.enable_x64(True):
        res = jax.jit(lambda *xs: [kern(x, out_shapes=shp) for x in xs])(*xs)
        res = [(np.asarray(o), int(s[0])) for o, s in res]
    for x, (o, _) in zip(xs, res):
        ref = np.sin(np.asarray(x, np.float64)[:, None] + np.arange(50) * 1e-3).sum(1)
        np.testing.assert_allclose(o, ref, rtol=1e-4, atol=1e-4)
    with capsys.disabled():
        print(f"\n[ffi threads] 4 independent custom calls, max overlapping seen: {max(s for _, s in res)}")


# ---------------------------------------------------------------------------
# overhead (printed, not asserted): run with ``pytest -s``
# ---------------------------------------------------------------------------


@numba.njit
def _tiny_impl(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] + 1.0


def _time(f, *args, reps=200):
    jax.block_until_ready(f(*args))
    best = np.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            r = f(*args)
        jax.block_until_ready(r)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def test_report_overhead(monkeypatch, capsys):
    kern = NumbaFFIKernel("nf_test_tiny", _tiny_impl, ((np.float32, 1),), ((np.float32, 1),))
    x = jnp.zeros(8, jnp.float32)
    shp = [jax.ShapeDtypeStruct((8,), jnp.float32)]
    n_scan = 1000

    def make(mode):
        if mode == "callback":
            monkeypatch.setenv("NEURALIL_FAST_FFI", "callback")
        else:
            monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            one = jax.jit(lambda x: kern(x, out_shapes=shp)[0])
            jax.block_until_ready(one(x))

            def body(c, _):
                return kern(c, out_shapes=shp)[0], None

            scan = jax.jit(lambda x: jax.lax.scan(body, x, None, length=n_scan)[0])
            jax.block_until_ready(scan(x))
        return one, scan

    base_one = jax.jit(lambda x: x + 1.0)
    base_scan = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c + 1.0, None), x, None, length=n_scan)[0])
    res = {"plain jnp": (_time(base_one, x), _time(base_scan, x, reps=10) / n_scan)}
    for mode in ("ffi", "callback"):
        one, scan = make(mode)
        res[mode] = (_time(one, x), _time(scan, x, reps=10 if mode == "ffi" else 2) / n_scan)
    np.testing.assert_allclose(make("ffi")[1](x), n_scan)
    with capsys.disabled():
        print("\n[ffi overhead] 8-element kernel, best of 5")
        for k, (t1, ts) in res.items():
            print(f"  {k:10s} jit call (dispatch incl.): {t1 * 1e6:8.1f} us   per step inside lax.scan: {ts * 1e6:8.2f} us")


@numba.njit
def _bad_impl(x, out):
    out[0] = x.no_such_attribute


def test_impl_typing_error_is_raised(monkeypatch):
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)
    kern = NumbaFFIKernel("nf_test_bad", _bad_impl, ((np.float32, 1),), ((np.float32, 1),))
    with pytest.raises(TypeError, match="impl does not compile"):
        kern(jnp.zeros(3), out_shapes=[jax.ShapeDtypeStruct((3,), jnp.float32)])


def test_handler_build_failure_falls_back(monkeypatch):
    monkeypatch.delenv("NEURALIL_FAST_FFI", raising=False)

    def boom(*a, **k):
        raise RuntimeError("simulated registration failure")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", boom)
    kern = NumbaFFIKernel("nf_test_regfail", _tiny_impl, ((np.float32, 1),), ((np.float32, 1),))
    f = jax.jit(lambda x: kern(x, out_shapes=[jax.ShapeDtypeStruct((3,), jnp.float32)])[0])
    with pytest.warns(RuntimeWarning, match="simulated registration failure"):
        y = f(jnp.zeros(3))
    np.testing.assert_array_equal(y, [1.0, 1.0, 1.0])
    assert kern.target_name in ffi._FAILED


# ---------------------------------------------------------------------------
# compiled handlers kept between processes
# ---------------------------------------------------------------------------

_CACHED_RUN = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
import nf_cache_kernel
from neuralil_fast.kernels.ffi import NumbaFFIKernel, _TARGETS
k = NumbaFFIKernel("nf_test_cached", nf_cache_kernel.scale, ((np.float32, 1),),
                   ((np.float32, 1),))
x = jnp.arange(5.0, dtype=jnp.float32)
(out,) = jax.jit(lambda x: k(x, out_shapes=[jax.ShapeDtypeStruct(x.shape, x.dtype)]))(x)
print(json.dumps({"out": np.asarray(out).tolist(),
                  "hits": _TARGETS[k.target_name]["cfunc"].cache_hits}))
"""


def test_handler_cache_between_processes(tmp_path):
    """A handler compiled once is loaded by the next process (numba's cache of the
    generated handler file); a changed kernel source is a new handler, never the stale
    one; NEURALIL_FAST_CACHE=0 or an unusable folder compiles in the process, as before."""
    src = tmp_path / "src"
    src.mkdir()

    def kernel(factor):
        (src / "nf_cache_kernel.py").write_text(textwrap.dedent(f"""
            import numba

            @numba.njit(cache=True, parallel=True)
            def scale(x, out):
                for i in numba.prange(x.shape[0]):
                    out[i] = {factor} * x[i]
            """))

    def run(cache):
        env = dict(os.environ, NEURALIL_FAST_CACHE=str(cache), NEURALIL_FAST_FFI="")
        r = subprocess.run([sys.executable, "-c", _CACHED_RUN, str(src)], capture_output=True,
                           text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert "pure_callback" not in r.stderr, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        return got["out"], got["hits"]

    cache = tmp_path / "cache"
    kernel(2.0)
    assert run(cache) == ([0.0, 2.0, 4.0, 6.0, 8.0], 0)
    assert run(cache) == ([0.0, 2.0, 4.0, 6.0, 8.0], 1)          # loaded, not compiled
    assert len(list((cache / "ffi").glob("*.py"))) == 1
    kernel(-3.25)                                               # impl changed: new handler
    assert run(cache) == ([0.0, -3.25, -6.5, -9.75, -13.0], 0)
    assert run(cache) == ([0.0, -3.25, -6.5, -9.75, -13.0], 1)
    assert len(list((cache / "ffi").glob("*.py"))) == 2           # both recent: kept
    # a new version prunes the same target's handlers older than STALE_HANDLER_DAYS
    # (and numba's files of them), not another target's
    other = cache / "ffi" / f"nf_test_other_{'0' * 24}.py"
    other.write_text("# another target")
    aged = time.time() - (ffi.STALE_HANDLER_DAYS + 1) * 86400
    for f in (cache / "ffi").rglob("*"):
        os.utime(f, (aged, aged))
    kernel(5.0)
    assert run(cache) == ([0.0, 5.0, 10.0, 15.0, 20.0], 0)
    handlers = sorted(p.name for p in (cache / "ffi").glob("*.py"))
    assert len(handlers) == 2 and other.name in handlers
    (new,) = set(handlers) - {other.name}
    numba_files = list((cache / "ffi" / "__pycache__").iterdir())
    assert numba_files and all(f.name.startswith(new[:-3] + ".") for f in numba_files)
    assert run(cache) == ([0.0, 5.0, 10.0, 15.0, 20.0], 1)
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    for off in ("0", blocked):
        assert run(off) == ([0.0, 5.0, 10.0, 15.0, 20.0], 0)
    assert blocked.read_text() == "not a folder"
