"""Where the time of a training step goes, and the speed-up the kernels alone could give.

    python benchmarks/profile_training_step.py [--committee K] [--steps S] [--json out.json]

The step of ``benchmarks/test_bench_training.py`` (a batch of the first 8 EAN
configurations, 1 800 atoms, float32, the article's model, AdamW): blocks of S numba
steps and S reference steps alternate, three of each, in one process (wall time, untraced),
then S numba steps run under JAX's profiler and the trace's XLA op times are summed by
kind:

    descriptor kernels   the numba FFI calls (forward, its vjp, the vjp's jvp)
    dots                 XLA dots and the YNNPACK fusions (which the step keeps to dots)
    gathers / scatters   fusions that gather or scatter (pair terms, batch row maps)
    loops                while loops (searchsorted of the pair offsets)
    element-wise         every other fusion: activations, LayerNorms, AdamW, copies

Printed: that table (ms per step), the measured ratio t_reference / t_numba (median
and min wall times) and its bound with the descriptor kernels at zero cost,
t_reference / (t_numba - t_kernels): no kernel work can take the step past it.  Also
printed: the op time of other XLA ops that overlaps the kernels (zero for one model,
where subtracting the kernels' time from the wall time is then exact).

Then S reference steps run under the profiler too, and both paths' busy time (the wall
time during which any op of a role runs, on either core) is split by role, from the name
scope of each op's (each fusion's root's) source: the descriptors and their derivatives
(``descriptors.descriptors``: the kernels, or the reference path's XLA ops), the networks
(``AtomicNetwork``), the pair terms (``model.pair_atomic_energies``), and the rest (loss,
AdamW, batch bookkeeping).  The descriptors' ratio is the speed-up of the part of the
step the kernels replace.  Needs ../shared (the EAN data).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from conftest import EAN, ean_training_batch, training_step

BLOCKS = 3
KINDS = ("descriptor kernels", "dots", "gathers / scatters", "loops", "element-wise")
ROLES = ("descriptors", "networks", "pair terms", "loss, AdamW, rest")


def _role(line: str) -> str:
    """The role of an HLO instruction, from the name scopes in its op_name metadata."""
    m = re.search(r'op_name="([^"]*)"', line)
    op_name = m.group(1) if m else ""
    if "descriptors" in op_name:
        return "descriptors"
    if "AtomicNetwork" in op_name:
        return "networks"
    if "pair_terms" in op_name:
        return "pair terms"
    return "loss, AdamW, rest"


def _hlo_ops(trainer, inputs) -> tuple[dict[str, str], dict[str, str]]:
    """Instruction name -> kind, and -> role, from the compiled step's HLO text."""
    from neuralil_fast.training import loop

    text = loop._jitted_train_step().lower(
        *inputs, model=trainer.model, backend=trainer.backend, loss=trainer.cfg.loss,
        opt=trainer._opt_key).compile().as_text()
    kinds, roles = {}, {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\S+?)\(", line)
        if not m:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z\-]+)\(", line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        roles.setdefault(name, _role(line))
        if op == "custom-call" and "ffi" in name:
            kind = "descriptor kernels"
        elif op == "dot" or name.startswith(("ynn_fusion", "dot")):
            kind = "dots"
        elif op == "while":
            kind = "loops"
        elif "gather" in name or "scatter" in name:
            kind = "gathers / scatters"
        else:
            kind = "element-wise"
        kinds.setdefault(name, kind)
    return kinds, roles


def _op_events(trace_dir: str, kinds: dict[str, str]):
    """The trace's complete events of the step's HLO instructions, outermost only."""
    path = next(Path(trace_dir).rglob("*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("name") in kinds),
                 key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    outer, end = [], {}
    for e in ops:  # drop events nested in another op on the same thread (loop bodies)
        if e["ts"] + e["dur"] <= end.get(e["tid"], -1):
            continue
        end[e["tid"]] = e["ts"] + e["dur"]
        outer.append(e)
    return outer


def _traced_events(step, steps: int, names) -> list:
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(step())
        return _op_events(tmp, names)


def _ms_by(events, label: dict[str, str], steps: int) -> collections.Counter:
    """Op time per step (ms) by label: the summed durations (two threads count twice)."""
    out = collections.Counter()
    for e in events:
        out[label[e["name"]]] += e["dur"] / steps / 1e3  # µs -> ms per step
    return out


def _busy_ms_by(events, label: dict[str, str], steps: int) -> collections.Counter:
    """Busy time per step (ms) by label: the length of the union of its ops' intervals
    over all threads, i.e. the wall time during which any op of that label runs (an op
    split over both cores, or a numba kernel's two threads, counts once)."""
    spans = collections.defaultdict(list)
    for e in events:
        spans[label[e["name"]]].append((e["ts"], e["ts"] + e["dur"]))
    out = collections.Counter()
    for key, iv in spans.items():
        iv.sort()
        total, start, stop = 0.0, *iv[0]
        for a, b in iv[1:]:
            if a > stop:
                total, start = total + stop - start, a
            stop = max(stop, b)
        out[key] = (total + stop - start) / steps / 1e3
    return out


def profile(committee: int, steps: int) -> dict:
    import jax

    batch = ean_training_batch()
    ref_trainer, ref_step, ref_inputs = training_step(batch, "reference", committee)
    trainer, step, inputs = training_step(batch, "numba", committee)
    walls = {"numba": [], "reference": []}
    for fn in (step, ref_step):  # warm-up
        jax.block_until_ready(fn())
    # blocks of consecutive steps, as in training (one step right after the other's
    # large arrays ran 1.2-1.5x slower), the blocks of the two alternating
    for _ in range(BLOCKS):
        for name, fn in (("numba", step), ("reference", ref_step)):
            for _ in range(steps):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                walls[name].append(time.perf_counter() - t0)

    kinds, roles = _hlo_ops(trainer, inputs)
    events = _traced_events(step, steps, kinds)
    by_kind = _ms_by(events, kinds, steps)
    ref_roles = _hlo_ops(ref_trainer, ref_inputs)[1]
    by_role = {"numba": _busy_ms_by(events, roles, steps),
               "reference": _busy_ms_by(_traced_events(ref_step, steps, ref_roles),
                                        ref_roles, steps)}
    kernels = [e for e in events if kinds[e["name"]] == "descriptor kernels"]
    overlap = 0.0
    for k in kernels:
        for e in events:
            if e is not k:
                overlap += max(0.0, min(e["ts"] + e["dur"], k["ts"] + k["dur"])
                               - max(e["ts"], k["ts"]))
    ms = {name: {"min": 1e3 * float(np.min(w)), "median": 1e3 * float(np.median(w))}
          for name, w in walls.items()}
    t_kern = by_kind["descriptor kernels"]
    return {
        "committee": committee, "steps": steps * BLOCKS,
        "numba_ms": ms["numba"], "reference_ms": ms["reference"],
        "op_ms_per_step": {k: by_kind[k] for k in KINDS},
        "kernel_overlap_ms_per_step": overlap / steps / 1e3,
        "busy_ms_per_step_by_role": {path: {r: by_role[path][r] for r in ROLES}
                                   for path in by_role},
        "descriptor_ratio": by_role["reference"]["descriptors"]
        / by_role["numba"]["descriptors"],
        "ratio": {s: ms["reference"][s] / ms["numba"][s] for s in ("min", "median")},
        "ratio_bound_free_kernels": {s: ms["reference"][s] / (ms["numba"][s] - t_kern)
                                     for s in ("min", "median")},
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--committee", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not EAN.is_file():
        print(f"EAN data {EAN} is absent (../shared beside the checkout)", file=sys.stderr)
        return 2
    res = profile(args.committee, args.steps)
    print(f"training step, batch of 8 EAN configurations, committee {args.committee}, "
          f"{BLOCKS} blocks of {args.steps} steps")
    for name in ("numba", "reference"):
        print(f"  {name:9s} {res[name + '_ms']['median']:7.2f} ms median "
              f"({res[name + '_ms']['min']:.2f} min)")
    print("  numba step, XLA op time per step (two cores: can exceed the wall time):")
    for k, v in res["op_ms_per_step"].items():
        print(f"    {k:20s} {v:7.2f} ms")
    print(f"    (other ops during the kernels: {res['kernel_overlap_ms_per_step']:.3f} ms)")
    print("  busy (wall) time per step by role:   numba  reference")
    for r in ROLES:
        print(f"    {r:24s} {res['busy_ms_per_step_by_role']['numba'][r]:7.2f} ms "
              f"{res['busy_ms_per_step_by_role']['reference'][r]:8.2f} ms")
    print(f"  the descriptors (what the kernels replace): {res['descriptor_ratio']:.1f}x "
          "less busy time on the numba path")
    for stat in ("median", "min"):
        print(f"  ratio reference / numba by the {stat}: {res['ratio'][stat]:.1f}x; with the "
              f"descriptor kernels free: at most {res['ratio_bound_free_kernels'][stat]:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
