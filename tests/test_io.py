"""Tests for neuralil_fast.io: checkpoints, NeuralIL pickles, datasets."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from neuralil_fast import io as nio

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EAN_DIR = SHARED / "data" / "ean"
EAN_JSONL = EAN_DIR / "ean_dft_60.jsonl"
EAN_PICKLE = EAN_DIR / "neuralil_morse_params.pickle"

needs_jsonl = pytest.mark.skipif(
    not EAN_JSONL.is_file(), reason=f"shared EAN data absent ({EAN_JSONL})"
)
needs_pickle = pytest.mark.skipif(
    not EAN_PICKLE.is_file(), reason=f"shared NeuralIL pickle absent ({EAN_PICKLE})"
)


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array as unsigned integers (for exact comparison)."""
    a = np.ascontiguousarray(a)
    if a.dtype.itemsize in (1, 2, 4, 8):
        return a.view(f"u{a.dtype.itemsize}")
    return a.view(np.uint8)


def _assert_tree_bits_equal(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict)
        assert list(a) == list(b)
        for k in a:
            _assert_tree_bits_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_bits_equal(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        assert type(a) is type(b) or (isinstance(b, np.ndarray) and isinstance(a, np.ndarray))
        assert a_arr.dtype == b_arr.dtype
        assert a_arr.shape == b_arr.shape
        assert np.array_equal(_bits(a_arr), _bits(b_arr))
    elif isinstance(a, float):
        assert isinstance(b, float)
        assert struct.pack("<d", a) == struct.pack("<d", b)
    else:
        assert type(a) is type(b)
        assert a == b


def _special_floats(dtype) -> np.ndarray:
    """NaNs with payloads, signed zeros, infinities, denormals."""
    if dtype == np.float32:
        bits = np.array(
            [0x7FC00001, 0xFFC12345, 0x7F800001, 0x80000000, 0x00000000,
             0x7F800000, 0xFF800000, 0x00000001, 0x3F800000], dtype=np.uint32)
    else:
        bits = np.array(
            [0x7FF8000000000001, 0xFFF8DEADBEEF0001, 0x7FF0000000000001,
             0x8000000000000000, 0x0, 0x7FF0000000000000, 0xFFF0000000000000,
             0x1, 0x3FF0000000000000], dtype=np.uint64)
    return bits.view(dtype)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _example():
    config = {"species": ["C", "H", "N", "O"], "r_cut": 3.5, "n_max": 4,
              "widths": [64, 32, 16, 16, 16], "embed_dim": 2}
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Inlet": {"kernel": rng.normal(size=(152, 64)).astype(np.float32),
                      "bias": np.zeros(64, np.float32)},
            "special32": _special_floats(np.float32),
            "special64": _special_floats(np.float64).reshape(3, 3),
            "int": np.arange(5, dtype=np.int64),
            "bigendian": np.arange(4, dtype=">f8"),
            "empty": np.zeros((0, 3), np.float32),
            "scalar": np.array(1.5, np.float64),
        }
    }
    extra = {
        "step": 1000,
        "lr": 1e-3,
        "neg_zero": -0.0,
        "name": "adam",
        "flag": True,
        "none": None,
        "blob": b"\x00\x01",
        "rng": np.array([0, 42], dtype=np.uint32),
        "opt_state": [np.zeros(3, np.float32), (np.int32(7), np.float32(-0.0)),
                      [], ()],
        "nested": {"a": [1, 2.5, {"b": (None, "x")}]},
    }
    return config, params, extra


def test_checkpoint_roundtrip_bit_exact(tmp_path):
    config, params, extra = _example()
    path = tmp_path / "model.nil"
    nio.write_checkpoint(path, config, params, extra)
    config2, params2, extra2 = nio.read_checkpoint(path)
    assert config2 == config
    _assert_tree_bits_equal(params, params2)
    _assert_tree_bits_equal(extra, extra2)
    # read-back arrays are ordinary writable numpy arrays
    arr = params2["params"]["Inlet"]["kernel"]
    assert isinstance(arr, np.ndarray) and arr.flags.writeable
    assert params2["params"]["bigendian"].dtype == np.dtype(">f8")
    assert isinstance(extra2["opt_state"][1], tuple)
    assert isinstance(extra2["opt_state"][1][0], np.int32)


def test_checkpoint_without_extra(tmp_path):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(str(path), {"a": 1}, {"w": np.ones(2)})
    config, params, extra = nio.read_checkpoint(str(path))
    assert config == {"a": 1}
    assert extra is None
    np.testing.assert_array_equal(params["w"], np.ones(2))


def test_checkpoint_config_json_conversions(tmp_path):
    path = tmp_path / "m.nil"
    cfg = {"widths": (64, 32), "r_cut": np.float32(3.5), "n": np.int64(4),
           "arr": np.array([1.0, 2.0]), "nested": {"species": ("C", "H")}}
    nio.write_checkpoint(path, cfg, {})
    config, params, _ = nio.read_checkpoint(path)
    assert config == {"widths": [64, 32], "r_cut": 3.5, "n": 4, "arr": [1.0, 2.0],
                      "nested": {"species": ["C", "H"]}}
    assert params == {}
    with pytest.raises(TypeError, match="not JSON"):
        nio.write_checkpoint(tmp_path / "bad.nil", {"f": object()}, {})
    assert not (tmp_path / "bad.nil").exists()


