"""``neuralil-fast train DATA --species C H N O --out model.nil``: train on energies and forces.

Every input problem (unreadable data, NaN labels, atom counts that do not match
the species sequence, elements the model does not know, inconsistent options)
is reported as a one-line error before any training starts (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="training data: extxyz (or any ASE format with energies, and "
                   "forces where known) or NeuralIL JSON Lines")
    p.add_argument("--species", nargs="+", required=True, help="element symbols of the model")
    p.add_argument("--out", required=True, help="where to write the trained model (nf.save format)")
    p.add_argument("--valid", help="validation data (else a random split of DATA)")
    seq = p.add_mutually_exclusive_group()
    seq.add_argument("--species-sequence", nargs="+", metavar="SYMBOL_OR_FILE",
                     help="JSON Lines: the element of each atom, or one types file")
    seq.add_argument("--ean-pairs", type=int, metavar="N",
                     help="JSON Lines: EAN atom order with N ion pairs (15 for the shared data)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="validation split: numpy default_rng(seed).permutation (default 0)")
    p.add_argument("--n-valid", type=int,
                   help="configurations held out for validation (default: 10%%, at least 1)")
    p.add_argument("--outliers", type=int, nargs="*", default=[],
                   help="indices of configurations in DATA (in --valid's file where given) "
                   "whose validation metrics are also reported without them")
    p.add_argument("--epochs", type=int,
                   help="epochs to train (default 100, or unlimited with --max-minutes)")
    p.add_argument("--max-minutes", type=float, help="stop after the epoch that exceeds this")
    p.add_argument("--patience", type=int, help="early stopping: epochs without improvement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--committee", type=int, default=1, metavar="K",
                   help="train K independently initialised models on the same batches")
    p.add_argument("--loss", default="logcosh-norm",
                   choices=("logcosh-norm", "logcosh-components", "mse"))
    only = p.add_mutually_exclusive_group()
    only.add_argument("--energy-only", action="store_true",
                      help="train on energies only (the data may lack forces)")
    only.add_argument("--forces-only", action="store_true",
                      help="train on forces only, fit the energy offset afterwards")
    p.add_argument("--force-weight", type=float, default=0.5)
    p.add_argument("--energy-weight", type=float, default=0.5)
    p.add_argument("--lr-start", type=float, default=1e-3)
    p.add_argument("--lr-peak", type=float, default=1e-2)
    p.add_argument("--lr-end", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="epoch", choices=("epoch", "run"),
                   help="one-cycle LR per epoch (the article) or over the whole run, planned "
                   "from --epochs or from what fits in --max-minutes (better in a budget)")
    p.add_argument("--warmup-epochs", type=int, default=5,
                   help="--schedule run: epochs of linear warm-up to --lr-peak")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the parameters (decay per "
                        "step, e.g. 0.99); validation, keep-best and the saved model use it")
    p.add_argument("--size-groups", type=int, default=1, metavar="G",
                   help="data of mixed sizes: draw each batch from one of up to G groups of "
                        "similar atom counts, padded to its own largest (one compilation "
                        "per group; default 1: every batch padded to the largest "
                        "configuration)")
    p.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "numba", "triton"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--resume", action="store_true",
                   help="continue from the training state file (--state) bit for bit")
    p.add_argument("--state", help="training state file (default: OUT.state)")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="write the state, best model and log at most this often (and after "
                   "the first and last epochs; 0: after every epoch)")
    p.add_argument("--log", help="JSON log of the run (per epoch metrics)")
    p.add_argument("--parity", help="parity plot PNG of the validation set (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("model")
    m.add_argument("--r-cut", type=float, default=3.5, help="cutoff radius, Å")
    m.add_argument("--n-max", type=int, default=4)
    m.add_argument("--embed-dim", type=int, default=2)
    m.add_argument("--widths", type=int, nargs="+", default=[64, 32, 16, 16, 16])
    m.add_argument("--activation", default="swish", choices=("swish", "selu"),
                   help="selu: the ablation without LayerNorm")
    m.add_argument("--no-element-resolved", action="store_true",
                   help="ablation: one neighbour density for all species")
    m.add_argument("--no-morse", action="store_true", help="leave out the repulsive Morse term")
    m.add_argument("--species-energies", default="auto", choices=("auto", "fit", "none"),
                   help="a fixed reference energy per species, fitted by least squares to the "
                        "training energies before training, so that the network learns "
                        "the rest (auto: where the training compositions vary; default)")
    m.add_argument("--core-repulsion", action="store_true",
                   help="add a fixed ZBL wall below each species pair's closest approach in "
                        "the training data (zero on the training data; see NeuralIL)")


def _fail(msg):
    from ..cli import UserError

    raise UserError(msg)


def _read(path, args, species):
    from ..io import ean_species_sequence, read_dataset

    seq = None
    if args.ean_pairs is not None:
        seq = ean_species_sequence(args.ean_pairs)
    elif args.species_sequence:
        seq = args.species_sequence[0] if len(args.species_sequence) == 1 and \
            os.path.isfile(args.species_sequence[0]) else tuple(args.species_sequence)
    try:
        # forces are optional: configurations without them train on their energy only
        return read_dataset(path, species_sequence=seq, species=species,
                            require_labels=("energy",))
    except FileNotFoundError as err:
        _fail(str(err))
    except ValueError as err:
        _fail(str(err).splitlines()[0])


def _check_forces(loss, train_configs, valid_configs):
    """Fail when the loss needs forces that no training configuration carries (before the
    neighbour lists; ``Trainer`` checks the same for API users); say how many
    configurations lack forces (they enter the energy term and metrics only)."""
    if not loss.uses_forces:
        return
    n_train = sum(c.forces is None for c in train_configs)
    n_valid = sum(c.forces is None for c in valid_configs)
    if n_train == len(train_configs):
        _fail("the training data carries no forces: train on energies with --energy-only")
    if n_train or n_valid:
        print(f"note: {n_train} of {len(train_configs)} training and {n_valid} of "
              f"{len(valid_configs)} validation configurations carry no forces: they enter "
              "the energy term and the energy metrics only", file=sys.stderr)
    if n_valid == len(valid_configs) and valid_configs:
        print("note: the validation data carries no forces: keep-best and early stopping "
              "follow the validation energy MAE", file=sys.stderr)


def _padding_note(trainer):
    """Say when most atom slots of the training batches are padding, and what size groups
    would leave (data of mixed sizes)."""
    from .data import epoch_slots, size_groups

    atoms = float(np.sum(np.asarray(trainer.train.n_atoms)))
    now = atoms / epoch_slots(trainer.train_groups, trainer.batch)
    if now < 0.5:
        hint = ""
        if trainer.cfg.size_groups < 4:
            four = atoms / epoch_slots(size_groups(trainer.train, 4, trainer.batch),
                                       trainer.batch)
            hint = f"; --size-groups 4 would make it {100 * four:.0f}%"
        print(f"note: real atoms fill {100 * now:.0f}% of the training batches' atom slots "
              f"(configurations of mixed sizes, padded to the largest in their group){hint}",
              file=sys.stderr)


def _table(model) -> str:
    return ", ".join(f"{s} {e:.4f}" for s, e in zip(model.species, model.species_energies))


def _with_species_energies(args, model, train, energy64):
    """``model`` with the species energies fitted to the training data, where asked for
    (auto: where the compositions vary; one composition leaves one common offset, which
    the network's bias already fits)."""
    import dataclasses

    from .data import compositions_vary, fit_species_energies, species_counts

    counts = species_counts(train, model.n_species)
    varies = compositions_vary(counts)
    if args.species_energies == "none" or (args.species_energies == "auto" and not varies):
        return model
    model = dataclasses.replace(model, species_energies=tuple(
        fit_species_energies(counts, energy64)))
    print(f"species energies (eV/atom, least squares on the training energies): "
          f"{_table(model)}", file=sys.stderr)
    return model


def _fmt(metrics: dict, key: str, spec: str, unit: str) -> str:
    return f"{metrics[key]:{spec}} {unit}" if key in metrics else "n/a"


def _write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def run(args) -> int:
    import jax

    from ..model import NeuralIL
    from .losses import LossConfig

    out = Path(args.out)
    state_path = Path(args.state) if args.state else out.with_name(out.name + ".state")
    # ---------------------------------------------------------------- options
    if args.epochs is None and args.max_minutes is None:
        args.epochs = 100
    if args.epochs is not None and args.epochs < 0:
        _fail("--epochs must be >= 0")
    if args.warmup_epochs < 0:
        _fail("--warmup-epochs must be >= 0")
    if args.batch_size < 1 or args.committee < 1:
        _fail("--batch-size and --committee must be >= 1")
    if not args.checkpoint_seconds >= 0:
        _fail("--checkpoint-seconds must be >= 0")
    if args.resume and not state_path.is_file():
        _fail(f"--resume: no training state at {state_path}")
    if args.parity:
        from .plots import require_matplotlib

        try:
            require_matplotlib()
        except ValueError as err:
            _fail(str(err))
    outputs = {"--out": out, "--state": state_path, "--log": args.log, "--parity": args.parity}
    for flag, path in outputs.items():
        if path is not None and not Path(path).parent.is_dir():
            _fail(f"{flag}: folder {Path(path).parent} does not exist")
    try:
        model = NeuralIL(species=tuple(args.species), r_cut=args.r_cut, n_max=args.n_max,
                         embed_dim=args.embed_dim, widths=tuple(args.widths),
                         activation=args.activation, morse=not args.no_morse,
                         element_resolved=not args.no_element_resolved)
        fw, ew = args.force_weight, args.energy_weight
        if args.energy_only:
            fw = 0.0
        if args.forces_only:
            ew = 0.0
        loss = LossConfig(kind=args.loss, force_weight=fw, energy_weight=ew)
    except ValueError as err:
        _fail(str(err))
    # ---------------------------------------------------------------- data
    configs = _read(args.data, args, model.species)
    ids = np.arange(len(configs))
    if args.valid:
        valid_configs = _read(args.valid, args, model.species)
        train_ids, valid_ids = ids, np.arange(len(valid_configs))
        train_configs = configs
    else:
        n_valid = args.n_valid if args.n_valid is not None else max(1, round(0.1 * len(configs)))
        if len(configs) < 2:
            _fail(f"{args.data} holds {len(configs)} configuration(s): need at least 2 to "
                  "split off a validation set (or pass --valid)")
        try:
            from .data import split_indices

            train_ids, valid_ids = split_indices(len(configs), n_valid, args.split_seed)
        except ValueError as err:
            _fail(str(err))
        train_configs = [configs[i] for i in train_ids]
        valid_configs = [configs[i] for i in valid_ids]
    # outliers index the validation file where there is one, else DATA
    source, n = (args.valid, len(valid_configs)) if args.valid else (args.data, len(configs))
    bad = [k for k in args.outliers if not 0 <= k < n]
    if bad:
        _fail(f"--outliers: indices {bad} are outside 0..{n - 1} ({source} holds {n} "
              "configurations)")
    trained = sorted(set(args.outliers) - set(int(i) for i in valid_ids))
    if trained:
        print(f"note: --outliers {trained} are training configurations (not in the validation "
              "set): the metrics without outliers leave out validation configurations only",
              file=sys.stderr)
    _check_forces(loss, train_configs, valid_configs)
    with jax.enable_x64(args.dtype == "float64"):
        return _train(args, model, loss, train_configs, valid_configs, train_ids, valid_ids,
                      out, state_path)


def _train(args, model, loss, train_configs, valid_configs, train_ids, valid_ids, out,
           state_path):
    from ..backends import resolve_backend
    from ..committee import member, save_committee
    from ..model import save
    from .data import group_configurations, pad_configurations, take
    from .loop import TrainConfig, Trainer

    try:
        backend = resolve_backend(args.backend)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                          committee=args.committee, seed=args.seed, data_seed=args.split_seed,
                          lr_start=args.lr_start, lr_peak=args.lr_peak, lr_end=args.lr_end,
                          weight_decay=args.weight_decay, schedule=args.schedule,
                          warmup_epochs=args.warmup_epochs, patience=args.patience,
                          max_minutes=args.max_minutes, backend=backend, loss=loss,
                          ema=args.ema, size_groups=args.size_groups)
    except ValueError as err:
        _fail(str(err))
    dtype = np.float64 if args.dtype == "float64" else np.float32
    progress = not args.no_progress
    from tqdm import tqdm

    all_configs = list(train_configs) + list(valid_configs)
    n_train = len(train_configs)
    with tqdm(total=len(all_configs), desc="neighbour lists", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        if cfg.size_groups == 1:  # one padding for both sets: prediction compiles once
            data = pad_configurations(all_configs, model.species, model.r_cut, backend,
                                      dtype, progress=bar.update)
            train = take(data, np.arange(n_train))
            valid = take(data, np.arange(n_train, len(all_configs)))
        else:  # each set in the trainer's size groups, never padded to the largest
            train, valid = (group_configurations(
                configs, model.species, model.r_cut, backend, dtype, cfg.size_groups, batch,
                progress=bar.update) if configs else None
                for configs, batch in ((train_configs, min(cfg.batch_size, n_train)),
                                       (valid_configs, 1)))
    if args.core_repulsion:
        import dataclasses

        from .data import closest_approach

        model = dataclasses.replace(
            model, core_repulsion=closest_approach(train, model.n_species, model.r_cut))
    model = _with_species_energies(args, model, train, [c.energy for c in train_configs])
    trainer = Trainer(model, train, valid, cfg, valid_ids=valid_ids, outliers=args.outliers,
                      valid_energy64=[c.energy for c in valid_configs],
                      train_energy64=[c.energy for c in train_configs])
    _padding_note(trainer)
    state = trainer.load_state(state_path) if args.resume else trainer.init_state()

    log = {"command": "train", "data": str(args.data), "valid_data": args.valid,
           "model": model.to_config(), "settings": cfg.identity() | {
               "epochs": cfg.epochs, "patience": cfg.patience, "max_minutes": cfg.max_minutes},
           "backend": backend, "dtype": args.dtype, "n_train": len(train_configs),
           "n_valid": len(valid_configs), "train_ids": [int(i) for i in train_ids],
           "valid_ids": [int(i) for i in valid_ids], "outliers": list(args.outliers),
           "epochs": state.history}

    def write_model(params):
        if cfg.committee == 1:
            save(out, model, member(params, 0))
        else:
            save_committee(out, model, params)

    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc="train", unit="epoch",
               disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()

    def on_epoch(st, entry):
        v = entry["valid"].get("all", {})
        if st.planned_steps and bar.total != st.planned_steps // trainer.steps_per_epoch:
            bar.total = st.planned_steps // trainer.steps_per_epoch  # the planned run
        bar.update(1)
        shown = {"loss": f"{entry['train_loss']:.4g}"}
        if "force_mae_mev_A" in v:
            shown["F"] = f"{v['force_mae_mev_A']:.1f}meV/Å"
        shown["E"] = f"{v.get('energy_mae_mev_atom', math.nan):.2f}meV/at"
        bar.set_postfix(shown, t=f"{time.perf_counter() - t0:.0f}s")

    model_epoch = [None]

    def on_checkpoint(st):
        if st.best_epoch != model_epoch[0]:      # the best model so far, beside the state
            write_model(st.best_params)
            model_epoch[0] = st.best_epoch
        if args.log:
            _write_json(args.log, log)

    from .loop import TrainingDiverged

    diverged = None
    try:
        state = trainer.fit(state, state_path=state_path, on_epoch=on_epoch,
                            on_checkpoint=on_checkpoint,
                            checkpoint_seconds=args.checkpoint_seconds)
    except TrainingDiverged as err:  # finish with the best model, then fail
        diverged = err
        log["diverged"] = {"epoch": err.epoch, "best_epoch": err.best_epoch}
    bar.close()
    if diverged is not None and not diverged.best_epoch:
        if args.log:
            _write_json(args.log, log)
        _fail(f"{diverged}; no model written")
    final = trainer.final_params(state)
    if trainer.model != model:  # trained on forces only: the species energies refitted
        model = trainer.model
        log["model"] = model.to_config()
        print(f"species energies refitted after training on forces: {_table(model)}",
              file=sys.stderr)
    write_model(final)
    final_metrics = trainer.validate(final)
    log["epochs"] = state.history
    log["final"] = {"best_epoch": state.best_epoch, "epochs_run": state.epoch,
                    "planned_steps": state.planned_steps,
                    "valid": final_metrics, "wall_time_s": state.elapsed}
    if args.log:
        _write_json(args.log, log)
    if args.parity:
        from .plots import parity_plot

        E, F, F_ref, _ = trainer.committee_mean(final, trainer.valid)
        n = np.asarray(valid.n_atoms, np.float64)
        e_ref = np.array([c.energy for c in valid_configs]) / n
        parity_plot(args.parity, F_ref, F, e_ref, E / n,
                    title=f"{model.species} validation, epoch {state.best_epoch}",
                    highlight=np.isin(valid_ids, args.outliers) if args.outliers else None)
    m = final_metrics.get("all", {})
    print(f"trained {state.epoch} epochs ({state.elapsed:.0f} s); best epoch {state.best_epoch}; "
          f"validation energy MAE {_fmt(m, 'energy_mae_mev_atom', '.3f', 'meV/atom')}, "
          f"force MAE {_fmt(m, 'force_mae_mev_A', '.2f', 'meV/Å')}; wrote {out}")
    if "without_outliers" in final_metrics:
        w = final_metrics["without_outliers"]
        print(f"without outliers {list(args.outliers)}: energy MAE "
              f"{_fmt(w, 'energy_mae_mev_atom', '.3f', 'meV/atom')}, force MAE "
              f"{_fmt(w, 'force_mae_mev_A', '.2f', 'meV/Å')}")
    if diverged is not None:
        _fail(f"{diverged}; {out} holds the model of epoch {diverged.best_epoch} (the state "
              "file its last checkpoint before the divergence)")
    return 0
