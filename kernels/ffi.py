"""Run numba kernels as XLA FFI custom calls inside ``jax.jit`` (CPU).

Usage
-----
::

    @numba.njit(parallel=True)
    def impl(a, idx, out):            # inputs first, then outputs
        for i in numba.prange(a.shape[0]):
            out[i] = 2.0 * a[i]

    kern = NumbaFFIKernel("nf_double", impl,
                          in_specs=((np.float64, 1), (np.int32, 1)),
                          out_specs=((np.float64, 1),))
    (out,) = kern(a, idx, out_shapes=[jax.ShapeDtypeStruct(a.shape, a.dtype)])

A spec is ``(dtype, rank)``.  One :class:`NumbaFFIKernel` is one signature;
several dtype variants of a kernel (float32 / float64) are several objects
with the same ``name``: each registers its own XLA target whose name is
``name`` suffixed with the signature (see :attr:`NumbaFFIKernel.target_name`).
Nothing happens at import: the numba handler is compiled and registered with
XLA lazily, on the first call of each kernel (at trace time).  Under
``jax.vmap`` the call is repeated per batch element (``vmap_method=
"sequential"``); there is no differentiation rule (wrap calls in
``jax.custom_vjp``).

Contract for ``impl``
---------------------
``impl(*inputs, *outputs)`` is a ``numba.njit`` function (``parallel=True``
allowed) that reads C-contiguous input arrays and **must write every element
of every output**: XLA hands the FFI handler freshly allocated, *uninitialised*
result buffers (they are not zeroed), and the callback fallback hands it
``np.empty`` arrays for the same reason.  An accumulating kernel must zero its
outputs first.  Inputs must not be written (XLA may share those buffers).
``impl`` is not bounds-checked: it must keep its own indices in range.
Exceptions raised inside ``impl`` are turned into an XLA error (the call
fails with a ``RuntimeError``/``XlaRuntimeError``, nothing is returned).

How the FFI path works and what it assumes
------------------------------------------
The handler is a numba ``@cfunc`` with the C signature
``XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`` (typed FFI, ``api_version=1``),
taking and returning the pointers as ``intptr``.  It reads the call frame by
hand at fixed byte offsets (LP64, little endian; every pointer, ``size_t`` and
``int64_t`` is 8 bytes, enums are 4 bytes):

* ``XLA_FFI_CallFrame``: struct_size @0, extension_start @8, api @16,
  ctx @24, stage @32 (int32 enum, EXECUTE = 3), ``XLA_FFI_Args`` @40
  (struct_size, extension_start, size @+16, types @+24, args @+32),
  ``XLA_FFI_Rets`` @80 (same layout, rets @+32), attrs @120.
* ``XLA_FFI_Buffer``: struct_size @0, extension_start @8, dtype @16 (int32
  enum: PRED 1, S8 2, S16 3, S32 4, S64 5, U8 6, U16 7, U32 8, U64 9, F32 11,
  F64 12), data @24, rank @32, dims @40 (``int64_t*``).
  ``XLA_FFI_ArgType``/``XLA_FFI_RetType`` arrays are int32 enums (BUFFER = 1).
* Before executing, XLA calls the handler with a ``XLA_FFI_Metadata_Extension``
  (``XLA_FFI_Extension_Base`` {struct_size @0, type @8 (Metadata = 1),
  next @16}, metadata @24) in ``extension_start``; the handler fills
  ``XLA_FFI_Metadata`` (struct_size @0, api_version
  {struct_size @8, extension_start @16, major @24, minor @28}, traits @32)
  with the header's ``XLA_FFI_API_MAJOR``/``MINOR`` and returns.
* Errors are made with ``api->XLA_FFI_Error_Create`` (function pointer @48 in
  ``XLA_FFI_Api``), taking ``XLA_FFI_Error_Create_Args`` {struct_size @0,
  extension_start @8, message @16, errc @24 (int32)}.  The handler checks the
  execution stage, the numbers of arguments/results and every buffer's type,
  dtype and rank before touching data, and returns INVALID_ARGUMENT otherwise.

Because these offsets are read by hand, :func:`abi_ok` parses the struct and
enum definitions of the installed ``jax.ffi.include_dir()/xla/ffi/api/c_api.h``
(pure Python: no compiler needed) and compares every offset/size/enum value
used here.  Typed-FFI targets are registered only when it agrees.

Why there is a fallback
-----------------------
When the header is missing or its layout differs from the offsets above
(a future jaxlib, a 32-bit or big-endian platform), reading the frame by hand
would corrupt memory.  The same call then goes through
``jax.pure_callback(..., vmap_method="sequential")``, which runs ``impl`` on
numpy arrays: same results, but a Python round trip per call (measured here:
~130-170 us per call against ~0.1 us inside a ``lax.scan`` and ~5 us for a
whole small jitted call through the FFI), with a one-time warning.
``NEURALIL_FAST_FFI=callback`` forces the fallback (for testing); it is read
at trace time, so already-traced functions keep their path.

Compiled handlers kept between processes
----------------------------------------
Building a handler compiles ``impl`` into it (6-14 s for each descriptor kernel).
When numba caches ``impl`` itself (``cache=True``, no closure), the handler's source
is written to ``cache_dir()/ffi`` under a name that hashes the source, ``impl``'s
folder, this file and the numba, llvmlite, jax and Python versions, and compiled with
``cfunc(cache=True)``: later processes load it instead (17 s -> 0.9 s for the first
descriptor call).  Its error messages are constant strings of the compiled module
(``cstr``), so the source is the same in every process.  Writing a new handler
removes the same target's handlers of other versions written more than
``STALE_HANDLER_DAYS`` ago, with numba's files of them (about 1 MB each): an
upgrade does not leave its predecessors' handlers behind for good, and another
install sharing the folder at worst compiles its handler once more.

Threads: numba ``prange`` inside XLA
------------------------------------
The handler runs on whichever thread XLA executes the custom call on; a
``parallel=True`` ``impl`` then fans out on numba's own thread pool (numba's
omp/tbb/workqueue layer), separate from XLA's intra-op Eigen pool.  Checked
here (jaxlib 0.10.2, numba 0.68, 2 cores, "omp" and "workqueue" layers):

* inside the FFI call a prange loop uses all numba threads (thread ids 0..N-1
  seen, as when called directly); results are exact;
* XLA:CPU ran the custom calls of a program on the Python thread that called
  the jitted function, one after another: four independent calls in one
  program never overlapped (a shared counter never exceeded 1), also with
  100k-element buffers.  So the two pools do not run at the same time: while
  numba's pool works, the XLA thread is blocked in the call.  Keep
  ``NUMBA_NUM_THREADS`` = number of cores.
* Not checked (only 2 busy cores here): whether a larger machine's XLA runs
  independent thunks concurrently.  If it (or user code calling jitted
  functions from several Python threads) ever launched two prange kernels at
  once, numba's ``workqueue`` layer is not thread-safe: prefer ``omp`` or
  ``tbb`` (``NUMBA_THREADING_LAYER``).  GNU OpenMP threads also spin for a
  while after a parallel region (``OMP_WAIT_POLICY=passive`` stops that) and
  could slow XLA ops that follow immediately; not measured.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
import sys
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "abi_ok",
    "abi_problems",
    "header_path",
    "parse_c_header",
    "check_header_text",
    "ffi_mode",
    "NumbaFFIKernel",
    "EXPECTED_LAYOUT",
    "EXPECTED_ENUMS",
]

# ---------------------------------------------------------------------------
# What the handler assumes: (offset, size) in bytes of struct fields, and enum
# values.  The handler's constants below are derived from these tables only.
# ---------------------------------------------------------------------------

EXPECTED_LAYOUT: dict[str, tuple[int, int]] = {
    "XLA_FFI_Extension_Base.struct_size": (0, 8),
    "XLA_FFI_Extension_Base.type": (8, 4),
    "XLA_FFI_Extension_Base.next": (16, 8),
    "XLA_FFI_Extension_Base": (0, 24),
    "XLA_FFI_Api_Version.struct_size": (0, 8),
    "XLA_FFI_Api_Version.extension_start": (8, 8),
    "XLA_FFI_Api_Version.major_version": (16, 4),
    "XLA_FFI_Api_Version.minor_version": (20, 4),
    "XLA_FFI_Api_Version": (0, 24),
    "XLA_FFI_Metadata.struct_size": (0, 8),
    "XLA_FFI_Metadata.api_version": (8, 24),
    "XLA_FFI_Metadata.traits": (32, 4),
    "XLA_FFI_Metadata_Extension.extension_base": (0, 24),
    "XLA_FFI_Metadata_Extension.metadata": (24, 8),
    "XLA_FFI_Error_Create_Args.struct_size": (0, 8),
    "XLA_FFI_Error_Create_Args.extension_start": (8, 8),
    "XLA_FFI_Error_Create_Args.message": (16, 8),
    "XLA_FFI_Error_Create_Args.errc": (24, 4),
    "XLA_FFI_Api.struct_size": (0, 8),
    "XLA_FFI_Api.XLA_FFI_Error_Create": (48, 8),
    "XLA_FFI_Buffer.struct_size": (0, 8),
    "XLA_FFI_Buffer.extension_start": (8, 8),
    "XLA_FFI_Buffer.dtype": (16, 4),
    "XLA_FFI_Buffer.data": (24, 8),
    "XLA_FFI_Buffer.rank": (32, 8),
    "XLA_FFI_Buffer.dims": (40, 8),
    "XLA_FFI_Args.struct_size": (0, 8),
    "XLA_FFI_Args.extension_start": (8, 8),
    "XLA_FFI_Args.size": (16, 8),
    "XLA_FFI_Args.types": (24, 8),
    "XLA_FFI_Args.args": (32, 8),
    "XLA_FFI_Args": (0, 40),
    "XLA_FFI_Rets.struct_size": (0, 8),
    "XLA_FFI_Rets.extension_start": (8, 8),
    "XLA_FFI_Rets.size": (16, 8),
    "XLA_FFI_Rets.types": (24, 8),
    "XLA_FFI_Rets.rets": (32, 8),
    "XLA_FFI_Rets": (0, 40),
    "XLA_FFI_CallFrame.struct_size": (0, 8),
    "XLA_FFI_CallFrame.extension_start": (8, 8),
    "XLA_FFI_CallFrame.api": (16, 8),
    "XLA_FFI_CallFrame.ctx": (24, 8),
    "XLA_FFI_CallFrame.stage": (32, 4),
    "XLA_FFI_CallFrame.args": (40, 40),
    "XLA_FFI_CallFrame.rets": (80, 40),
    # sizeof of the enum types the handler reads from arrays/fields
    "XLA_FFI_ArgType": (0, 4),
    "XLA_FFI_RetType": (0, 4),
    "XLA_FFI_DataType": (0, 4),
    "XLA_FFI_ExecutionStage": (0, 4),
}

# XLA_FFI_STRUCT_SIZE(...) values the handler checks / writes
EXPECTED_STRUCT_SIZES = {
    "XLA_FFI_Metadata_Extension": 32,  # offsetof(metadata) + 8
    "XLA_FFI_Metadata": 36,  # offsetof(traits) + 4
    "XLA_FFI_Api_Version": 24,  # offsetof(minor_version) + 4
    "XLA_FFI_Error_Create_Args": 28,  # offsetof(errc) + 4
}

EXPECTED_ENUMS: dict[str, int] = {
    "XLA_FFI_Extension_Metadata": 1,
    "XLA_FFI_ExecutionStage_EXECUTE": 3,
    "XLA_FFI_ArgType_BUFFER": 1,
    "XLA_FFI_RetType_BUFFER": 1,
    "XLA_FFI_Error_Code_INVALID_ARGUMENT": 3,
    "XLA_FFI_Error_Code_INTERNAL": 13,
    "XLA_FFI_DataType_PRED": 1,
    "XLA_FFI_DataType_S8": 2,
    "XLA_FFI_DataType_S16": 3,
    "XLA_FFI_DataType_S32": 4,
    "XLA_FFI_DataType_S64": 5,
    "XLA_FFI_DataType_U8": 6,
    "XLA_FFI_DataType_U16": 7,
    "XLA_FFI_DataType_U32": 8,
    "XLA_FFI_DataType_U64": 9,
    "XLA_FFI_DataType_F32": 11,
    "XLA_FFI_DataType_F64": 12,
}

# numpy dtype -> XLA_FFI_DataType enum member
_DTYPE_ENUM_NAME = {
    np.dtype(np.bool_): "XLA_FFI_DataType_PRED",
    np.dtype(np.int8): "XLA_FFI_DataType_S8",
    np.dtype(np.int16): "XLA_FFI_DataType_S16",
    np.dtype(np.int32): "XLA_FFI_DataType_S32",
    np.dtype(np.int64): "XLA_FFI_DataType_S64",
    np.dtype(np.uint8): "XLA_FFI_DataType_U8",
    np.dtype(np.uint16): "XLA_FFI_DataType_U16",
    np.dtype(np.uint32): "XLA_FFI_DataType_U32",
    np.dtype(np.uint64): "XLA_FFI_DataType_U64",
    np.dtype(np.float32): "XLA_FFI_DataType_F32",
    np.dtype(np.float64): "XLA_FFI_DataType_F64",
}
_DTYPE_SHORT = {
    np.dtype(np.bool_): "b1",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
    np.dtype(np.uint8): "u8",
    np.dtype(np.uint16): "u16",
    np.dtype(np.uint32): "u32",
    np.dtype(np.uint64): "u64",
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
}


def _off(key: str) -> int:
    return EXPECTED_LAYOUT[key][0]


# Byte offsets used by the handler (derived from the tables above).
_FRAME_EXT = _off("XLA_FFI_CallFrame.extension_start")
_FRAME_API = _off("XLA_FFI_CallFrame.api")
_FRAME_STAGE = _off("XLA_FFI_CallFrame.stage")
_FRAME_NARGS = _off("XLA_FFI_CallFrame.args") + _off("XLA_FFI_Args.size")
_FRAME_ATYPES = _off("XLA_FFI_CallFrame.args") + _off("XLA_FFI_Args.types")
_FRAME_APTRS = _off("XLA_FFI_CallFrame.args") + _off("XLA_FFI_Args.args")
_FRAME_NRETS = _off("XLA_FFI_CallFrame.rets") + _off("XLA_FFI_Rets.size")
_FRAME_RTYPES = _off("XLA_FFI_CallFrame.rets") + _off("XLA_FFI_Rets.types")
_FRAME_RPTRS = _off("XLA_FFI_CallFrame.rets") + _off("XLA_FFI_Rets.rets")
_BUF_DTYPE = _off("XLA_FFI_Buffer.dtype")
_BUF_DATA = _off("XLA_FFI_Buffer.data")
_BUF_RANK = _off("XLA_FFI_Buffer.rank")
_BUF_DIMS = _off("XLA_FFI_Buffer.dims")
_EXT_SIZE = _off("XLA_FFI_Extension_Base.struct_size")
_EXT_TYPE = _off("XLA_FFI_Extension_Base.type")
_MDEXT_MD = _off("XLA_FFI_Metadata_Extension.metadata")
_MD_SIZE = _off("XLA_FFI_Metadata.struct_size")
_MD_VER = _off("XLA_FFI_Metadata.api_version")
_MD_TRAITS = _off("XLA_FFI_Metadata.traits")
_VER_SIZE = _off("XLA_FFI_Api_Version.struct_size")
_VER_EXT = _off("XLA_FFI_Api_Version.extension_start")
_VER_MAJOR = _off("XLA_FFI_Api_Version.major_version")
_VER_MINOR = _off("XLA_FFI_Api_Version.minor_version")
_API_ERROR_CREATE = _off("XLA_FFI_Api.XLA_FFI_Error_Create")

# ---------------------------------------------------------------------------
# A small C header parser: struct layouts (LP64 rules) and enum values.
# ---------------------------------------------------------------------------

_PTR = (8, 8)
_SCALARS = {
    "size_t": (8, 8),
    "int64_t": (8, 8),
    "uint64_t": (8, 8),
    "intptr_t": (8, 8),
    "uintptr_t": (8, 8),
    "int": (4, 4),
    "int32_t": (4, 4),
    "uint32_t": (4, 4),
    "unsigned": (4, 4),
    "int16_t": (2, 2),
    "uint16_t": (2, 2),
    "char": (1, 1),
    "int8_t": (1, 1),
    "uint8_t": (1, 1),
    "bool": (1, 1),
    "float": (4, 4),
    "double": (8, 8),
}
_QUALIFIERS = {"const", "struct", "volatile", "enum"}


@dataclass
class ParsedHeader:
    """Result of :func:`parse_c_header`."""

    structs: dict[str, list[tuple[str, str, bool]]]  # name -> [(type, field, is_ptr)]
    enums: dict[str, int]  # member -> value
    enum_types: set[str]
    typedefs: dict[str, str]  # alias -> scalar type
    macros: dict[str, str]

    def sizeof(self, typename: str, _depth: int = 0) -> tuple[int, int]:
        """(size, alignment) of a type name, following LP64 C rules."""
        if _depth > 32:
            raise ValueError(f"type recursion at {typename}")
        if typename in _SCALARS:
            return _SCALARS[typename]
        if typename in self.enum_types:
            return (4, 4)
        if typename in self.typedefs:
            return self.sizeof(self.typedefs[typename], _depth + 1)
        if typename in self.structs:
            lay = self.layout(typename, _depth + 1)
            return lay["__size__"], lay["__align__"]
        raise KeyError(f"unknown type {typename!r}")

    def layout(self, name: str, _depth: int = 0) -> dict[str, Any]:
        """{field: (offset, size)} plus ``__size__``/``__align__``/``__order__``."""
        off, align = 0, 1
        out: dict[str, Any] = {"__order__": []}
        for ftype, fname, is_ptr in self.structs[name]:
            sz, al = _PTR if is_ptr else self.sizeof(ftype, _depth)
            off = (off + al - 1) // al * al
            out[fname] = (off, sz)
            out["__order__"].append(fname)
            off += sz
            align = max(align, al)
        out["__size__"] = (off + align - 1) // align * align
        out["__align__"] = align
        return out

    def struct_size_macro(self, name: str, last_field: str) -> int:
        """XLA_FFI_STRUCT_SIZE(name, last_field) = offsetof + sizeof."""
        o, s = self.layout(name)[last_field]
        return o + s


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_c_header(text: str) -> ParsedHeader:
    """Parse the struct/enum/typedef definitions of ``c_api.h`` text.

    Understands just the C subset XLA's ``c_api.h`` uses: plain structs
    (fields ``type name;``, ``type* name;``, ``ret (*name)(...);``), the
    ``_XLA_FFI_API_STRUCT_FIELD(fn)`` macro, ``typedef enum {...} Name;``,
    ``enum Name {...};`` and scalar ``typedef``s.
    """
    macros = dict(re.findall(r"^[ \t]*#define[ \t]+(\w+)[ \t]+([^\n]*)$", text, flags=re.M))
    body = _strip_comments(text)
    body = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", "", body, flags=re.M)  # drop preprocessor
    body = re.sub(r"_XLA_FFI_API_STRUCT_FIELD\(\s*(\w+)\s*\)", r"\1* \1", body)

    enums: dict[str, int] = {}
    enum_types: set[str] = set()
    for m in re.finditer(
        r"(typedef\s+)?enum\s*(\w*)\s*\{(.*?)\}\s*(\w*)\s*;", body, flags=re.S
    ):
        tag, members, alias = m.group(2), m.group(3), m.group(4)
        for t in (tag, alias):
            if t:
                enum_types.add(t)
        nxt = 0
        for item in members.split(","):
            item = item.strip()
            if not item:
                continue
            if "=" in item:
                k, v = (s.strip() for s in item.split("=", 1))
                v = v.replace("u", "").replace("U", "")
                mm = re.fullmatch(r"(\d+)\s*<<\s*(\d+)", v)
                val = (int(mm.group(1)) << int(mm.group(2))) if mm else int(v, 0)
            else:
                k, val = item, nxt
            enums[k] = val
            nxt = val + 1

    structs: dict[str, list[tuple[str, str, bool]]] = {}
    for m in re.finditer(r"struct\s+(\w+)\s*\{(.*?)\}\s*(\w*)\s*;", body, flags=re.S):
        name, fields_txt, alias = m.group(1), m.group(2), m.group(3)
        fields: list[tuple[str, str, bool]] = []
        for decl in fields_txt.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            fp = re.search(r"\(\s*\*\s*(\w+)\s*\)\s*\(", decl)
            if fp:  # function pointer
                fields.append(("void", fp.group(1), True))
                continue
            is_ptr = "*" in decl
            toks = [t for t in re.findall(r"\w+", decl) if t not in _QUALIFIERS]
            if len(toks) < 2 or "[" in decl:
                raise ValueError(f"cannot parse field {decl!r} in struct {name}")
            fields.append((" ".join(toks[:-1]), toks[-1], is_ptr))
        structs[name] = fields
        if alias and alias != name:
            structs[alias] = fields

    typedefs: dict[str, str] = {}
    for m in re.finditer(r"typedef\s+([\w ]+?)\s+(\w+)\s*;", body):
        src, alias = m.group(1).split(), m.group(2)
        src = [t for t in src if t not in _QUALIFIERS]
        if len(src) == 1 and src[0] != alias:
            typedefs[alias] = src[0]
    return ParsedHeader(structs, enums, enum_types, typedefs, macros)


def check_header_text(text: str) -> list[str]:
    """Differences between ``text`` (a ``c_api.h``) and what the handler assumes.

    Returns a list of human-readable problems; empty means compatible.
    """
    problems: list[str] = []
    try:
        hdr = parse_c_header(text)
    except Exception as e:  # malformed header
        return [f"cannot parse header: {e}"]
    for key, (want_off, want_size) in EXPECTED_LAYOUT.items():
        try:
            if "." in key:
                sname, field = key.split(".", 1)
                lay = hdr.layout(sname)
                if field not in lay:
                    problems.append(f"{key}: field missing")
                    continue
                got = lay[field]
            else:
                got = (0, hdr.sizeof(key)[0])
        except Exception as e:
            problems.append(f"{key}: {e}")
            continue
        if got != (want_off, want_size):
            problems.append(f"{key}: header says (offset, size) = {got}, handler assumes {(want_off, want_size)}")
    lasts = {
        "XLA_FFI_Metadata_Extension": "metadata",
        "XLA_FFI_Metadata": "traits",
        "XLA_FFI_Api_Version": "minor_version",
        "XLA_FFI_Error_Create_Args": "errc",
    }
    for sname, want in EXPECTED_STRUCT_SIZES.items():
        try:
            got = hdr.struct_size_macro(sname, lasts[sname])
        except Exception as e:
            problems.append(f"{sname}_STRUCT_SIZE: {e}")
            continue
        if got != want:
            problems.append(f"{sname}_STRUCT_SIZE: header gives {got}, handler assumes {want}")
    # the first fields of the call frame's Args/Rets must be struct types
    for key, tname in (("XLA_FFI_CallFrame.args", "XLA_FFI_Args"), ("XLA_FFI_CallFrame.rets", "XLA_FFI_Rets")):
        fields = {f: t for t, f, _ in hdr.structs.get("XLA_FFI_CallFrame", [])}
        if fields.get(key.split(".")[1]) != tname:
            problems.append(f"{key}: expected type {tname}")
    for name, want in EXPECTED_ENUMS.items():
        got = hdr.enums.get(name)
        if got != want:
            problems.append(f"enum {name}: header says {got}, handler assumes {want}")
    major = hdr.macros.get("XLA_FFI_API_MAJOR", "").strip()
    minor = hdr.macros.get("XLA_FFI_API_MINOR", "").strip()
    if major != "0":
        problems.append(f"XLA_FFI_API_MAJOR is {major!r}, handler written for 0")
    if not minor.isdigit():
        problems.append(f"XLA_FFI_API_MINOR is {minor!r}, not a number")
    return problems


def header_path() -> str | None:
    """Path of the installed ``xla/ffi/api/c_api.h`` (None if jax has none)."""
    try:
        import jax.ffi

        p = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    except Exception:
        return None
    return p if os.path.isfile(p) else None


def _platform_problems() -> list[str]:
    out = []
    if struct.calcsize("P") != 8:
        out.append("not a 64-bit platform")
    if sys.byteorder != "little":
        out.append("not a little-endian platform")
    return out


@lru_cache(maxsize=1)
def abi_problems() -> tuple[str, ...]:
    """Why the hand-written frame reader cannot be used (empty: it can)."""
    probs = _platform_problems()
    p = header_path()
    if p is None:
        return tuple(probs + ["jaxlib ships no xla/ffi/api/c_api.h"])
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return tuple(probs + [f"cannot read {p}: {e}"])
    return tuple(probs + check_header_text(text))


def abi_ok() -> bool:
    """True when the installed XLA FFI header matches the offsets used here (cached)."""
    return not abi_problems()


@lru_cache(maxsize=1)
def _api_version() -> tuple[int, int]:
    p = header_path()
    with open(p, encoding="utf-8") as f:
        hdr = parse_c_header(f.read())
    return int(hdr.macros["XLA_FFI_API_MAJOR"]), int(hdr.macros["XLA_FFI_API_MINOR"])


def ffi_mode() -> str:
    """``"ffi"`` or ``"callback"``: the path a call traced now would take."""
    if os.environ.get("NEURALIL_FAST_FFI", "").strip().lower() == "callback":
        return "callback"
    return "ffi" if abi_ok() else "callback"


# ---------------------------------------------------------------------------
# numba pieces (imported lazily: importing this module compiles nothing)
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _nb():
    """Build the numba intrinsics once; returns a namespace dict."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    i64 = ir.IntType(64)

    def _load(bits: int):
        """The intrinsic ``ld<bits>(addr) -> int64``: a bits-wide integer at addr, sign-extended."""
        ty = ir.IntType(bits)

        def ld(typingctx, addr):
            if not isinstance(addr, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                a = context.cast(builder, args[0], sig.args[0], types.intp)
                v = builder.load(builder.inttoptr(a, ty.as_pointer()))
                return v if bits == 64 else builder.sext(v, i64)

            return types.int64(addr), codegen

        ld.__name__ = ld.__qualname__ = f"ld{bits}"
        return intrinsic(ld)

    def _store(bits: int):
        """The intrinsic ``st<bits>(addr, val)``: store val as a bits-wide integer at addr."""
        ty = ir.IntType(bits)
        nbty = types.int64 if bits == 64 else types.int32

        def st(typingctx, addr, val):
            if not isinstance(addr, types.Integer) or not isinstance(val, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                a = context.cast(builder, args[0], sig.args[0], types.intp)
                v = context.cast(builder, args[1], sig.args[1], nbty)
                builder.store(v, builder.inttoptr(a, ty.as_pointer()))
                return context.get_dummy_value()

            return types.none(addr, val), codegen

        st.__name__ = st.__qualname__ = f"st{bits}"
        return intrinsic(st)

    ld64, ld32 = _load(64), _load(32)
    st64, st32 = _store(64), _store(32)

    @intrinsic
    def make_error(typingctx, api, msg, errc):
        """api->XLA_FFI_Error_Create(&{28, NULL, msg, errc}) as an integer."""
        if not all(isinstance(t, types.Integer) for t in (api, msg, errc)):
            return None

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.intp)
            m = context.cast(builder, args[1], sig.args[1], types.intp)
            e = context.cast(builder, args[2], sig.args[2], types.int32)
            sty = ir.LiteralStructType([i64, i8p, i8p, i32])
            slot = cgutils.alloca_once(builder, sty)
            builder.store(ir.Constant(sty, None), slot)
            zero = ir.Constant(i32, 0)
            builder.store(
                ir.Constant(i64, EXPECTED_STRUCT_SIZES["XLA_FFI_Error_Create_Args"]),
                builder.gep(slot, [zero, ir.Constant(i32, 0)]),
            )
            builder.store(builder.inttoptr(m, i8p), builder.gep(slot, [zero, ir.Constant(i32, 2)]))
            builder.store(e, builder.gep(slot, [zero, ir.Constant(i32, 3)]))
            fnty = ir.FunctionType(i8p, [sty.as_pointer()])
            fslot = builder.inttoptr(builder.add(a, ir.Constant(i64, _API_ERROR_CREATE)), i64.as_pointer())
            fn = builder.inttoptr(builder.load(fslot), fnty.as_pointer())
            res = builder.call(fn, [slot])
            return builder.ptrtoint(res, i64)

        return types.int64(api, msg, errc), codegen

    @intrinsic
    def cstr(typingctx, text):
        """The address of ``text`` (a string literal) as a constant C string of the
        compiled module: it lives as long as the code, and a cached handler keeps it."""
        if not isinstance(text, types.StringLiteral):
            return None
        value = text.literal_value

        def codegen(context, builder, sig, args):
            return builder.ptrtoint(context.insert_const_string(builder.module, value), i64)

        return types.intp(text), codegen

    ptr_casts = {}

    def ptr_cast(dt: np.dtype):
        dt = np.dtype(dt)
        if dt not in ptr_casts:
            nbty = numba.from_dtype(dt)

            @intrinsic
            def as_ptr(typingctx, addr):
                if not isinstance(addr, types.Integer):
                    return None
                rt = types.CPointer(nbty)

                def codegen(context, builder, sig, args):
                    a = context.cast(builder, args[0], sig.args[0], types.intp)
                    return builder.inttoptr(a, context.get_value_type(rt))

                return rt(addr), codegen

            ptr_casts[dt] = as_ptr
        return ptr_casts[dt]

    return dict(
        numba=numba,
        types=types,
        ld64=ld64,
        ld32=ld32,
        st64=st64,
        st32=st32,
        make_error=make_error,
        cstr=cstr,
        ptr_cast=ptr_cast,
    )


def _cstr(msg: str) -> str:
    """Source of the handler's constant C string ``msg``."""
    return f"cstr({msg!r})"


def _build_handler(target: str, impl: Callable, in_specs, out_specs):
    """Generate and compile the numba cfunc reading the XLA FFI call frame."""
    nb = _nb()
    numba = nb["numba"]
    types = nb["types"]
    E = EXPECTED_ENUMS
    major, minor = _api_version()
    n_in, n_out = len(in_specs), len(out_specs)

    g: dict[str, Any] = {
        "ld64": nb["ld64"],
        "ld32": nb["ld32"],
        "st64": nb["st64"],
        "st32": nb["st32"],
        "make_error": nb["make_error"],
        "cstr": nb["cstr"],
        "carray": numba.carray,
        "impl": impl,
    }

    def desc(dt, r):
        return f"{np.dtype(dt).name}[rank {r}]"

    msg_stage = _cstr(f"{target}: called at an execution stage other than EXECUTE")
    msg_nargs = _cstr(f"{target}: expected {n_in} arguments")
    msg_nrets = _cstr(f"{target}: expected {n_out} results")
    msg_impl = _cstr(f"{target}: the numba kernel raised an exception")
    msg_meta = _cstr(f"{target}: XLA_FFI_Metadata struct smaller than expected")

    L = ["def handler(frame):"]
    a = L.append
    a(f"    api = ld64(frame + {_FRAME_API})")
    a(f"    ext = ld64(frame + {_FRAME_EXT})")
    a("    if ext != 0:")
    a(f"        if ld32(ext + {_EXT_TYPE}) == {E['XLA_FFI_Extension_Metadata']}:")
    a(f"            md = ld64(ext + {_MDEXT_MD})")
    a(
        f"            if ld64(ext + {_EXT_SIZE}) < {EXPECTED_STRUCT_SIZES['XLA_FFI_Metadata_Extension']}"
        f" or md == 0 or ld64(md + {_MD_SIZE}) < {EXPECTED_STRUCT_SIZES['XLA_FFI_Metadata']}:"
    )
    a(f"                return make_error(api, {msg_meta}, {E['XLA_FFI_Error_Code_INVALID_ARGUMENT']}) if api != 0 else 0")
    a(f"            st64(md + {_MD_VER + _VER_SIZE}, {EXPECTED_STRUCT_SIZES['XLA_FFI_Api_Version']})")
    a(f"            st64(md + {_MD_VER + _VER_EXT}, 0)")
    a(f"            st32(md + {_MD_VER + _VER_MAJOR}, {major})")
    a(f"            st32(md + {_MD_VER + _VER_MINOR}, {minor})")
    a(f"            st32(md + {_MD_TRAITS}, 0)")
    a("            return 0")
    a("    if api == 0:")
    a("        return 0")
    err = "make_error(api, {}, %d)" % E["XLA_FFI_Error_Code_INVALID_ARGUMENT"]
    a(f"    if ld32(frame + {_FRAME_STAGE}) != {E['XLA_FFI_ExecutionStage_EXECUTE']}:")
    a(f"        return {err.format(msg_stage)}")
    a(f"    if ld64(frame + {_FRAME_NARGS}) != {n_in}:")
    a(f"        return {err.format(msg_nargs)}")
    a(f"    if ld64(frame + {_FRAME_NRETS}) != {n_out}:")
    a(f"        return {err.format(msg_nrets)}")
    a(f"    atypes = ld64(frame + {_FRAME_ATYPES})")
    a(f"    aptrs = ld64(frame + {_FRAME_APTRS})")
    a(f"    rtypes = ld64(frame + {_FRAME_RTYPES})")
    a(f"    rptrs = ld64(frame + {_FRAME_RPTRS})")
    names = []
    for kind, specs, tys, ptrs, btype in (
        ("in", in_specs, "atypes", "aptrs", E["XLA_FFI_ArgType_BUFFER"]),
        ("out", out_specs, "rtypes", "rptrs", E["XLA_FFI_RetType_BUFFER"]),
    ):
        for k, (dt, rank) in enumerate(specs):
            dt = np.dtype(dt)
            what = "argument" if kind == "in" else "result"
            m = _cstr(f"{target}: {what} {k} is not a {desc(dt, rank)} buffer")
            enum = E[_DTYPE_ENUM_NAME[dt]]
            b = f"b_{kind}{k}"
            a(f"    {b} = ld64({ptrs} + {8 * k})")
            a(
                f"    if {b} == 0 or ld32({tys} + {4 * k}) != {btype} or "
                f"ld32({b} + {_BUF_DTYPE}) != {enum} or ld64({b} + {_BUF_RANK}) != {rank}:"
            )
            a(f"        return {err.format(m)}")
            cast = f"cast_{dt.name}"
            g[cast] = nb["ptr_cast"](dt)
            a(f"    d_{kind}{k} = ld64({b} + {_BUF_DIMS})")
            shape = "".join(f"ld64(d_{kind}{k} + {8 * j}), " for j in range(rank))
            a(f"    x_{kind}{k} = carray({cast}(ld64({b} + {_BUF_DATA})), ({shape}))")
            names.append(f"x_{kind}{k}")
    a("    try:")
    a(f"        impl({', '.join(names)})")
    a("    except Exception:")
    a(f"        return make_error(api, {msg_impl}, {E['XLA_FFI_Error_Code_INTERNAL']})")
    a("    return 0")
    src = "\n".join(L) + "\n"
    path = _handler_file(target, impl, src)
    if path is None:
        ns: dict[str, Any] = {}
        exec(compile(src, f"<ffi handler {target}>", "exec"), g, ns)
        handler = ns["handler"]
    else:
        handler = _load_handler(path, g)
        # a cached handler links to numba's parallel runtime (a parallel impl's
        # scheduler symbols), which numba registers only when its threads start
        numba.get_num_threads()
    cf = numba.cfunc(types.intp(types.intp), nopython=True, cache=path is not None)(handler)
    return cf, src


def cache_dir() -> Path | None:
    """Where compiled FFI handlers are kept between processes, or None (not kept).

    ``NEURALIL_FAST_CACHE`` (a folder; ``0``, ``off`` or empty: no cache), else
    ``$XDG_CACHE_HOME/neuralil_fast`` or ``~/.cache/neuralil_fast``."""
    env = os.environ.get("NEURALIL_FAST_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "neuralil_fast"


# same-target handlers of other versions older than this are removed (days)
STALE_HANDLER_DAYS = 14


def _prune_stale_handlers(path: Path, target: str) -> None:
    """Remove ``target``'s handler files other than ``path`` written more than
    STALE_HANDLER_DAYS ago, and numba's index and data files of them."""
    import time

    cutoff = time.time() - STALE_HANDLER_DAYS * 86400
    stem = re.compile(re.escape(target) + r"_[0-9a-f]{24}")
    for old in path.parent.glob(f"{target}_*.py"):
        if old == path or not stem.fullmatch(old.stem):
            continue
        try:
            if old.stat().st_mtime >= cutoff:
                continue
            old.unlink()
        except OSError:  # another process pruned it first, or a read-only folder
            continue
        # numba loads nothing of a removed index or data file: a miss, not an error
        for f in (path.parent / "__pycache__").glob(f"{old.stem}.*"):
            try:
                f.unlink()
            except OSError:  # each on its own: none left behind for another's failure
                pass


def _handler_file(target: str, impl, src: str) -> Path | None:
    """The handler's source as a file named by a hash of everything its machine code
    depends on, for numba to cache (None: not cacheable, or no writable cache folder).

    numba's cache checks only the cached function's own file, not the functions it
    calls, so the name hashes the handler's source, ``impl``'s folder (its module and
    the modules beside it, which it may call), this file, and the numba, llvmlite, jax
    and Python versions: any change there is a new file, never a stale handler.  Only an
    ``impl`` that numba itself caches (``cache=True``, no closure) qualifies."""
    import inspect

    import llvmlite
    import numba
    from numba.core.caching import NullCache

    root = cache_dir()
    py_func = getattr(impl, "py_func", None)
    if (root is None or py_func is None or py_func.__closure__ is not None
            or isinstance(getattr(impl, "_cache", None), NullCache | None)):
        return None
    try:
        source = Path(inspect.getsourcefile(py_func)).resolve()
    except (TypeError, OSError):
        return None
    import jax

    h = hashlib.sha256()
    h.update(src.encode())
    h.update(f"{numba.__version__} {llvmlite.__version__} {jax.__version__} {sys.version}"
             .encode())
    for f in sorted(source.parent.glob("*.py")) + [Path(__file__).resolve()]:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    path = root / "ffi" / f"{target}_{h.hexdigest()[:24]}.py"
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(f"# XLA FFI handler of {target}, generated by {__name__}\n{src}")
        try:  # no overwrite: a rewritten file's new mtime would void numba's cache index
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except OSError:
        return None
    _prune_stale_handlers(path, target)
    return path


def _load_handler(path: Path, g: dict) -> Callable:
    """``handler`` of the file at ``path``, run with the globals ``g`` (the intrinsics)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_nf_ffi_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    module.__dict__.update(g)
    # numba's cache names the handler's module: it must be importable (in sys.modules)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.handler


# ---------------------------------------------------------------------------
# The public wrapper
# ---------------------------------------------------------------------------

_LOCK = threading.RLock()
_TARGETS: dict[str, dict[str, Any]] = {}  # target name -> {"impl", "cfunc", ...}
_WARNED: set[str] = set()
_FAILED: dict[str, str] = {}  # target name -> why the FFI path could not be built


def _norm_specs(specs, what: str) -> tuple[tuple[np.dtype, int], ...]:
    out = []
    for s in specs:
        try:
            dt, rank = s
        except (TypeError, ValueError):
            raise TypeError(f"{what}: each spec must be (dtype, rank), got {s!r}") from None
        dt = np.dtype(dt)
        if dt not in _DTYPE_ENUM_NAME:
            raise TypeError(f"{what}: unsupported dtype {dt}; supported: {sorted(d.name for d in _DTYPE_ENUM_NAME)}")
        if int(rank) != rank or rank < 0:
            raise ValueError(f"{what}: rank must be a non-negative int, got {rank!r}")
        out.append((dt, int(rank)))
    return tuple(out)


def _sig_suffix(in_specs, out_specs) -> str:
    f = lambda specs: "_".join(f"{_DTYPE_SHORT[d]}r{r}" for d, r in specs) or "none"
    return f"{f(in_specs)}__{f(out_specs)}"


def _wide(dtype) -> bool:
    return np.dtype(dtype).itemsize == 8


def pure_callback_64(host: Callable, out_shapes, *args, vmap_method: str | None = None):
    """``jax.pure_callback(host, out_shapes, *args)`` that keeps 64-bit dtypes exact.

    JAX canonicalises a callback's arguments and results with the x64 setting of the
    thread that runs it, and a scoped ``jax.enable_x64`` does not reach the XLA threads
    a jitted callback may run on: float64 would arrive as float32 (or the float64 result
    be rejected).  64-bit arrays therefore cross as uint32 pairs (a bitcast, no copy of
    values) and ``host`` sees and returns the real dtypes.  ``out_shapes``: a sequence.
    """
    import jax

    in_dtypes = tuple(np.dtype(a.dtype) for a in args)
    out_shapes = [jax.ShapeDtypeStruct(tuple(s.shape), s.dtype) for s in out_shapes]

    def wired(*values):
        ins = [np.asarray(v).view(dt).reshape(np.shape(v)[:-1]) if _wide(dt) else np.asarray(v)
               for v, dt in zip(values, in_dtypes)]
        outs = host(*ins)
        return tuple(np.ascontiguousarray(o).reshape(-1).view(np.uint32).reshape(np.shape(o) + (2,))
                     if _wide(s.dtype) else o for o, s in zip(outs, out_shapes))

    wire_shapes = [jax.ShapeDtypeStruct(s.shape + (2,), np.uint32) if _wide(s.dtype) else s
                   for s in out_shapes]
    outs = jax.pure_callback(wired, wire_shapes,
                             *[jax.lax.bitcast_convert_type(a, np.uint32) if _wide(a.dtype) else a
                               for a in args], vmap_method=vmap_method)
    return [jax.lax.bitcast_convert_type(o, s.dtype) if _wide(s.dtype) else o
            for o, s in zip(outs, out_shapes)]


class NumbaFFIKernel:
    """A numba kernel callable on jax arrays (inside ``jit``/``vmap``/``scan``).

    Parameters
    ----------
    name:
        Base name; the XLA target is ``f"{name}__{signature}"``.  Must be a C
        identifier.  Distinct kernels must use distinct names.
    impl:
        ``numba.njit`` function called as ``impl(*inputs, *outputs)``; it must
        write every element of every output (outputs are not zeroed).
    in_specs, out_specs:
        Sequences of ``(dtype, rank)``.
    """

    def __init__(self, name: str, impl: Callable, in_specs: Sequence, out_specs: Sequence):
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"kernel name must be a C identifier, got {name!r}")
        if not hasattr(impl, "py_func"):
            raise TypeError("impl must be a numba.njit function (a numba Dispatcher)")
        self.name = name
        self.impl = impl
        self.in_specs = _norm_specs(in_specs, f"{name} in_specs")
        self.out_specs = _norm_specs(out_specs, f"{name} out_specs")
        if not self.out_specs:
            raise ValueError(f"{name}: at least one output is required")
        self.target_name = f"{name}__{_sig_suffix(self.in_specs, self.out_specs)}"

    def __repr__(self) -> str:
        return f"NumbaFFIKernel({self.target_name!r})"

    # -- checks --------------------------------------------------------------
    def _check(self, args, out_shapes):
        import jax

        def hint(dt):
            if dt.itemsize == 8 and not jax.config.jax_enable_x64:
                return " (jax_enable_x64 is off, so jax turns 64-bit arrays into 32-bit ones)"
            return ""

        def check(items, specs, what, item):
            if len(items) != len(specs):
                raise TypeError(f"{self.name}: expected {len(specs)} {what}, got {len(items)}")
            for k, (x, (dt, rank)) in enumerate(zip(items, specs)):
                xdt, xnd = np.dtype(x.dtype), len(x.shape)
                if xdt != dt or xnd != rank:
                    raise TypeError(
                        f"{self.name}: {item.format(k)} must be {dt.name} of rank {rank}, "
                        f"got {xdt.name} of shape {tuple(x.shape)}{hint(dt)}"
                    )

        check(args, self.in_specs, "input arrays", "input {}")
        check(out_shapes, self.out_specs, "out_shapes", "out_shapes[{}]")

    # -- registration ------------------------------------------------------------
    def ensure_registered(self) -> None:
        """Compile the handler and register the XLA target (idempotent)."""
        import jax

        with _LOCK:
            ent = _TARGETS.get(self.target_name)
            if ent is not None:
                if ent["impl"] is not self.impl:
                    raise ValueError(
                        f"XLA target {self.target_name!r} is already registered with another "
                        "impl; give this kernel a different name"
                    )
                return
            cf, src = _build_handler(self.target_name, self.impl, self.in_specs, self.out_specs)
            jax.ffi.register_ffi_target(self.target_name, jax.ffi.pycapsule(cf.ctypes), platform="cpu")
            _TARGETS[self.target_name] = {"impl": self.impl, "cfunc": cf, "source": src}

    def compile(self) -> None:
        """Compile ``impl`` for the specs and, in FFI mode, build and register the handler,
        without running anything (both land in their caches: later processes load them)."""
        import numba
        from numba import types

        self.impl.compile(tuple(types.Array(numba.from_dtype(dt), r, "C")
                                for dt, r in self.in_specs + self.out_specs))
        if ffi_mode() == "ffi" and self.target_name not in _FAILED:
            self.ensure_registered()

    # -- calls ----------------------------------------------------------------------
    def __call__(self, *args, out_shapes) -> tuple:
        """Run the kernel; returns a tuple of jax arrays (one per output)."""
        import jax
        import jax.numpy as jnp

        out_shapes = [jax.ShapeDtypeStruct(tuple(s.shape), s.dtype) for s in out_shapes]
        args = [jnp.asarray(x) for x in args]
        self._check(args, out_shapes)
        mode = ffi_mode()
        if mode == "ffi":
            if self.target_name in _FAILED:
                mode = "callback"
            else:
                try:
                    self.ensure_registered()
                except ValueError:
                    raise
                except Exception as e:  # handler compile / registration failure
                    self._check_impl_compiles(e)  # a bug in impl itself: raise it
                    _FAILED[self.target_name] = f"{type(e).__name__}: {e}"
                    self._warn_fallback(f"building/registering the FFI handler failed ({_FAILED[self.target_name]})")
                    mode = "callback"
        else:
            reason = (
                "NEURALIL_FAST_FFI=callback is set"
                if os.environ.get("NEURALIL_FAST_FFI", "").strip().lower() == "callback"
                else "the installed XLA FFI header does not match this module's layout: "
                + "; ".join(abi_problems()[:5])
            )
            self._warn_fallback(reason)
        if mode == "ffi":
            outs = jax.ffi.ffi_call(self.target_name, out_shapes, vmap_method="sequential")(*args)
        else:
            outs = pure_callback_64(
                functools.partial(self._host, tuple(out_shapes)), out_shapes, *args, vmap_method="sequential"
            )
        return tuple(outs)

    def _check_impl_compiles(self, cause: BaseException) -> None:
        """Re-raise ``cause`` if ``impl`` itself fails to compile for the specs."""
        import numba
        from numba import types

        sig = tuple(types.Array(numba.from_dtype(dt), r, "C") for dt, r in self.in_specs + self.out_specs)
        try:
            self.impl.compile(sig)
        except Exception as e:
            raise TypeError(f"{self.name}: impl does not compile for {self.target_name}: {e}") from cause

    def _warn_fallback(self, reason: str) -> None:
        if self.target_name in _WARNED:
            return
        _WARNED.add(self.target_name)
        warnings.warn(
            f"{self.name}: running the numba kernel through jax.pure_callback "
            f"(slower, a Python round trip per call) because {reason}.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _host(self, out_shapes, *arrays):
        """The pure_callback body: run impl on numpy arrays."""
        return self.run_numpy(*arrays, out_shapes=out_shapes)

    def run_numpy(self, *inputs, out_shapes) -> tuple:
        """Run ``impl`` eagerly on numpy arrays, outside jax (returns a tuple).

        ``out_shapes`` is a sequence of objects with ``.shape``/``.dtype``
        (or of shape tuples, the dtypes then coming from ``out_specs``).
        """
        if len(inputs) != len(self.in_specs):
            raise TypeError(f"{self.name}: expected {len(self.in_specs)} input arrays, got {len(inputs)}")
        ins = []
        for k, (x, (dt, rank)) in enumerate(zip(inputs, self.in_specs)):
            x = np.asarray(x)
            if x.dtype != dt or x.ndim != rank:
                raise TypeError(f"{self.name}: input {k} must be {dt.name} of rank {rank}, got {x.dtype} {x.shape}")
            ins.append(x if x.flags.c_contiguous else np.ascontiguousarray(x).reshape(x.shape))  # keeps 0-d
        outs = []
        for s, (dt, rank) in zip(out_shapes, self.out_specs):
            shape = tuple(s.shape) if hasattr(s, "shape") else tuple(s)
            if len(shape) != rank:
                raise TypeError(f"{self.name}: output shape {shape} is not of rank {rank}")
            outs.append(np.empty(shape, dtype=dt))
        self.impl(*ins, *outs)
        return tuple(outs)