def test_checkpoint_accepts_frozendict_and_jax_arrays(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    flax_core = pytest.importorskip("flax.core")
    params = flax_core.freeze({"params": {"dense": {
        "kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "bias": jnp.zeros(3, dtype=jnp.float32)}}})
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {}, params, {"key": jnp.array([1, 2], jnp.uint32)})
    _, params2, extra2 = nio.read_checkpoint(path)
    assert type(params2) is dict and type(params2["params"]["dense"]) is dict
    k = params2["params"]["dense"]["kernel"]
    assert isinstance(k, np.ndarray) and k.dtype == np.float32 and k.shape == (2, 3)
    np.testing.assert_array_equal(k, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(extra2["key"], [1, 2])


def test_checkpoint_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.array([1.5, -0.0, np.nan], dtype=ml_dtypes.bfloat16)
    nio.write_checkpoint(tmp_path / "m.nil", {}, {"a": a})
    _, p, _ = nio.read_checkpoint(tmp_path / "m.nil")
    assert p["a"].dtype == a.dtype
    assert np.array_equal(_bits(p["a"]), _bits(a))


def test_checkpoint_optax_state_flattened_by_caller(tmp_path):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)
    leaves, treedef = jax.tree.flatten(state)
    nio.write_checkpoint(tmp_path / "m.nil", {}, params,
                         {"opt_state": leaves, "step": 1})
    _, params2, extra = nio.read_checkpoint(tmp_path / "m.nil")
    state2 = jax.tree.unflatten(treedef, extra["opt_state"])
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert np.asarray(x).dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), y)
    assert extra["step"] == 1


def test_checkpoint_rejects_unsupported_inputs(tmp_path):
    path = tmp_path / "m.nil"
    with pytest.raises(TypeError, match="nested"):
        nio.write_checkpoint(path, {}, [np.ones(2)])
    with pytest.raises(TypeError, match="object arrays"):
        nio.write_checkpoint(path, {}, {"a": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match="keys must be strings"):
        nio.write_checkpoint(path, {}, {1: np.ones(2)})
    with pytest.raises(TypeError, match="leaves of the parameter tree"):
        nio.write_checkpoint(path, {}, {"a": "text"})
    with pytest.raises(TypeError, match="flatten"):
        nio.write_checkpoint(path, {}, {}, {"x": object()})
    with pytest.raises(TypeError, match="dtype"):
        nio.write_checkpoint(path, {}, {"a": np.zeros(2, dtype="U3")})
    with pytest.raises(TypeError, match="64 bits"):
        nio.write_checkpoint(path, {}, {}, {"x": 2**70})
    with pytest.raises(FileNotFoundError, match=r"folder .*missing does not exist"):
        nio.write_checkpoint(tmp_path / "missing" / "m.nil", {}, {"a": np.ones(2)})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {"v": 1}, {"w": np.ones(2)})
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(nio.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        nio.write_checkpoint(path, {"v": 2}, {"w": np.zeros(2)})
    monkeypatch.undo()
    assert path.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nil"]  # no temp left
    # overwrite works and leaves no temp files
    nio.write_checkpoint(path, {"v": 3}, {"w": np.zeros(2)})
    assert nio.read_checkpoint(path)[0] == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nil"]


def test_checkpoint_header_layout(tmp_path):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {}, {})
    data = path.read_bytes()
    assert data.startswith(nio.CHECKPOINT_MAGIC)
    assert b"neuralil_fast checkpoint" in data[:40]
    (version,) = struct.unpack_from("<I", data, len(nio.CHECKPOINT_MAGIC))
    assert version == nio.CHECKPOINT_VERSION == 1


def test_checkpoint_newer_version_refused(tmp_path):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {}, {"w": np.ones(2)})
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, len(nio.CHECKPOINT_MAGIC), 7)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"format version 7.*up to 1"):
        nio.read_checkpoint(path)


def test_checkpoint_corruption_detected(tmp_path):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {"a": 1}, {"w": np.arange(100, dtype=np.float64)})
    good = path.read_bytes()
    header = len(nio.CHECKPOINT_MAGIC) + 4 + 8 + 32
    # flip one bit anywhere in the payload or checksum
    for pos in (header, header + 17, len(good) - 1, header - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x10
        path.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="checksum"):
            nio.read_checkpoint(path)
    # flipped length field
    bad = bytearray(good)
    bad[len(nio.CHECKPOINT_MAGIC) + 4] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="truncated|corrupted"):
        nio.read_checkpoint(path)
    # trailing garbage
    path.write_bytes(good + b"xx")
    with pytest.raises(ValueError, match="unexpected bytes"):
        nio.read_checkpoint(path)


@pytest.mark.parametrize("cut", [0, 5, 30, 40, 73, 74, 100, -1])
def test_checkpoint_truncation_detected(tmp_path, cut):
    path = tmp_path / "m.nil"
    nio.write_checkpoint(path, {"a": 1}, {"w": np.arange(100, dtype=np.float64)})
    good = path.read_bytes()
    path.write_bytes(good[:cut])
    with pytest.raises(ValueError, match="truncated|empty|not a neuralil_fast"):
        nio.read_checkpoint(path)


