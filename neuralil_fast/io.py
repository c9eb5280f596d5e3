"""Low-level input/output for neuralil_fast.

This module has no dependency on the model classes.  It provides three things:

1. **Checkpoints** (:func:`write_checkpoint`, :func:`read_checkpoint`): a safe,
   versioned binary format for a model's hyperparameters (JSON-able config),
   its parameter tree and optional extra state (optimizer state, training
   step, RNG keys, ...).  It never uses pickle.

2. **Original NeuralIL pickles** (:func:`read_neuralil_pickle`): reads the
   parameter pickles that the original NeuralIL code wrote, with a restricted
   unpickler that resolves only an explicit allow-list of globals, so no code
   from the file can run.

3. **Datasets** (:class:`Configuration`, :func:`read_dataset`,
   :func:`write_dataset`, :func:`to_atoms`, :func:`from_atoms`,
   :func:`ean_species_sequence`): labelled atomic configurations read from
   NeuralIL JSON Lines files or from anything ASE can read (extxyz first),
   validated with clear error messages before any training starts.

Checkpoint file layout (format version 1, all integers little-endian)::

    offset  size  content
    0       30    magic  b"\\x89neuralil_fast checkpoint\\r\\n\\x1a\\n"
    30      4     uint32 format version (currently 1)
    34      8     uint64 payload length in bytes
    42      32    sha256 of (version bytes + length bytes + payload)
    74      n     payload: one msgpack map

The payload map holds ``format`` (the string "neuralil_fast checkpoint"),
``format_version``, ``writer``, ``created`` (ISO 8601 UTC), ``config_json``
(the config as JSON text), ``params`` (the parameter tree) and ``extra``.
Arrays are stored as msgpack extension objects holding the dtype, the shape
and the raw C-order bytes, so they round-trip bit for bit (NaN payloads,
signed zeros, byte order included).
"""

from __future__ import annotations

import contextlib
import datetime as _datetime
import hashlib
import json
import math
import os
import pickle
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .geometry import check_cell

__all__ = [
    "CHECKPOINT_MAGIC",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "write_checkpoint",
    "read_checkpoint",
    "RefusedGlobalError",
    "read_neuralil_pickle",
    "Configuration",
    "read_dataset",
    "write_dataset",
    "read_species_sequence",
    "ean_species_sequence",
    "to_atoms",
    "from_atoms",
]

# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

CHECKPOINT_FORMAT = "neuralil_fast checkpoint"
CHECKPOINT_MAGIC = b"\x89" + CHECKPOINT_FORMAT.encode("ascii") + b"\r\n\x1a\n"
CHECKPOINT_VERSION = 1

_HEADER = struct.Struct("<IQ32s")  # version, payload length, sha256
_HEADER_SIZE = len(CHECKPOINT_MAGIC) + _HEADER.size

# msgpack extension type codes
_EXT_NDARRAY = 1  # numpy.ndarray
_EXT_TUPLE = 2  # tuple (msgpack only knows lists)
_EXT_NPSCALAR = 3  # numpy scalar (np.float32(1.0), ...), kept as such

_PLAIN_KINDS = "biufc"  # bool, signed, unsigned, float, complex


def _dtype_spec(dt: np.dtype) -> str:
    """A string that recreates the dtype exactly (byte order included)."""
    if dt.kind in _PLAIN_KINDS and dt.fields is None and dt.subdtype is None:
        return dt.str
    module = getattr(dt.type, "__module__", "") or ""
    if module.startswith("ml_dtypes"):
        # bfloat16, float8_*, int4, ...: registered by ml_dtypes (a jax dependency)
        return "ml_dtypes:" + dt.name
    raise TypeError(
        f"cannot store arrays of dtype {dt!r} in a checkpoint: only bool, "
        "integer, floating-point and complex dtypes (and the ml_dtypes types "
        "such as bfloat16) are supported"
    )


def _dtype_from_spec(spec: str) -> np.dtype:
    if not isinstance(spec, str):
        raise ValueError(f"invalid dtype entry {spec!r}")
    if spec.startswith("ml_dtypes:"):
        try:
            import ml_dtypes
        except ImportError as exc:  # pragma: no cover - jax always has it
            raise ValueError(
                f"the checkpoint holds an array of dtype {spec[10:]!r}, which "
                "needs the ml_dtypes package"
            ) from exc
        try:
            return np.dtype(getattr(ml_dtypes, spec[10:]))
        except (AttributeError, TypeError) as exc:
            raise ValueError(f"unknown ml_dtypes dtype {spec[10:]!r}") from exc
    try:
        dt = np.dtype(spec)
    except TypeError as exc:
        raise ValueError(f"invalid dtype entry {spec!r}") from exc
    if dt.kind not in _PLAIN_KINDS or dt.fields is not None:
        raise ValueError(f"refusing dtype {spec!r} in checkpoint")
    return dt