def test_checkpoint_foreign_files(tmp_path):
    cases = {
        "random.bin": (bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
                       "not a neuralil_fast checkpoint"),
        "config.json": (json.dumps({"a": 1}).encode(), "JSON"),
        "obj.pickle": (pickle.dumps({"a": 1}), "pickle.*nf.from_neuralil"),
        "old.pickle": (pickle.dumps({"a": 1}, protocol=0), "pickle"),
        "empty.nil": (b"", "empty"),
        "text.nil": (b"hello world\n", "not a neuralil_fast checkpoint"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=msg):
            nio.read_checkpoint(p)
    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.ones(2))
    with pytest.raises(ValueError, match="zip"):
        nio.read_checkpoint(npz)
    with pytest.raises(FileNotFoundError):
        nio.read_checkpoint(tmp_path / "missing.nil")


def test_checkpoint_valid_checksum_but_bad_structure(tmp_path):
    """A well-formed container with a wrong payload gives a structural error."""
    import hashlib

    import msgpack

    def write(obj):
        payload = msgpack.packb(obj, use_bin_type=True)
        head = struct.pack("<IQ", 1, len(payload))
        digest = hashlib.sha256(head + payload).digest()
        p = tmp_path / "x.nil"
        p.write_bytes(nio.CHECKPOINT_MAGIC + head + digest + payload)
        return p

    with pytest.raises(ValueError, match="not a map"):
        nio.read_checkpoint(write([1, 2]))
    with pytest.raises(ValueError, match="lacks"):
        nio.read_checkpoint(write({"format": nio.CHECKPOINT_FORMAT}))
    base = {"format": nio.CHECKPOINT_FORMAT, "format_version": 1,
            "config_json": "{}", "params": {}, "extra": None}
    assert nio.read_checkpoint(write(base)) == ({}, {}, None)
    with pytest.raises(ValueError, match="parameter tree"):
        nio.read_checkpoint(write({**base, "params": {"a": 3}}))
    with pytest.raises(ValueError, match="JSON"):
        nio.read_checkpoint(write({**base, "config_json": "{nope"}))
    bad_arr = msgpack.ExtType(1, msgpack.packb(["<f8", [3], b"\x00" * 8]))
    with pytest.raises(ValueError, match="bytes"):
        nio.read_checkpoint(write({**base, "params": {"a": bad_arr}}))
    obj_arr = msgpack.ExtType(1, msgpack.packb(["|O", [1], b"\x00" * 8]))
    with pytest.raises(ValueError, match="dtype"):
        nio.read_checkpoint(write({**base, "params": {"a": obj_arr}}))
    with pytest.raises(ValueError, match="extension"):
        nio.read_checkpoint(write({**base, "extra": {"a": msgpack.ExtType(42, b"")}}))


_DTYPES = st.sampled_from([np.float32, np.float64, np.int32, np.int8, np.uint16,
                           np.bool_, np.complex64, np.float16])


@st.composite
def _arrays(draw):
    dtype = np.dtype(draw(_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    # draw raw bits so that every bit pattern (NaN payloads, -0.0) can appear
    raw = draw(hnp.arrays(np.dtype(f"u{dtype.itemsize}") if dtype.itemsize in (1, 2, 4, 8)
                          else np.uint8, shape))
    if dtype == np.bool_:
        return raw.astype(np.bool_)
    return raw.view(dtype)


_keys = st.text(alphabet="abcdefgh_/.0123", min_size=1, max_size=6)
_param_trees = st.recursive(
    _arrays(), lambda children: st.dictionaries(_keys, children, max_size=4), max_leaves=10
).filter(lambda t: isinstance(t, dict))

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.binary(max_size=5),
)
_extras = st.dictionaries(_keys, st.recursive(
    st.one_of(_scalars, _arrays()),
    lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                        st.dictionaries(_keys, c, max_size=3)),
    max_leaves=10), max_size=4)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(params=_param_trees, extra=_extras)
def test_checkpoint_roundtrip_hypothesis(params, extra):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.nil"
        nio.write_checkpoint(path, {"k": 1}, params, extra)
        config2, params2, extra2 = nio.read_checkpoint(path)
    assert config2 == {"k": 1}
    _assert_tree_bits_equal(params, params2)
    _assert_tree_bits_equal(extra, extra2)


# ---------------------------------------------------------------------------
# NeuralIL pickles
# ---------------------------------------------------------------------------


def _neuralil_like_pickle(state: dict, numpy1_spelling: bool = False) -> bytes:
    """Craft a stream shaped like NeuralIL's: NEWOBJ of NeuralILModelInfo + BUILD."""
    # protocol 3: GLOBAL opcodes (text), BINBYTES, no framing
    body = pickle.dumps(state, protocol=3)
    assert body[:2] == b"\x80\x03" and body[-1:] == b"."
    if numpy1_spelling:
        body = body.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return (b"\x80\x03" + b"cneuralil.model\nNeuralILModelInfo\n" + b")\x81"
            + body[2:-1] + b"b.")


def _fields(params):
    return {
        "model_name": "NeuralIL", "model_version": "0.3",
        "timestamp": datetime.datetime(2022, 1, 2, 3, 4, 5, 6),
        "r_cut": 4.0, "n_max": 3, "sorted_elements": ["H", "O"], "embed_d": 2,
        "core_widths": [8, 4], "constructor_kwargs": {"foo": 1},
        "random_seed": 7, "params": params, "specific_info": None,
    }


@pytest.mark.parametrize("numpy1_spelling", [False, True])
def test_neuralil_pickle_crafted_roundtrip(tmp_path, numpy1_spelling):
    params = {"params": {"core": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                                  "bias": _special_floats(np.float32)},
                         "embed": {"embedding": np.ones((2, 2), np.float64)}}}
    data = _neuralil_like_pickle(_fields(params), numpy1_spelling)
    if numpy1_spelling:
        assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    path = tmp_path / "p.pickle"
    path.write_bytes(data)
    out = nio.read_neuralil_pickle(path)
    assert set(out) == set(_fields(None))
    for k, v in _fields(None).items():
        if k != "params":
            assert out[k] == v, k
    _assert_tree_bits_equal(params, out["params"])


class _Evil:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _evil_streams(marker: Path) -> dict[str, bytes]:
    import subprocess

    m = str(marker)
    streams = {
        # hand-written protocol 0: os.system("touch marker")
        "os.system": b"cos\nsystem\n(V" + f"touch {m}".encode() + b"\ntR.",
        "builtins.eval": pickle.dumps(
            _Evil(eval, (f"open({m!r}, 'w').close()",)), protocol=4),
        # hand-written protocol 0: subprocess.Popen(["touch", marker])
        "subprocess.Popen": b"csubprocess\nPopen\n((lVtouch\naV" + m.encode()
        + b"\natR.",
        # pickle.dumps spells it commands.Popen (python 2 compatibility name)
        "commands.Popen": pickle.dumps(
            _Evil(subprocess.Popen, (["touch", m],)), protocol=2),
        "posix.system": pickle.dumps(_Evil(os.system, (f"touch {m}",)), protocol=5),
        # nested inside an otherwise legitimate NeuralIL stream
        "nested": _neuralil_like_pickle(
            _fields({"params": {"w": _Evil(os.system, (f"touch {m}",))}})),
        "io.open": pickle.dumps(_Evil(open, (m, "w")), protocol=3),
    }
    return streams


def test_neuralil_pickle_refuses_other_globals(tmp_path):
    marker = tmp_path / "PWNED"
    for name, data in _evil_streams(marker).items():
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(data)
        with pytest.raises(pickle.UnpicklingError, match="refusing to load global") as ei:
            nio.read_neuralil_pickle(path)
        assert isinstance(ei.value, nio.RefusedGlobalError)
        if name != "nested":
            assert name in str(ei.value)
        assert not marker.exists(), f"{name}: code from the pickle ran!"


def test_neuralil_pickle_other_malformed_inputs(tmp_path):
    p = tmp_path / "x.pickle"
    # a plain dict: allowed opcodes, but not a NeuralILModelInfo
    p.write_bytes(pickle.dumps({"params": {}}))
    with pytest.raises(ValueError, match="NeuralILModelInfo"):
        nio.read_neuralil_pickle(p)
    # truncated stream
    good = _neuralil_like_pickle(_fields({"params": {"w": np.ones(2, np.float32)}}))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        nio.read_neuralil_pickle(p)
    # random bytes / JSON / empty
    for content in (b"", b'{"a": 1}', bytes(range(256))):
        p.write_bytes(content)
        with pytest.raises((ValueError, pickle.UnpicklingError)):
            nio.read_neuralil_pickle(p)
    # object array in the parameter tree
    bad = _neuralil_like_pickle(_fields({"params": {"w": np.array([1, "a"], dtype=object)}}))
    p.write_bytes(bad)
    with pytest.raises(ValueError, match="object arrays"):
        nio.read_neuralil_pickle(p)
    # NeuralILModelInfo created with constructor arguments
    body = pickle.dumps(("x",), protocol=3)
    p.write_bytes(b"\x80\x03cneuralil.model\nNeuralILModelInfo\n" + body[2:-1] + b"R.")
    with pytest.raises((ValueError, pickle.UnpicklingError), match="empty"):
        nio.read_neuralil_pickle(p)
    # unknown field
    fields = _fields({"params": {}})
    fields["evil_field"] = 1
    p.write_bytes(_neuralil_like_pickle(fields))
    with pytest.raises(ValueError, match="evil_field"):
        nio.read_neuralil_pickle(p)