def _is_arraylike(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, np.generic)) or (
        hasattr(obj, "__array__") and not isinstance(obj, (str, bytes, Mapping))
    )


def _pack_array(arr: np.ndarray) -> bytes:
    import msgpack

    spec = _dtype_spec(arr.dtype)
    data = np.ascontiguousarray(arr).tobytes(order="C")
    return msgpack.packb([spec, list(arr.shape), data], use_bin_type=True)


def _encode(obj: Any, where: str) -> Any:
    """Turn a nested structure into msgpack-native objects (+ ExtType)."""
    import msgpack

    if obj is None or isinstance(obj, (bool, str, bytes)):
        return obj
    if isinstance(obj, int):
        if not -(2**63) <= obj < 2**64:
            raise TypeError(f"{where}: integer {obj} does not fit in 64 bits")
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _pack_array(np.asarray(obj)))
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where}: dictionary keys must be strings, got {k!r} "
                    f"({type(k).__name__})"
                )
            out[k] = _encode(v, f"{where}/{k}")
        return out
    if isinstance(obj, tuple):
        items = [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
    if isinstance(obj, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if _is_arraylike(obj):  # numpy / jax arrays
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise TypeError(f"{where}: object arrays cannot be stored")
        return msgpack.ExtType(_EXT_NDARRAY, _pack_array(arr))
    raise TypeError(
        f"{where}: cannot store an object of type {type(obj).__name__} in a "
        "checkpoint; use nested dicts/lists/tuples of arrays, numbers, "
        "strings and None (flatten structures such as optax states first, "
        "e.g. with jax.tree.leaves)"
    )


def _unpack_array(data: bytes) -> np.ndarray:
    import msgpack

    try:
        spec, shape, raw = msgpack.unpackb(data, raw=False, use_list=True)
    except Exception as exc:
        raise ValueError(f"malformed array record ({exc})") from exc
    dt = _dtype_from_spec(spec)
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"malformed array shape {shape!r}")
    if not isinstance(raw, bytes):
        raise ValueError("malformed array data")
    count = math.prod(shape)
    if count * dt.itemsize != len(raw):
        raise ValueError(
            f"array data has {len(raw)} bytes, but shape {tuple(shape)} and "
            f"dtype {dt} need {count * dt.itemsize}"
        )
    return np.frombuffer(raw, dtype=dt, count=count).reshape(shape).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code == _EXT_NDARRAY:
        return _unpack_array(data)
    if code == _EXT_NPSCALAR:
        arr = _unpack_array(data)
        if arr.shape != ():
            raise ValueError("malformed numpy scalar record")
        return arr[()]
    if code == _EXT_TUPLE:
        items = msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, strict_map_key=True)
        if not isinstance(items, list):
            raise ValueError("malformed tuple record")
        return tuple(items)
    raise ValueError(f"unknown msgpack extension type {code}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(
        f"config value of type {type(obj).__name__} is not JSON-serialisable"
    )


def _check_params_tree(tree: Any, where: str = "params") -> None:
    if not isinstance(tree, dict):
        raise ValueError(f"{where} is a {type(tree).__name__}, expected a dict")
    for k, v in tree.items():
        if isinstance(v, dict):
            _check_params_tree(v, f"{where}/{k}")
        elif not isinstance(v, np.ndarray):
            raise ValueError(
                f"{where}/{k} is a {type(v).__name__}, expected an array or a dict"
            )