@pytest.mark.shared
@needs_pickle
def test_neuralil_pickle_shared_file():
    out = nio.read_neuralil_pickle(EAN_PICKLE)
    assert out["model_name"] == "NeuralIL+Morse"
    assert out["model_version"] == "0.4"
    assert isinstance(out["timestamp"], datetime.datetime)
    assert out["r_cut"] == 3.5
    assert out["n_max"] == 4
    assert out["sorted_elements"] == ["C", "H", "N", "O"]
    assert out["embed_d"] == 2
    assert out["core_widths"] == [64, 32, 16, 16, 16]
    assert out["constructor_kwargs"] == {}
    assert out["random_seed"] == 45240596
    assert out["specific_info"] is None

    shapes = {}

    def walk(t, prefix):
        for k, v in t.items():
            if isinstance(v, dict):
                assert type(v) is dict
                walk(v, f"{prefix}/{k}")
            else:
                assert isinstance(v, np.ndarray) and v.dtype == np.float32
                assert np.all(np.isfinite(v))
                shapes[f"{prefix}/{k}"[1:]] = v.shape

    walk(out["params"], "")
    expected = {
        "params/core_model/Inlet/kernel": (152, 64), "params/core_model/Inlet/bias": (64,),
        "params/core_model/Stage_1/kernel": (64, 32), "params/core_model/Stage_1/bias": (32,),
        "params/core_model/Stage_2/kernel": (32, 16), "params/core_model/Stage_2/bias": (16,),
        "params/core_model/Stage_3/kernel": (16, 16), "params/core_model/Stage_3/bias": (16,),
        "params/core_model/Stage_4/kernel": (16, 16), "params/core_model/Stage_4/bias": (16,),
        "params/core_model/LayerNorm_0/scale": (32,), "params/core_model/LayerNorm_0/bias": (32,),
        "params/core_model/LayerNorm_1/scale": (16,), "params/core_model/LayerNorm_1/bias": (16,),
        "params/core_model/LayerNorm_2/scale": (16,), "params/core_model/LayerNorm_2/bias": (16,),
        "params/core_model/LayerNorm_3/scale": (16,), "params/core_model/LayerNorm_3/bias": (16,),
        "params/core_model/Outlet/kernel": (16, 1), "params/core_model/Outlet/bias": (1,),
        "params/denormalizer/kernel": (1, 1), "params/denormalizer/bias": (1,),
        "params/embed/embedding": (4, 2),
        "params/morse/embed/embedding": (4, 3),
        "params/morse/switch_param": (1, 1),
    }
    assert shapes == expected


@pytest.mark.shared
@needs_pickle
def test_neuralil_pickle_shared_file_into_checkpoint(tmp_path):
    out = nio.read_neuralil_pickle(EAN_PICKLE)
    cfg = {k: out[k] for k in ("r_cut", "n_max", "sorted_elements", "embed_d", "core_widths")}
    nio.write_checkpoint(tmp_path / "m.nil", cfg, out["params"],
                         {"timestamp": out["timestamp"].isoformat()})
    cfg2, params2, _ = nio.read_checkpoint(tmp_path / "m.nil")
    assert cfg2 == cfg
    _assert_tree_bits_equal(out["params"], params2)


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------


def test_ean_species_sequence():
    seq = nio.ean_species_sequence(15)
    assert len(seq) == 225
    assert seq[:11] == ("N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H")
    assert seq[165:169] == ("N", "O", "O", "O")
    assert Counter(seq) == {"H": 120, "C": 30, "N": 30, "O": 45}
    assert nio.ean_species_sequence(1) == (
        "N", "H", "H", "H", "C", "H", "H", "C", "H", "H", "H", "N", "O", "O", "O")
    assert nio.ean_species_sequence(0) == ()
    with pytest.raises(ValueError):
        nio.ean_species_sequence(-1)


def _record(n=3, **over):
    rng = np.random.default_rng(n)
    rec = {"Energy": -10.5, "Positions": rng.uniform(0, 5, (n, 3)).tolist(),
           "Forces": rng.normal(size=(n, 3)).tolist(), "Cell-Size": [5.0, 6.0, 7.0],
           "Charges": [0.0] * n, "Natoms": n, "Date": "today"}
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


def _write_jsonl(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_jsonl_basic(tmp_path):
    recs = [_record(), _record(Energy=-11.0, **{"Cell-Size": [[5, 0, 0], [1, 6, 0], [0, 0, 7]]})]
    path = _write_jsonl(tmp_path / "d.jsonl", recs[:1] + [""] + recs[1:])
    confs = nio.read_dataset(path, ["O", "H", "H"])
    assert len(confs) == 2
    c = confs[0]
    assert c.symbols == ("O", "H", "H") and c.n_atoms == 3
    np.testing.assert_array_equal(c.positions, np.array(recs[0]["Positions"]))
    np.testing.assert_array_equal(c.forces, np.array(recs[0]["Forces"]))
    np.testing.assert_array_equal(c.cell, np.diag([5.0, 6.0, 7.0]))
    assert c.pbc.tolist() == [True, True, True]
    assert c.energy == -10.5 and c.stress is None
    assert c.info["Date"] == "today" and c.info["source_line"] == 1
    assert confs[1].info["source_line"] == 3
    np.testing.assert_array_equal(confs[1].cell, [[5, 0, 0], [1, 6, 0], [0, 0, 7]])
    np.testing.assert_array_equal(c.numbers, [8, 1, 1])


def test_jsonl_positions_kept_or_wrapped(tmp_path):
    rec = _record(Positions=[[-1.0, 2.0, 3.0], [5.5, 0.0, 0.0], [1.0, 1.0, 14.0]])
    path = _write_jsonl(tmp_path / "d.jsonl", [rec])
    (c,) = nio.read_dataset(path, ["O", "H", "H"])
    np.testing.assert_array_equal(c.positions, rec["Positions"])
    (w,) = nio.read_dataset(path, ["O", "H", "H"], wrap=True)
    np.testing.assert_allclose(w.positions, [[4.0, 2.0, 3.0], [0.5, 0.0, 0.0],
                                             [1.0, 1.0, 0.0]], atol=1e-12)


def test_species_sequence_file(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record()])
    types1 = tmp_path / "types.txt"
    types1.write_text("O\nH\nH\n")
    types2 = tmp_path / "types2.txt"
    types2.write_text("# water\nO H   H  # comment\n")
    types3 = tmp_path / "types3.txt"
    types3.write_text("8 1 1")
    for t in (types1, str(types2), types3):
        (c,) = nio.read_dataset(path, t)
        assert c.symbols == ("O", "H", "H")
    with pytest.raises(ValueError, match="not an existing file"):
        nio.read_dataset(path, str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("O Hx H")
    with pytest.raises(ValueError, match="'Hx'"):
        nio.read_dataset(path, bad)


def test_jsonl_needs_species_sequence(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record()])
    with pytest.raises(ValueError, match="species_sequence"):
        nio.read_dataset(path)


@pytest.mark.parametrize("key", ["Positions", "Cell-Size", "Energy", "Forces"])
def test_jsonl_missing_key(tmp_path, key):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record(), _record(**{key: _DROP})])
    with pytest.raises(ValueError, match=rf"line 2 \(configuration 1\): missing key '{key}'"):
        nio.read_dataset(path, ["O", "H", "H"])


def test_jsonl_labels_optional(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record(Energy=_DROP, Forces=_DROP)])
    (c,) = nio.read_dataset(path, ["O", "H", "H"], require_labels=False)
    assert c.energy is None and c.forces is None


def test_required_labels_subset(tmp_path):
    """require_labels=("energy",): forces may be missing (None), energies may not."""
    seq = ["O", "H", "H"]
    path = _write_jsonl(tmp_path / "d.jsonl", [_record(), _record(Forces=_DROP)])
    a, b = nio.read_dataset(path, seq, require_labels=("energy",))
    assert a.forces.shape == (3, 3) and b.forces is None and b.energy is not None
    with pytest.raises(ValueError, match=r"line 2 \(configuration 1\): missing key 'Forces'"):
        nio.read_dataset(path, seq)
    no_energy = _write_jsonl(tmp_path / "e.jsonl", [_record(Energy=_DROP)])
    with pytest.raises(ValueError, match="missing key 'Energy'"):
        nio.read_dataset(no_energy, seq, require_labels=("energy",))
    assert nio.read_dataset(no_energy, seq, require_labels="forces")[0].energy is None
    with pytest.raises(ValueError, match=r"unknown labels \['stress'\]"):
        nio.read_dataset(path, seq, require_labels=("energy", "stress"))


@pytest.mark.parametrize("over, msg", [
    ({"Natoms": 4}, "Natoms is 4 but Positions has 3 rows"),
    ({"Natoms": "3"}, "Natoms"),
    ({"Forces": [[0, 0, 0]] * 2}, r"Forces has shape \(2, 3\), expected \(3, 3\)"),
    ({"Forces": [[0, 0]] * 3}, "Forces has shape"),
    ({"Positions": [[0, 0, 0]] * 4, "Natoms": _DROP}, "species sequence has 3 entries"),
    ({"Positions": [[0, 0], [0, 0], [0, 0]]}, "Positions has shape"),
    ({"Positions": [[0, 0, 0], [0, 0], [0, 0, 0]]}, "ragged"),
    ({"Cell-Size": [1, 2]}, "Cell-Size has shape"),
    ({"Energy": "high"}, "Energy is 'high'"),
    ({"Energy": [1.0, 2.0]}, "Energy"),
])
def test_jsonl_inconsistent(tmp_path, over, msg):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record(), _record(), _record(**over)])
    with pytest.raises(ValueError, match=r"line 3 \(configuration 2\)") as ei:
        nio.read_dataset(path, ["O", "H", "H"])
    assert ei.match(msg)


@pytest.mark.parametrize("field", ["Positions", "Forces", "Energy", "Cell-Size"])
@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_jsonl_nonfinite(tmp_path, field, bad):
    rec = json.dumps(_record())
    if field == "Energy":
        line = rec.replace('"Energy": -10.5', f'"Energy": {bad}')
    else:
        r = _record()
        value = r[field]
        if isinstance(value[0], list):
            value[1][2] = "XX"
        else:
            value[1] = "XX"
        line = json.dumps(r).replace('"XX"', bad)
    assert bad in line
    path = _write_jsonl(tmp_path / "d.jsonl", [rec, line])
    with pytest.raises(ValueError, match=r"configuration 1\).*(NaN|not finite)"):
        nio.read_dataset(path, ["O", "H", "H"])