def _encode_params(tree: Any, where: str = "params") -> dict:
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"{where} must be a (nested) dict of arrays, got {type(tree).__name__}"
        )
    import msgpack

    out = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise TypeError(f"{where}: keys must be strings, got {k!r}")
        if isinstance(v, Mapping):
            out[k] = _encode_params(v, f"{where}/{k}")
        elif _is_arraylike(v) or (
            isinstance(v, (int, float)) and not isinstance(v, bool)
        ):
            arr = np.asarray(v)
            if arr.dtype.hasobject:
                raise TypeError(f"{where}/{k}: object arrays cannot be stored")
            out[k] = msgpack.ExtType(_EXT_NDARRAY, _pack_array(arr))
        else:
            raise TypeError(
                f"{where}/{k}: leaves of the parameter tree must be arrays, "
                f"got {type(v).__name__}"
            )
    return out


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield ``(fd, name)`` of a new temp file beside ``path``.

    On a clean exit the temp file gets the usual mode (0666 & ~umask; mkstemp made it
    0600) and replaces ``path`` (:func:`os.replace`, atomic); on an error it is
    removed.  The caller writes it and closes ``fd``.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():  # else mkstemp's error names the temp file, not the folder
        raise FileNotFoundError(f"cannot write {path}: folder {directory} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        yield fd, tmp_name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = Path(path)
    with _replacing(path) as (fd, tmp_name):
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(path.parent if str(path.parent) else Path("."))


def write_checkpoint(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint file atomically.

    Parameters
    ----------
    path:
        Destination file.  The data is first written to a temporary file in
        the same directory, flushed and fsync-ed, then moved over ``path`` with
        :func:`os.replace`, so readers never see a half-written file.
    config:
        Hyperparameters: a dict that :func:`json.dumps` can serialise (numpy
        scalars and arrays are converted to Python numbers and lists).  It is
        stored as JSON text, so tuples come back as lists.
    params:
        The parameter tree: nested dicts (or any Mapping, such as flax's
        ``FrozenDict``) with string keys whose leaves are numpy or JAX arrays.
        Leaves are read back as ``numpy.ndarray`` with identical dtype, shape
        and bits.
    extra:
        Optional additional state, e.g. ``{"step": 1000, "opt_state":
        jax.tree.leaves(opt_state), "rng": key_data}``: nested dicts (string
        keys), lists and tuples of arrays, numpy scalars, Python numbers,
        strings, bytes, booleans and None.  Lists and tuples are kept apart.
        Arbitrary objects (e.g. optax's NamedTuple states) are not stored:
        the caller flattens them (``jax.tree.leaves``) and rebuilds them with
        their own treedef (``jax.tree.unflatten``) after reading.
    """
    import msgpack

    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    config_json = json.dumps(dict(config), default=_json_default, sort_keys=False)
    try:
        from importlib.metadata import version as _pkg_version

        writer = "neuralil_fast " + _pkg_version("neuralil_fast")
    except Exception:
        writer = "neuralil_fast"
    payload_obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "writer": writer,
        "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(),
        "config_json": config_json,
        "params": _encode_params(params),
        "extra": None if extra is None else _encode(dict(extra), "extra"),
    }
    payload = msgpack.packb(payload_obj, use_bin_type=True)
    head = struct.pack("<IQ", CHECKPOINT_VERSION, len(payload))
    digest = hashlib.sha256(head + payload).digest()
    data = CHECKPOINT_MAGIC + _HEADER.pack(CHECKPOINT_VERSION, len(payload), digest) + payload
    _atomic_write_bytes(Path(path), data)


def _describe_foreign(data: bytes) -> str:
    if not data:
        return "the file is empty"
    if data[:1] == b"\x80" or data[:2] in (b"(d", b"(l", b"}q", b"]q"):
        return ("it looks like a Python pickle, which is never loaded (parameters of the "
                "original NeuralIL code: nf.from_neuralil(path), which reads them safely)")
    if data[:4] == b"PK\x03\x04":
        return "it looks like a zip archive (e.g. an .npz file)"
    if data[:6] == b"\x93NUMPY":
        return "it looks like a NumPy .npy file"
    if data[:8] == b"\x89HDF\r\n\x1a\n":
        return "it looks like an HDF5 file"
    stripped = data.lstrip()[:1]
    if stripped in (b"{", b"["):
        return "it looks like a JSON file"
    if CHECKPOINT_MAGIC.startswith(data[: len(CHECKPOINT_MAGIC)]):
        return "the file is truncated inside its header"
    return "it does not start with the neuralil_fast checkpoint header"


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict, dict, dict | None]:
    """Read a checkpoint written by :func:`write_checkpoint`.

    Returns ``(config, params, extra)``: the config dict (as JSON gives it
    back), the parameter tree as nested dicts of ``numpy.ndarray`` and the
    extra state (``None`` if none was written).

    Raises ``ValueError`` with an explanation if the file is not a
    neuralil_fast checkpoint (including pickles, JSON files and random
    binaries), was written by a newer format version, is truncated, fails its
    sha256 checksum or has an unexpected structure.  ``FileNotFoundError`` is
    raised as usual for a missing file.
    """
    import msgpack

    path = Path(path)
    data = path.read_bytes()
    n_magic = len(CHECKPOINT_MAGIC)
    if data[:n_magic] != CHECKPOINT_MAGIC:
        raise ValueError(
            f"{path} is not a neuralil_fast checkpoint: {_describe_foreign(data)}"
        )
    if len(data) < _HEADER_SIZE:
        raise ValueError(
            f"{path} is truncated: {len(data)} bytes, shorter than the "
            f"{_HEADER_SIZE}-byte header"
        )
    version, length, digest = _HEADER.unpack_from(data, n_magic)
    if version > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version}, but this version "
            f"of neuralil_fast reads format versions up to {CHECKPOINT_VERSION}; "
            "upgrade neuralil_fast to read it"
        )
    if version < 1:
        raise ValueError(f"{path} has an invalid checkpoint format version {version}")
    payload = data[_HEADER_SIZE:]
    if len(payload) < length:
        raise ValueError(
            f"{path} is truncated: the header announces {length} payload bytes "
            f"but only {len(payload)} are present"
        )
    if len(payload) > length:
        raise ValueError(
            f"{path} is corrupted: {len(payload) - length} unexpected bytes "
            "after the payload"
        )
    head = struct.pack("<IQ", version, length)
    if hashlib.sha256(head + payload).digest() != digest:
        raise ValueError(
            f"{path} is corrupted: sha256 checksum mismatch (the file was "
            "modified or damaged after it was written)"
        )
    try:
        obj = msgpack.unpackb(
            payload, raw=False, ext_hook=_ext_hook, strict_map_key=True
        )
    except Exception as exc:
        raise ValueError(f"{path}: cannot decode the checkpoint payload: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint payload is not a map")
    missing = [k for k in ("format", "format_version", "config_json", "params", "extra")
               if k not in obj]
    if missing:
        raise ValueError(f"{path}: checkpoint payload lacks the entries {missing}")
    if obj["format"] != CHECKPOINT_FORMAT or obj["format_version"] != version:
        raise ValueError(
            f"{path}: inconsistent checkpoint payload (format {obj['format']!r}, "
            f"version {obj['format_version']!r}, header version {version})"
        )
    if not isinstance(obj["config_json"], str):
        raise ValueError(f"{path}: the config entry is not JSON text")
    try:
        config = json.loads(obj["config_json"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the config is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the config is not a JSON object")
    params = obj["params"]
    try:
        _check_params_tree(params)
    except ValueError as exc:
        raise ValueError(f"{path}: malformed parameter tree: {exc}") from exc
    extra = obj["extra"]
    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"{path}: the extra entry is not a map")
    return config, params, extra


# ---------------------------------------------------------------------------
# Original NeuralIL pickles
# ---------------------------------------------------------------------------


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list."""


class _NeuralILModelInfoStub:
    """Harmless stand-in for ``neuralil.model.NeuralILModelInfo``.

    The NeuralIL pickle creates the object with ``NEWOBJ`` on an empty tuple
    and then fills it with ``BUILD`` from a dict; this class only records
    that dict.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise pickle.UnpicklingError(
                "NeuralILModelInfo is only expected to be created empty"
            )
        self.state: dict | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(
                f"NeuralILModelInfo state is a {type(state).__name__}, expected a dict"
            )
        self.state = state


def _numpy_reconstruct() -> Any:
    # The function numpy uses to unpickle arrays, whatever numpy calls it
    # (numpy.core.multiarray._reconstruct in numpy 1, numpy._core... in 2).
    return np.ndarray.__reduce__(np.zeros(1))[0]


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_reconstruct()
    return {
        ("neuralil.model", "NeuralILModelInfo"): _NeuralILModelInfoStub,
        ("datetime", "datetime"): _datetime.datetime,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only an explicit allow-list of globals."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobalError(
                f"refusing to load global {module}.{name} from a NeuralIL pickle: "
                "only neuralil.model.NeuralILModelInfo, datetime.datetime and "
                "numpy array reconstruction are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent IDs are not allowed")


_NEURALIL_FIELDS = (
    "model_name",
    "model_version",
    "timestamp",
    "r_cut",
    "n_max",
    "sorted_elements",
    "embed_d",
    "core_widths",
    "constructor_kwargs",
    "random_seed",
    "params",
    "specific_info",
)


def _plain_tree(obj: Any, where: str) -> Any:
    """Convert the params field to plain nested dicts of numeric arrays."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: non-string key {k!r} in the parameter tree")
            out[k] = _plain_tree(v, f"{where}/{k}")
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _PLAIN_KINDS or obj.dtype.fields is not None:
            raise ValueError(f"{where}: unexpected array dtype {obj.dtype}")
        return obj
    raise ValueError(f"{where}: unexpected {type(obj).__name__} in the parameter tree")


def _check_no_object_arrays(obj: Any, where: str) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise ValueError(f"{where}: object arrays are not allowed")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _check_no_object_arrays(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_no_object_arrays(v, f"{where}[{i}]")


def read_neuralil_pickle(path: str | os.PathLike) -> dict:
    """Read a parameter pickle written by the original NeuralIL code, safely.

    The file is read with a restricted unpickler (a ``pickle.Unpickler``
    subclass whose ``find_class`` resolves only
    ``neuralil.model.NeuralILModelInfo`` -- mapped to a local stand-in that
    just records its state dict --, ``datetime.datetime`` and numpy's array
    reconstruction: ``numpy.core.multiarray._reconstruct`` /
    ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``,
    ``numpy.dtype``).  Any other global raises :class:`RefusedGlobalError`
    (a ``pickle.UnpicklingError``) naming it, before anything is called, so
    no code from the file runs.  Neither NeuralIL nor flax is imported.

    The NeuralIL stream is ``NEWOBJ`` of ``NeuralILModelInfo`` on an empty
    tuple, followed by ``BUILD`` with a dict of fields; arrays are
    ``_reconstruct(ndarray, (0,), b"b")`` + ``BUILD`` with the array state.

    Returns a plain dict with the keys ``model_name``, ``model_version``,
    ``timestamp`` (``datetime.datetime``), ``r_cut``, ``n_max``,
    ``sorted_elements``, ``embed_d``, ``core_widths``,
    ``constructor_kwargs``, ``random_seed``, ``params`` and
    ``specific_info`` (missing fields are ``None``).  ``params`` is the
    flax variable dict exactly as pickled, as plain nested dicts of numpy
    arrays, i.e. ``{"params": tree}``.

    For the NeuralIL+Morse model of the shared EAN data
    (``neuralil_morse_params.pickle``, model_version "0.4") the tree is
    (all float32)::

        params
          core_model
            Inlet        kernel (152, 64)  bias (64,)
            Stage_1      kernel (64, 32)   bias (32,)
            Stage_2      kernel (32, 16)   bias (16,)
            Stage_3      kernel (16, 16)   bias (16,)
            Stage_4      kernel (16, 16)   bias (16,)
            LayerNorm_0  scale (32,)       bias (32,)
            LayerNorm_1  scale (16,)       bias (16,)
            LayerNorm_2  scale (16,)       bias (16,)
            LayerNorm_3  scale (16,)       bias (16,)
            Outlet       kernel (16, 1)    bias (1,)
          denormalizer   kernel (1, 1)     bias (1,)
          embed          embedding (4, 2)
          morse
            embed        embedding (4, 3)
            switch_param (1, 1)

    with r_cut 3.5, n_max 4, sorted_elements ["C", "H", "N", "O"],
    embed_d 2, core_widths [64, 32, 16, 16, 16], constructor_kwargs {},
    random_seed 45240596 and specific_info None.  (152 = 150 descriptor
    features + the 2 embedding dimensions.)
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh).load()
        except RefusedGlobalError:
            raise
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(f"{path}: invalid NeuralIL pickle: {exc}") from exc
        except (EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, OverflowError, MemoryError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path} is not a readable NeuralIL pickle "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    if not isinstance(obj, _NeuralILModelInfoStub) or obj.state is None:
        raise ValueError(
            f"{path}: expected a pickled neuralil.model.NeuralILModelInfo, "
            f"found {type(obj).__name__}"
        )
    state = obj.state
    unknown = sorted(set(state) - set(_NEURALIL_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unexpected NeuralILModelInfo fields {unknown}")
    if "params" not in state:
        raise ValueError(f"{path}: the NeuralILModelInfo has no params")
    _check_no_object_arrays(state, "NeuralILModelInfo")
    out = {name: state.get(name) for name in _NEURALIL_FIELDS}
    out["params"] = _plain_tree(state["params"], "params")
    for name in ("sorted_elements", "core_widths"):
        if isinstance(out[name], tuple):
            out[name] = list(out[name])
    if out["constructor_kwargs"] is None:
        out["constructor_kwargs"] = {}
    return out


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

LABELS = ("energy", "forces")  # the labels read_dataset can require


def _known_symbols() -> frozenset[str]:
    from ase.data import chemical_symbols

    return frozenset(chemical_symbols[1:])


@dataclass(eq=False)
class Configuration:
    """One labelled atomic configuration.

    Attributes
    ----------
    symbols: tuple of element symbols, length N.
    positions: (N, 3) float64, Cartesian, Å (kept as given, not wrapped).
    cell: (3, 3) float64, the cell vectors as rows, Å.
    pbc: (3,) bool.
    energy: total energy in eV, or None.
    forces: (N, 3) float64 in eV/Å, or None.
    stress: (6,) float64 Voigt (xx, yy, zz, yz, xz, xy) in eV/Å^3 with ASE's
        sign convention, or None.
    info: free-form metadata (e.g. the source line or ASE info).

    The constructor converts the inputs and checks shapes, finiteness and
    element symbols, raising ``ValueError``.
    """

    symbols: tuple[str, ...]
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        syms = self.symbols
        if isinstance(syms, str):
            raise ValueError("symbols must be a sequence of element symbols, not a string")
        syms = tuple(_symbol_of(s) for s in syms)
        self.symbols = syms
        n = len(syms)
        self.positions = _float_array(self.positions, (n, 3), "positions")
        cell = np.asarray(self.cell, dtype=np.float64)
        if cell.shape == (3,):
            cell = np.diag(cell)
        self.cell = _float_array(cell, (3, 3), "cell")
        pbc = np.asarray(self.pbc)
        if pbc.shape == ():
            pbc = np.repeat(pbc, 3)
        if pbc.shape != (3,):
            raise ValueError(f"pbc has shape {pbc.shape}, expected (3,)")
        self.pbc = pbc.astype(bool)
        check_cell(self.cell, self.pbc)  # here, so a reader names the configuration
        if self.energy is not None:
            e = np.asarray(self.energy, dtype=np.float64)
            if e.size != 1:
                raise ValueError(f"energy must be a single number, got shape {e.shape}")
            e = float(e.reshape(()))
            if not math.isfinite(e):
                raise ValueError(f"energy is not finite ({e})")
            self.energy = e
        if self.forces is not None:
            self.forces = _float_array(self.forces, (n, 3), "forces")
        if self.stress is not None:
            s = np.asarray(self.stress, dtype=np.float64)
            if s.shape == (3, 3):
                s = s[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            self.stress = _float_array(s, (6,), "stress")

    @property
    def n_atoms(self) -> int:
        return len(self.symbols)

    @property
    def numbers(self) -> np.ndarray:
        from ase.data import atomic_numbers

        return np.array([atomic_numbers[s] for s in self.symbols], dtype=np.int64)

    def wrapped_positions(self) -> np.ndarray:
        """Positions wrapped into the cell along the periodic directions."""
        from ase.geometry import wrap_positions

        if not self.pbc.any():
            return self.positions.copy()
        return wrap_positions(self.positions, self.cell, pbc=self.pbc)


def _symbol_of(s: Any) -> str:
    from ase.data import chemical_symbols

    if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
        if 1 <= int(s) < len(chemical_symbols):
            return chemical_symbols[int(s)]
        raise ValueError(f"unknown atomic number {s}")
    if not isinstance(s, str):
        raise ValueError(f"element symbol {s!r} is not a string")
    if s not in _known_symbols():
        raise ValueError(f"unknown element symbol {s!r}")
    return s


def _float_array(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not a numeric array ({exc})") from exc
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))
        where = f" (first at index {tuple(int(i) for i in bad[0])})" if arr.ndim else ""
        raise ValueError(f"{name} contains NaN or infinite values{where}")
    return arr


def ean_species_sequence(n_pairs: int = 15) -> tuple[str, ...]:
    """Element of each atom in the EAN JSON Lines data (see the shared README).

    The ``n_pairs`` ethylammonium cations come first, each as the 11 atoms
    N, H, H, H, C, H, H, C, H, H, H, then the ``n_pairs`` nitrate anions,
    each as N, O, O, O.  ``n_pairs=15`` gives the 225 atoms of the shared data.
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 0:
        raise ValueError(f"n_pairs must be a non-negative integer, got {n_pairs!r}")
    cation = ("N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H")
    anion = ("N", "O", "O", "O")
    return cation * int(n_pairs) + anion * int(n_pairs)


def read_species_sequence(path: str | os.PathLike) -> tuple[str, ...]:
    """Read a types file: element symbols separated by whitespace/newlines.

    Text after ``#`` on a line is a comment.  Atomic numbers are accepted too.
    """
    path = Path(path)
    tokens: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            tokens.extend(line.split("#", 1)[0].split())
    if not tokens:
        raise ValueError(f"species sequence file {path} holds no element symbols")
    out = []
    for k, tok in enumerate(tokens):
        try:
            out.append(_symbol_of(int(tok) if tok.isdigit() else tok))
        except ValueError as exc:
            raise ValueError(f"{path}, entry {k}: {exc}") from None
    return tuple(out)


def _resolve_species_sequence(seq: Any) -> tuple[str, ...]:
    if isinstance(seq, (str, os.PathLike)):
        p = Path(seq)
        if not p.is_file():
            raise ValueError(
                f"species_sequence {str(seq)!r} is not an existing file; pass "
                "a list of element symbols (one per atom) or a path to a types file"
            )
        return read_species_sequence(p)
    out = []
    for k, s in enumerate(seq):
        try:
            out.append(_symbol_of(s))
        except ValueError as exc:
            raise ValueError(f"species_sequence entry {k}: {exc}") from None
    return tuple(out)


_JSONL_EXT = {".jsonl", ".ndjson", ".json"}
_EXTXYZ_EXT = {".xyz", ".extxyz"}


def _detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz"):
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in _JSONL_EXT:
        return "jsonl"
    if ext in _EXTXYZ_EXT:
        return "extxyz"
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.lstrip()[:1] == b"{":
        return "jsonl"
    return "ase"


def read_dataset(
    path: str | os.PathLike,
    species_sequence: Sequence[str] | str | os.PathLike | None = None,
    fmt: str | None = None,
    *,
    species: Iterable[str] | None = None,
    require_labels: bool | Iterable[str] = True,
    wrap: bool = False,
) -> list[Configuration]:
    """Read labelled configurations from a file.

    Parameters
    ----------
    path:
        The data file.
    species_sequence:
        For NeuralIL JSON Lines files (which do not store elements): the
        element of each atom, as a sequence of symbols (length Natoms), or a
        path to a types file (symbols separated by whitespace or newlines).
        For EAN use :func:`ean_species_sequence`.  Ignored (must be None) for
        ASE formats, which carry their own symbols.
    fmt:
        ``"jsonl"`` (NeuralIL JSON Lines), ``"extxyz"`` or any other ASE
        format name, or None to detect it from the extension
        (``.jsonl``/``.ndjson``/``.json`` -> JSON Lines, ``.xyz``/``.extxyz`` ->
        extxyz) or else from the content (a first character ``{`` -> JSON
        Lines, anything else -> ASE's own detection).
    species:
        Optional: the elements the model knows.  A configuration with another
        element raises ``ValueError`` naming the missing symbols.
    require_labels:
        The labels every configuration must carry: True (the default) for
        ``("energy", "forces")``, False for none, or a subset such as
        ``("energy",)``; a label that is not required and missing becomes None.
    wrap:
        Positions are kept exactly as stored by default (they may lie
        outside the cell: the neighbour code handles periodic images).  With
        ``wrap=True`` they are wrapped into the cell along periodic directions.

    NeuralIL JSON Lines: one JSON object per line with the keys ``Positions``
    (N x 3, Å), ``Cell-Size`` (3 numbers: the diagonal of an orthorhombic
    cell, or a 3 x 3 matrix with the cell vectors as rows), ``Energy`` (eV),
    ``Forces`` (N x 3, eV/Å) and optionally ``Natoms`` (checked) and
    ``Charges``/``Date``/others (kept in ``info``).  The cell is periodic in
    all directions.

    Every problem (malformed line, missing key, wrong shape, inconsistent atom
    counts, NaN/inf values, unknown elements, a labelled configuration without
    atoms) raises ``ValueError`` naming the configuration index (0-based) and,
    for JSON Lines, the line number (1-based).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    required = _required_labels(require_labels)
    if fmt is None:
        fmt = _detect_format(path)
    fmt_l = fmt.lower()
    if fmt_l in ("jsonl", "json", "ndjson", "neuralil"):
        if species_sequence is None:
            raise ValueError(
                f"{path}: NeuralIL JSON Lines files do not store the elements; "
                "pass species_sequence (a list of symbols, one per atom, or a "
                "types file), e.g. ean_species_sequence(15) for the EAN data"
            )
        seq = _resolve_species_sequence(species_sequence)
        configs = _read_jsonl(path, seq, required)
    else:
        if species_sequence is not None:
            raise ValueError(
                f"{path}: species_sequence is only used for NeuralIL JSON Lines "
                f"files; {fmt} files carry their own element symbols"
            )
        configs = _read_ase(path, None if fmt_l == "ase" else fmt, required)
    if not configs:
        raise ValueError(f"{path} holds no configurations")
    if required:
        for k, conf in enumerate(configs):
            if conf.n_atoms == 0:  # as a label, its energy per atom would be 0 / 0
                raise ValueError(f"{path}, configuration {k} has no atoms")
    if species is not None:
        allowed = {_symbol_of(s) for s in species}
        for k, conf in enumerate(configs):
            absent = sorted(set(conf.symbols) - allowed)
            if absent:
                raise ValueError(
                    f"{path}, configuration {k}: elements {absent} are not among "
                    f"the model's species {sorted(allowed)}"
                )
    if wrap:
        for conf in configs:
            conf.positions = conf.wrapped_positions()
    return configs


def _required_labels(require_labels) -> tuple[str, ...]:
    """require_labels (True, False or label names) -> the required labels, in LABELS order."""
    if require_labels is True or require_labels is False:
        return LABELS if require_labels else ()
    names = {require_labels} if isinstance(require_labels, str) else set(require_labels)
    unknown = sorted(names - set(LABELS))
    if unknown:
        raise ValueError(f"require_labels: unknown labels {unknown}; choose from {LABELS}")
    return tuple(n for n in LABELS if n in names)


def _read_jsonl(path: Path, seq: tuple[str, ...], required: tuple[str, ...]) -> list[Configuration]:
    configs: list[Configuration] = []
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a NeuralIL JSON Lines file: it is not UTF-8 text"
        ) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index = len(configs)
        where = f"{path}, line {lineno} (configuration {index})"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if index == 0 and line.lstrip()[:1] in ("[", "{"):
                hint = (" (a JSON Lines file holds one complete JSON object per "
                        "line; a single pretty-printed JSON document is not one)")
            raise ValueError(f"{where}: not valid JSON: {exc.msg}{hint}") from None
        if not isinstance(rec, dict):
            raise ValueError(
                f"{where}: expected a JSON object, got {type(rec).__name__}"
            )
        keys = ["Positions", "Cell-Size"] + [n.capitalize() for n in required]
        for key in keys:
            if key not in rec:
                raise ValueError(f"{where}: missing key {key!r}")
        try:
            positions = _float_array_nonfinite_ok(rec["Positions"], "Positions")
            n = positions.shape[0] if positions.ndim == 2 else -1
            if positions.ndim != 2 or positions.shape[1] != 3:
                raise ValueError(
                    f"Positions has shape {positions.shape}, expected (Natoms, 3)"
                )
            if "Natoms" in rec:
                natoms = rec["Natoms"]
                if isinstance(natoms, bool) or not isinstance(natoms, int):
                    raise ValueError(f"Natoms is {natoms!r}, expected an integer")
                if natoms != n:
                    raise ValueError(f"Natoms is {natoms} but Positions has {n} rows")
            if len(seq) != n:
                raise ValueError(
                    f"the species sequence has {len(seq)} entries but the "
                    f"configuration has {n} atoms"
                )
            forces = rec.get("Forces")
            if forces is not None:
                forces = _float_array_nonfinite_ok(forces, "Forces")
                if forces.shape != (n, 3):
                    raise ValueError(
                        f"Forces has shape {forces.shape}, expected ({n}, 3) "
                        "like Positions"
                    )
            cell = _float_array_nonfinite_ok(rec["Cell-Size"], "Cell-Size")
            if cell.shape == (3,):
                cell = np.diag(cell)
            elif cell.shape == (9,):
                cell = cell.reshape(3, 3)
            if cell.shape != (3, 3):
                raise ValueError(
                    f"Cell-Size has shape {cell.shape}, expected 3 numbers "
                    "(the diagonal) or a 3 x 3 matrix"
                )
            energy = rec.get("Energy")
            if energy is not None and (
                isinstance(energy, bool) or not isinstance(energy, (int, float))
            ):
                raise ValueError(f"Energy is {energy!r}, expected a number")
            info = {k: v for k, v in rec.items()
                    if k not in ("Positions", "Forces", "Cell-Size", "Energy", "Natoms")}
            info["source_line"] = lineno
            conf = Configuration(
                symbols=seq,
                positions=positions,
                cell=cell,
                pbc=np.ones(3, dtype=bool),
                energy=energy,
                forces=forces,
                info=info,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        configs.append(conf)
    return configs


def _float_array_nonfinite_ok(value: Any, name: str) -> np.ndarray:
    try:
        return np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is not a numeric array (ragged or non-numeric)") from None


def _read_ase(path: Path, fmt: str | None, required: tuple[str, ...]) -> list[Configuration]:
    import ase.io

    try:
        frames = ase.io.read(path, index=":", format=fmt)
    except Exception as exc:
        kind = fmt or "any format ASE recognises"
        raise ValueError(
            f"{path} could not be read as {kind} ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(frames, list):
        frames = [frames]
    configs = []
    for k, atoms in enumerate(frames):
        try:
            configs.append(from_atoms(atoms, require_labels=required))
        except ValueError as exc:
            raise ValueError(f"{path}, configuration {k}: {exc}") from None
    return configs


def _label(atoms: Any, name: str) -> Any:
    calc = atoms.calc
    if calc is not None:
        results = getattr(calc, "results", {}) or {}
        if name in results and results[name] is not None:
            return results[name]
    if name in atoms.info:
        return atoms.info[name]
    if name in atoms.arrays:
        return atoms.arrays[name]
    return None


def from_atoms(atoms: Any, *, require_labels: bool | Iterable[str] = False) -> Configuration:
    """Build a :class:`Configuration` from an ``ase.Atoms``.

    Labels are taken from the attached calculator's ``results`` (as ASE's
    extxyz reader stores them), else from ``atoms.info`` (energy, stress) or
    ``atoms.arrays`` (forces).  A label named by ``require_labels`` (True: energy and
    forces; or label names, as in :func:`read_dataset`) that is missing raises
    ``ValueError``.
    """
    energy = _label(atoms, "energy")
    forces = _label(atoms, "forces")
    stress = _label(atoms, "stress")
    required = _required_labels(require_labels)
    if required:
        found = {"energy": energy, "forces": forces}
        missing = [n for n in required if found[n] is None]
        if missing:
            raise ValueError(f"no {' or '.join(missing)} label")
    info = {k: v for k, v in atoms.info.items() if k not in ("energy", "stress")}
    return Configuration(
        symbols=tuple(atoms.get_chemical_symbols()),
        positions=atoms.get_positions(),
        cell=np.array(atoms.cell[:], dtype=np.float64),
        pbc=np.array(atoms.pbc, dtype=bool),
        energy=energy,
        forces=forces,
        stress=stress,
        info=info,
    )


def to_atoms(config: Configuration) -> Any:
    """An ``ase.Atoms`` for the configuration, labels on a SinglePointCalculator.

    The calculator carries ``energy`` (also as ``free_energy``), ``forces``
    and ``stress`` where present; without any label no calculator is attached.
    """
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(
        symbols=list(config.symbols),
        positions=config.positions.copy(),
        cell=config.cell.copy(),
        pbc=config.pbc.copy(),
    )
    labels: dict[str, Any] = {}
    if config.energy is not None:
        labels["energy"] = float(config.energy)
        labels["free_energy"] = float(config.energy)
    if config.forces is not None:
        labels["forces"] = config.forces.copy()
    if config.stress is not None:
        labels["stress"] = config.stress.copy()
    if labels:
        atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms


def write_dataset(path: str | os.PathLike, configs: Iterable[Configuration]) -> None:
    """Write configurations as extxyz (labels on the calculator), atomically."""
    import ase.io

    path = Path(path)
    frames = [to_atoms(c) for c in configs]
    with _replacing(path) as (fd, tmp_name):
        os.close(fd)
        ase.io.write(tmp_name, frames, format="extxyz")