def test_jsonl_unknown_symbols_and_species(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_record()])
    with pytest.raises(ValueError, match="unknown element symbol 'Xx'"):
        nio.read_dataset(path, ["O", "Xx", "H"])
    with pytest.raises(ValueError, match="unknown atomic number"):
        nio.read_dataset(path, [8, 1, 0])
    with pytest.raises(ValueError, match=r"elements \['O'\] are not among"):
        nio.read_dataset(path, ["O", "H", "H"], species=["C", "H", "N"])
    (c,) = nio.read_dataset(path, ["O", "H", "H"], species=("H", "O"))
    assert c.symbols == ("O", "H", "H")


def test_jsonl_wrong_format(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not .*UTF-8|not valid JSON"):
        nio.read_dataset(p, ["O", "H", "H"])
    p.write_text(json.dumps(_record(), indent=2))
    with pytest.raises(ValueError, match="line 1.*not valid JSON.*one complete JSON object"):
        nio.read_dataset(p, ["O", "H", "H"])
    p.write_text("[1, 2, 3]\n")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        nio.read_dataset(p, ["O", "H", "H"])
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="no configurations"):
        nio.read_dataset(p, ["O", "H", "H"])
    with pytest.raises(FileNotFoundError):
        nio.read_dataset(tmp_path / "missing.jsonl", ["O"])


def test_format_detection_by_content(tmp_path):
    p = _write_jsonl(tmp_path / "data", [_record()])  # no extension
    (c,) = nio.read_dataset(p, ["O", "H", "H"])
    assert c.n_atoms == 3
    with pytest.raises(ValueError, match="only used for NeuralIL JSON Lines"):
        nio.read_dataset(p, ["O", "H", "H"], fmt="extxyz")


def _configs():
    rng = np.random.default_rng(5)
    out = []
    for k in range(3):
        n = 2 + k
        out.append(nio.Configuration(
            symbols=("C",) + ("H",) * (n - 1),
            positions=rng.uniform(0, 4, (n, 3)),
            cell=np.diag([4.0, 5.0, 6.0]) + (0.5 if k else 0.0) * np.eye(3)[::-1],
            pbc=(True, True, k != 2),
            energy=-1.25 * (k + 1),
            forces=rng.normal(size=(n, 3)),
            stress=rng.normal(size=6) if k else None,
        ))
    return out


def test_extxyz_roundtrip(tmp_path):
    confs = _configs()
    p = tmp_path / "d.extxyz"
    nio.write_dataset(p, confs)
    back = nio.read_dataset(p)
    assert len(back) == 3
    for a, b in zip(confs, back):
        assert a.symbols == b.symbols
        # extxyz stores 8 decimals
        np.testing.assert_allclose(b.positions, a.positions, rtol=0, atol=1e-7)
        np.testing.assert_allclose(b.cell, a.cell, rtol=0, atol=1e-7)
        assert a.pbc.tolist() == b.pbc.tolist()
        assert b.energy == pytest.approx(a.energy, abs=1e-7)
        np.testing.assert_allclose(b.forces, a.forces, rtol=0, atol=1e-7)
        if a.stress is None:
            assert b.stress is None
        else:
            np.testing.assert_allclose(b.stress, a.stress, rtol=0, atol=1e-7)
    # .xyz extension and explicit format, species check
    p2 = tmp_path / "d.xyz"
    nio.write_dataset(p2, confs)
    assert len(nio.read_dataset(p2, fmt="extxyz", species=["C", "H"])) == 3
    with pytest.raises(ValueError, match=r"configuration 0: elements \['C'\]"):
        nio.read_dataset(p2, species=["H", "O"])


def test_ase_missing_labels_and_nonfinite(tmp_path):
    from ase import Atoms
    from ase.io import write

    p = tmp_path / "nolabels.extxyz"
    write(p, [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]], cell=[3, 3, 3], pbc=True)])
    with pytest.raises(ValueError, match="configuration 0: no energy or forces label"):
        nio.read_dataset(p)
    (c,) = nio.read_dataset(p, require_labels=False)
    assert c.energy is None and c.forces is None
    with pytest.raises(ValueError, match="configuration 0: no energy label"):
        nio.read_dataset(p, require_labels=("energy",))
    from ase.calculators.singlepoint import SinglePointCalculator

    energy_only = tmp_path / "energy_only.extxyz"
    atoms = nio.to_atoms(_configs()[0])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.5)
    write(energy_only, [atoms])
    with pytest.raises(ValueError, match="configuration 0: no forces label"):
        nio.read_dataset(energy_only)
    (c,) = nio.read_dataset(energy_only, require_labels=("energy",))
    assert c.energy == -1.5 and c.forces is None

    confs = _configs()
    confs[1].forces[0, 0] = np.nan  # bypass the constructor check on purpose
    p2 = tmp_path / "nan.extxyz"
    nio.write_dataset(p2, confs)
    with pytest.raises(ValueError, match="configuration 1: forces contains NaN"):
        nio.read_dataset(p2)


def test_labelled_configuration_without_atoms(tmp_path):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    empty = Atoms(cell=[3, 3, 3], pbc=True)
    empty.calc = SinglePointCalculator(empty, energy=0.0, forces=np.zeros((0, 3)))
    p = tmp_path / "empty_frame.extxyz"
    write(p, [nio.to_atoms(c) for c in _configs()[:2]] + [empty])
    with pytest.raises(ValueError, match="configuration 2 has no atoms"):
        nio.read_dataset(p)
    assert nio.read_dataset(p, require_labels=False)[2].n_atoms == 0


def test_ase_wrong_format(tmp_path):
    p = tmp_path / "d.xyz"
    p.write_text(json.dumps(_record()) + "\n")
    with pytest.raises(ValueError, match="could not be read as extxyz"):
        nio.read_dataset(p)
    q = tmp_path / "garbage.dat"
    q.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="could not be read"):
        nio.read_dataset(q)


def test_configuration_validation():
    good = dict(symbols=("H", "H"), positions=np.zeros((2, 3)), cell=np.eye(3),
                pbc=True)
    c = nio.Configuration(**good)
    assert c.pbc.tolist() == [True] * 3 and c.positions.dtype == np.float64
    c2 = nio.Configuration(**{**good, "stress": np.arange(9.0).reshape(3, 3)})
    np.testing.assert_array_equal(c2.stress, [0, 4, 8, 5, 2, 1])
    with pytest.raises(ValueError, match="positions has shape"):
        nio.Configuration(**{**good, "positions": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="energy is not finite"):
        nio.Configuration(**good, energy=float("nan"))
    with pytest.raises(ValueError, match="positions contains NaN"):
        nio.Configuration(**{**good, "positions": [[0, 0, 0], [0, np.inf, 0]]})
    with pytest.raises(ValueError, match="unknown element"):
        nio.Configuration(**{**good, "symbols": ("H", "Q")})
    with pytest.raises(ValueError, match="not a string"):
        nio.Configuration(**{**good, "symbols": "HH"})
    flat = np.diag([3.0, 3.0, 0.0])  # periodic in z without a z extent
    with pytest.raises(ValueError, match=r"degenerate \(singular\) cell"):
        nio.Configuration(**{**good, "cell": flat})
    assert nio.Configuration(**{**good, "cell": flat, "pbc": [True, True, False]}).n_atoms == 2


def test_reader_names_the_configuration_with_a_degenerate_cell(tmp_path):
    from ase.io import write

    frames = [nio.to_atoms(c) for c in _configs()[:2]]
    frames[1].cell[2] = frames[1].cell[0]          # two equal lattice vectors
    p = tmp_path / "flat.extxyz"
    write(p, frames)
    with pytest.raises(ValueError, match=r"configuration 1: degenerate \(singular\) cell"):
        nio.read_dataset(p)


def test_to_atoms_and_back():
    for conf in _configs():
        atoms = nio.to_atoms(conf)
        assert atoms.get_chemical_symbols() == list(conf.symbols)
        np.testing.assert_array_equal(atoms.get_positions(), conf.positions)
        np.testing.assert_array_equal(atoms.cell[:], conf.cell)
        assert atoms.get_potential_energy() == conf.energy
        np.testing.assert_array_equal(atoms.get_forces(), conf.forces)
        if conf.stress is not None:
            np.testing.assert_array_equal(atoms.get_stress(), conf.stress)
        back = nio.from_atoms(atoms, require_labels=True)
        assert back.symbols == conf.symbols and back.energy == conf.energy
        np.testing.assert_array_equal(back.forces, conf.forces)
    bare = nio.Configuration(("H",), [[0, 0, 0]], np.eye(3), False)
    assert nio.to_atoms(bare).calc is None


@pytest.mark.shared
@needs_jsonl
def test_shared_ean_jsonl():
    seq = nio.ean_species_sequence(15)
    confs = nio.read_dataset(EAN_JSONL, seq, species=("C", "H", "N", "O"))
    assert len(confs) == 60
    raw = [json.loads(line) for line in EAN_JSONL.read_text().splitlines() if line.strip()]
    for k, (c, r) in enumerate(zip(confs, raw)):
        assert c.n_atoms == 225 and c.symbols == seq
        # 7 of the 60 lines store 12.9 rounded to float32: kept as given
        np.testing.assert_array_equal(c.cell, np.diag(r["Cell-Size"]))
        np.testing.assert_allclose(c.cell, np.diag([12.9, 12.9, 12.9]), rtol=0, atol=1e-6)
        assert c.pbc.all()
        np.testing.assert_array_equal(c.positions, np.array(r["Positions"]))  # not wrapped
        np.testing.assert_array_equal(c.forces, np.array(r["Forces"]))
        assert c.energy == r["Energy"]
        assert c.info["source_line"] == k + 1
    energies = np.array([c.energy for c in confs])
    assert int(np.argmax(energies)) == 41  # the outlier named in the README
    atoms = nio.to_atoms(confs[0])
    assert len(atoms) == 225 and atoms.get_potential_energy() == confs[0].energy


@pytest.mark.shared
@needs_jsonl
def test_shared_ean_jsonl_with_wrong_sequence():
    with pytest.raises(ValueError, match=r"line 1 \(configuration 0\).*species sequence has 210"):
        nio.read_dataset(EAN_JSONL, nio.ean_species_sequence(14))
