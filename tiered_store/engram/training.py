"""``tiered-store train``: train a small EngramLM on a corpus with its Engram tables in the store.

Every Engram layer's table is one slice of a single trainable table file (``tables.npy``: rows of
``[weights | row-wise optimizer state]``), served through one ``TieredStore``, so a single LMDB
commit makes a step durable for every layer. The dense weights train with Adam.

A checkpoint at step S: ``dense-S.pt`` (dense weights + Adam state, written atomically), then
``loss.csv``, then ``store.commit(S)`` (the commit point), then ``committed.json`` records S (and
the run's id, which the table's manifest holds too), then the older ``dense-S.pt`` are removed.
``--resume`` reads the table's committed step S and ``dense-S.pt``, and finishes a checkpoint a
kill cut short after its commit (records S, removes the older ``dense-S.pt``): a run stopped
anyhow (kill -9 included) goes on from its last checkpoint, and deterministically: the resumed run computes what
an uninterrupted one would. A table behind the step the run recorded (its delta lost, say by a
copy without -r), or a record of another run's, is refused, nothing changed. ``loss.csv`` logs
every step, ``loss.png`` plots it.

``--device cuda`` computes on the GPU with the hot tier there. ``--precision bf16`` or ``fp16``
runs the model under ``torch.autocast`` (the tables' rows stay float32); ``fp16`` scales the loss
with a ``GradScaler`` (saved in the checkpoints) that the tables' steps follow: a step whose
gradients overflow, the dense weights' or the rows', changes no row and no dense weight, and
is not counted in Adam's steps (a row stored NaN, not an overflow, stops the run naming it) (the rows' bias correction counts applied steps, as the dense
Adam does; ``dense-S.pt`` records the count).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import math
import numbers
import os
import pickle
import re
import sys
import time
import uuid
import warnings
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from ..atomic_file import atomic_write, hidden_temporaries, make_named_dir, write_step
from ..capacity import resolve_capacity
from ..cli_args import (
    DocHelpFormatter,
    at_least,
    capacity,
    command_help,
    device_name,
    given_path,
    output_folder,
    positive_number,
    saying_made,
)
from ..cold_table import IO_MODES
from ..config import check_device, expand_home, load_yaml, naming_file, path_text_problem
from ..corpus import Corpus, CorpusError, corpus_paths, resolve_corpus
from ..delta.row_delta import delta_path
from ..delta.row_optimizers import OPTIMIZERS, make_row_optimizer
from ..delta.table_versions import (
    check_current_version,
    current_version,
    has_history,
    release,
    take_writer_lock,
)
from ..delta.trainable import TableSlice, TrainableTable, create_trainable_table
from ..errors import ConfigError, TieredStoreError, TierIOError, shown
from ..integers import as_integer
from ..store import TieredStore, UncommittedWritesWarning, compute_device
from ..table_format import table_paths
from .config import ModelConfig, v41_refusal
from .corpus import read_tokens, token_batches
from .model import EngramLM

__all__ = ["TrainSettings", "train", "register"]

TABLE_FILE = "tables.npy"
SETTINGS_FILE = "train.json"
DENSE_NAME = r"dense-([1-9][0-9]*)\.pt"  # train's dense-S.pt (S >= 1, no leading 0, ASCII digits)
APPLIED_KEY = "applied_steps"  # in dense-S.pt: steps applied by S (the rows' Adam count)
COMMITTED_FILE = "committed.json"  # the step of the table's last commit, as the run recorded it
RUN_ID_KEY = "run_id"  # in committed.json and the table's "trainable" metadata: whose record
RUN_FILES = rf"{DENSE_NAME}|loss\.csv|loss\.png|committed\.json|train\.json"  # beside its table
# the table's files: TABLE.npy, a compaction's TABLE.gN.npy, and theirs (manifest, delta, lock)
TABLE_FILES = rf"{re.escape(Path(TABLE_FILE).stem)}(?:\.g[0-9]+)?\.npy(?:\..+)?"
DEFAULT_STEPS = 200  # a new run's step count where none is given
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision's dtypes


@dataclass
class TrainSettings:
    """Everything a run needs; saved in ``OUT/train.json`` so ``--resume`` continues the same.
    ``steps`` None: not given (a new run's ``DEFAULT_STEPS``; a resume's, the run's own)."""

    steps: int | None = None
    batch_size: int = 8
    seq_len: int = 128
    checkpoint_every: int = 20
    optimizer: str = "rowwise_adagrad"
    table_lr: float = 0.05
    dense_lr: float = 1e-3
    hot: int | str = "5%"  # a row count, a byte size or a percentage of the table
    warm: int | str = "20%"
    io: str = "pread"
    precision: str = "fp32"  # fp32, or autocast to bf16 / fp16 (with a GradScaler)
    corpus: list[str] | None = None
    seed: int = 0
    model: dict[str, Any] = field(
        default_factory=lambda: {
            "engram": {
                "engram_vocab_size": [20000, 20000],
                "n_embed_per_ngram": 64,
                "n_head_per_ngram": 4,
                "layer_ids": [1, 3],
            },
            "backbone": {"hidden_size": 64, "hc_mult": 2, "num_layers": 4},
            "transformer": {"num_attention_heads": 4},
        }
    )


def train(
    out: str | os.PathLike[str],
    settings: TrainSettings,
    *,
    resume: bool,
    progress: bool = True,
    given: Collection[str] | None = None,
    out_name: str = "out",
    device: str = "cpu",
    model_file: str | os.PathLike[str] | None = None,
) -> dict:
    """Run (or resume) training in ``out``; returns the summary printed by the command. Bad
    settings are refused before ``out`` is touched, so a corrected command can start afresh.
    ``given``: the settings the user set (the command's options); a resume names those it
    ignores (default: those that differ from ``TrainSettings()``'s). ``out_name``: how errors
    name ``out``; a command passes its option (``"--out"``), and errors then name its other
    options (``--resume``, ``--batch-size``) where they name parameters and settings
    (``resume``, ``batch_size``), and a folder it makes is said on stderr then
    (``--out: created 'RUN'``). ``device``: where the model computes and the hot tier lives
    (``cpu``, ``cuda``, ``cuda:N``); not a setting of the run, so a resume may move it.
    ``settings.steps``: the count to reach (a resume's only grows); None: a new run's
    ``DEFAULT_STEPS``, a resume's own count.
    ``model_file``: the file ``settings.model`` was read from (the command's ``--model``),
    named with the key in an error of the model (a resume's names its saved settings file).
    ``out``: a str or Path, a leading ``~`` the home folder (as the command's ``--out``)."""
    text = os.fspath(out)
    if (problem := path_text_problem(text)) is not None:  # pathlib's bare errors otherwise
        raise ConfigError(f"{out_name}: {text!r}: {problem}")
    try:
        out = Path(expand_home(text))  # "run" too (a str has no "/")
    except ConfigError as exc:  # HOME set but empty
        raise ConfigError(f"{out_name}: {exc}") from None
    try:
        check_device(device)
    except ValueError as exc:
        raise ConfigError(f"{_option('device', out_name)}: {exc}") from None
    compute = compute_device(device, _option("device", out_name))  # CUDA there: ConfigError
    if settings.corpus:  # as found from here (a resume may run in another directory)
        # one: one path; a leading ~ read first (abspath makes "~/t" a folder here named ~)
        try:
            paths = [os.path.abspath(expand_home(c)) for c in corpus_paths(settings.corpus)]
        except ConfigError as exc:  # HOME set but empty: named as the option given
            raise ConfigError(f"{_option('corpus', out_name)}: {exc}") from None
        settings = replace(settings, corpus=paths)
    # a resume's settings are the run's saved ones (``saved_in``): an error in them names the
    # file (the options a resume is given do not change them)
    asked, (settings, saved_in) = settings, _settings(out, settings, resume, given, out_name)
    torch.manual_seed(settings.seed)
    source = _option("model", out_name) + ("" if model_file is None else f" {model_file}")
    named = contextlib.nullcontext() if saved_in else naming_file(source)  # --model FILE: KEY
    with _in_saved(saved_in, out_name, "model: "), named:
        config = ModelConfig.from_dict(settings.model)
        if config.engram.is_v41:
            raise ConfigError(f"engram.geometry {v41_refusal('training cannot update')}")
        model = EngramLM(config)  # one too large for the memory: ConfigError
    optimizer = make_row_optimizer(settings.optimizer, lr=settings.table_lr)
    layers = list(model.engram_layers)
    sizes = [model.tables[layer].rows for layer in layers]
    dim = model.tables[layers[0]].weight.shape[1]
    row_bytes = 4 * (dim + optimizer.state_width(dim))  # float32 [weights | optimizer state]
    for name in ("hot", "warm"):  # against the table the run would make, before making it
        with _in_saved(saved_in, out_name):
            resolve_capacity(
                getattr(settings, name),
                table_rows=sum(sizes),
                row_bytes=row_bytes,
                key=name if saved_in else _option(name, out_name),
            )
    # the corpus too: a path that does not exist, or too little text for one batch, is refused
    # before the run's folder holds anything that a rerun would have to --resume
    per_batch = settings.batch_size * settings.seq_len
    try:
        exclude = _outside_corpus(out, settings.corpus)  # the run's files are none of its text
        role = f"train's {out_name}"  # the folder's option, should it hold every file found
        corpus = resolve_corpus(settings.corpus, exclude=exclude, exclude_name=role)
        if exclude is None:  # a corpus path lies in the run: its own files are left out by name
            corpus = _without_run_files(corpus, out)
        corpus = corpus.shuffled(settings.seed)
        tokens = read_tokens(corpus, model.hasher.tokenizer, max_tokens=per_batch * settings.steps)
    except CorpusError as exc:
        raise _corpus_refused(exc, saved_in, out_name) from None
    if len(tokens) < per_batch:  # named here: token_batches's error names no option or file
        size, seq = ("batch_size", "seq_len")  # a resume's: the keys of its settings file
        if saved_in is None:
            size, seq = _option(size, out_name), _option(seq, out_name)
        batch = f"{size} {settings.batch_size} x {seq} {settings.seq_len}"
        short = f"{len(tokens):,} tokens do not fill one batch of {batch}"
        if saved_in is None:
            short = f"{short}; expected a larger corpus or smaller batches"
        raise _corpus_refused(ConfigError(short), saved_in, out_name, named=True)
    batches = token_batches(tokens, settings.batch_size, settings.seq_len)
    saying = out_name.startswith("--")  # the command's: said when made (not when the run ends)
    with saying_made(out, out_name) if saying else contextlib.nullcontext():
        make_named_dir(out, out_name, "a directory for the run")
    lock = _take_run_lock(out, out_name)  # before anything in out is written; the store adopts it
    try:
        with warnings.catch_warnings():  # said once already
            warnings.simplefilter("ignore")
            # a ConfigError if a run was made here meanwhile
            if _settings(out, asked, resume, given, out_name)[0] != settings:
                raise ConfigError(
                    f"{out_name}: {out} changed while this run was being set up (another trainer "
                    "made or ended a run there); nothing of that run was changed: run the command "
                    "again"
                )
        made = not _holds_a_run(out, out_name)
        if made:  # the initial rows of every layer, one after another (a killed creation's
            # leftovers are replaced; a compacted run's table is its current version)
            _save_settings(out, settings)  # before the table: a run's table has its settings
            init = torch.cat([model.tables[layer].weight.detach() for layer in layers])
            create_trainable_table(
                out / TABLE_FILE, init, optimizer, overwrite=True, run_id=uuid.uuid4().hex
            )
        store = TieredStore.open(
            {
                "table": {"path": str(out / TABLE_FILE)},
                "tiers": {
                    "hot": {"capacity": settings.hot, "device": str(compute)},
                    "warm": {"capacity": settings.warm},
                    "cold": {"io": settings.io},
                },
            }
        )
        try:  # before anything of the run changes (becoming its writer makes a delta)
            _check_progress(out, store.committed_step, _run_id(store), out_name)
        except BaseException:
            store.close()
            raise
    except BaseException:
        release(lock)
        raise
    try:
        store.adopt_writer_lock(lock)
        if not made:  # a resume's step count may have grown
            _save_settings(out, settings)
        # a killed checkpoint's, or settings' save (this run holds the table)
        for leftover in hidden_temporaries(out, RUN_FILES):
            leftover.unlink(missing_ok=True)
        table = TrainableTable(store, optimizer)
        return _run(out, settings, model, table, layers, sizes, batches, progress, out_name)
    except KeyboardInterrupt:
        kept = store.committed_step  # the steps since go, as after a kill (the close below)
        again = (  # the command's, or a Python caller's
            "run the same command with --resume"
            if out_name.startswith("--")
            else "call train again with resume=True"
        )
        print(
            f"train: stopped; {out} holds step {kept}, its last checkpoint: {again} to go on "
            "from there",
            file=sys.stderr,
        )
        raise
    except Exception:  # a step's error (a NaN gradient) says nothing of the run: what stands is
        dropped = store.write_counters()["dirty_rows"]  # said, as for an interrupt
        if dropped:
            print(
                f"train: stopped by the error below; {out} holds step {store.committed_step}, its "
                f"last checkpoint (the {dropped:,} rows written since are dropped)",
                file=sys.stderr,
            )
        raise
    finally:  # a step's rows past the last commit go, as after a kill: what stands is said
        with warnings.catch_warnings():  # (not the store's advice to call commit())
            warnings.simplefilter("ignore", UncommittedWritesWarning)
            store.close()


def _run(out, settings, model, table, layers, sizes, batches, progress, out_name) -> dict:
    """The training loop, from the table's last committed step."""
    offsets = np.cumsum([0, *sizes[:-1]])
    model.set_tables(
        {
            layer: TableSlice(table, int(off), rows)
            for layer, off, rows in zip(layers, offsets, sizes, strict=True)
        }
    )
    device = table.store.device  # the hot tier's: where lookups return their rows
    model.to(device)  # its in-memory tables replaced first: never copied there
    dense = torch.optim.Adam(model.parameters(), lr=settings.dense_lr)
    dtype = AUTOCAST[settings.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    start = table.store.committed_step
    applied = start  # steps applied (Adam's count): skipped ones (fp16 overflows) not counted
    flag = _resume_flag(out_name)  # what a failed checkpoint's error tells the caller to pass
    if start:
        applied = _load_dense(out / f"dense-{start}.pt", start, model, dense, scaler, out_name)
        _recorded(out, table.store, start, flag, check=True)  # a checkpoint killed after its commit
    losses = _loss_log(out, start, out_name)
    bar = tqdm(total=settings.steps, initial=start, disable=not progress, desc="train", unit="step")
    began, trained, skipped = time.perf_counter(), 0, 0
    with warnings.catch_warnings():  # torch's notice for nn.RMSNorm of bf16/fp16 input
        warnings.filterwarnings("ignore", "Mismatch dtype between input and weight")
        try:
            for step in range(start + 1, settings.steps + 1):
                batch = batches[(step - 1) % len(batches)]
                tick = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = model.loss(batch)
                dense.zero_grad()
                scaler.scale(loss).backward()
                # fp16: gradients that overflowed, dense or rows', skip the whole step (the
                # scaler's step() would decide for Adam alone)
                scaler.unscale_(dense)
                overflowed = scaler.is_enabled() and _overflowed(dense)
                if overflowed:  # a row stored NaN (not an overflow) makes every step's: named
                    table.skip(step, optimizer_step=applied + 1)
                else:
                    before = table.skipped_steps
                    table.step(step, scaler, optimizer_step=applied + 1)  # as Adam counts
                    overflowed = table.skipped_steps > before
                if overflowed:
                    skipped += 1
                else:
                    scaler.step(dense)
                    applied += 1
                scaler.update()
                rate = batch.numel() / (time.perf_counter() - tick)
                losses.append((step, loss.item(), rate))
                trained += batch.numel()
                bar.set_postfix(loss=f"{losses[-1][1]:.3f}", tok_s=f"{rate:,.0f}")
                bar.update(1)
                if step % settings.checkpoint_every == 0 or step == settings.steps:
                    _checkpoint(out, model, dense, scaler, table, step, applied, losses, flag)
        finally:
            bar.close()  # before an interruption's message, not redrawn after it
    if losses:
        done = f"step {losses[-1][0]} is committed; only the plot is missing"
        with write_step(f"plot {out / 'loss.png'}", "writing it", done):
            _plot(out / "loss.png", losses)
    seconds = time.perf_counter() - began
    return {
        "out": str(out),
        "resumed_from_step": start,
        "steps": settings.steps,
        "final_loss": losses[-1][1] if losses else None,
        "skipped_steps": skipped,  # this invocation's (fp16: gradients overflowed)
        "tokens_per_second": trained / seconds if seconds > 0 else None,
        "store": table.store.stats().get("writes", {}),
    }


def _corpus_refused(
    exc: TieredStoreError, saved_in: Path | None, out_name: str, *, named: bool = False
) -> TieredStoreError:
    """The error of a corpus that cannot be read (``exc``), naming what sets it: a resume's
    saved settings file ``saved_in`` and its "corpus" key (the corpus moved or changed since),
    else the command's ``--corpus`` (``named``: a Python caller's ``corpus`` too; else ``exc``
    names the corpus already, and goes as it is)."""
    if saved_in is not None:  # the saved path is the one to change
        return ConfigError(
            f"{_option('resume', out_name)}: {saved_in}: corpus: {exc}; expected the corpus the "
            f'run was started on: restore it there, or set the "corpus" key of {saved_in} to '
            "where it is now"
        )
    if named or out_name.startswith("--"):
        return ConfigError(f"{_option('corpus', out_name)}: {exc}")
    return exc


def _outside_corpus(out: Path, corpus: list[str] | None) -> Path | None:
    """``out`` where no path of ``corpus`` lies in it (then its files, the run's train.json and
    loss.csv, are never read as text: a resume of a run inside its corpus reads what the run
    began on), else None (the corpus is in the run's folder: excluding it would leave none;
    ``_without_run_files`` leaves the run's own out by name).
    Links are followed: a run or corpus named through one is where its link leads. A path no
    file can have (a NUL character: realpath's bare ValueError) is a ``CorpusError`` naming it."""
    for path in corpus or []:
        if (problem := path_text_problem(path)) is not None:
            raise CorpusError(f"corpus path {path!r}: {problem}")
    here = Path(os.path.realpath(out))
    paths = [Path(os.path.realpath(p)) for p in corpus or []]
    return None if any(p == here or here in p.parents for p in paths) else out


def _without_run_files(corpus: Corpus, out: Path) -> Corpus:
    """``corpus`` without the run's own files in ``out`` (settings, log, checkpoints, table
    files: ``RUN_FILES``, ``TABLE_FILES``), for a corpus that holds the run's folder but names a
    path in it, so not left out of it: a resume reads the text the run began on. A
    ``CorpusError`` when none is left."""
    here = Path(os.path.realpath(out))
    own = re.compile(f"{RUN_FILES}|{TABLE_FILES}")

    def runs(file: Path) -> bool:
        """Whether ``file`` (through links) is one of the run's, or in one of its folders."""
        path = Path(os.path.realpath(file))
        return here in path.parents and bool(own.fullmatch(path.relative_to(here).parts[0]))

    kept = tuple(f for f in corpus.files if not runs(f))
    if len(kept) == len(corpus.files):
        return corpus
    dropped = len(corpus.files) - len(kept)
    if not kept:
        raise CorpusError(
            f"corpus {', '.join(corpus.roots)}: every file found ({dropped:,}) is the run's own "
            f"in {out} (its settings, loss log, checkpoints or table), never read as text; "
            "expected text files"
        )
    return Corpus(kept, f"{corpus.description} less the run's own {dropped:,}", corpus.roots)


def _overflowed(dense: torch.optim.Optimizer) -> bool:
    """Whether a gradient of ``dense``'s parameters holds an inf or a NaN."""
    grads = [p.grad for group in dense.param_groups for p in group["params"] if p.grad is not None]
    return bool(grads) and not bool(torch.stack([g.isfinite().all() for g in grads]).all())


def _load_dense(path: Path, step: int, model, dense, scaler, out_name: str) -> int:
    """Load the dense weights, Adam and GradScaler state of committed step ``step``; returns the
    steps applied by then (for a checkpoint written before they were recorded, the dense Adam's
    own count); ``ConfigError`` naming the file when it is missing or is not the checkpoint
    ``train`` wrote (``out_name``: the run folder's name in it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # a GPU-saved one too
    except OSError as exc:
        why = exc.strerror or str(exc)
    except (EOFError, pickle.UnpicklingError, RuntimeError, ValueError):  # torch's hints mislead
        why = "not a checkpoint torch.save wrote, or a damaged one"
    else:
        weights = state.get("model") if isinstance(state, dict) else None
        why = (
            None
            if isinstance(weights, dict)  # (None unless the checkpoint is a dict)
            and "optimizer" in state
            and all(isinstance(v, torch.Tensor) for v in weights.values())
            else (
                "not train's dense checkpoint (expected a dict of 'model', a state dict of "
                "tensors, and 'optimizer')"
            )
        )
        applied = state.get(APPLIED_KEY) if isinstance(state, dict) else None
        if (
            why is None
            and applied is not None
            and not (
                isinstance(applied, int) and not isinstance(applied, bool) and 0 <= applied <= step
            )
        ):
            why = f"its {APPLIED_KEY!r} is {applied!r}, expected an integer in [0, {step}]"
    if why is None:  # its keys named here: load_state_dict's error advises strict=False
        own = model.state_dict().keys()
        missing, unknown = sorted(own - weights.keys()), sorted(weights.keys() - own)
        if missing or unknown:
            first = f"{missing[0]}: missing" if missing else f"{unknown[0]}: not the model's"
            why = (
                f"its weights do not fit the model ({first}; {len(missing)} "
                f"key{'' if len(missing) == 1 else 's'} missing, {len(unknown)} unknown)"
            )
    if why is None:
        try:
            model.load_state_dict(state["model"])  # another model's shapes: ConfigError
            dense.load_state_dict(state["optimizer"])
            if state.get("scaler"):  # fp16's scale (none before --precision, or disabled)
                scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, TypeError) as exc:  # Adam state of other parameters
            why = f"its weights or Adam state do not fit the model ({exc})"
    if why is None and applied is None:  # written before the count: the dense Adam's own, which
        # counts the steps applied (fp16: fewer than ``step`` where one was skipped)
        applied = max((int(s["step"]) for s in dense.state.values() if "step" in s), default=0)
    if why is not None:
        raise ConfigError(
            f"{_option('resume', out_name)}: {path}: {why}; expected the dense checkpoint "
            f"written with the table's commit of step {step} (restore it, or choose another "
            f"{out_name})"
        )
    return applied


def _checkpoint(  # noqa: PLR0913 (the checkpoint's parts)
    out: Path, model, dense, scaler, table, step: int, applied: int, losses, resume: str
) -> None:
    """dense-S.pt and loss.csv, then the table commit (the commit point), then its record
    (``committed.json``), then older dense checkpoints go. A kill before the commit leaves step
    S-K's files valid (``loss.csv`` rows past the committed step are dropped on resume); one
    before the record leaves the table a step ahead of it, which resumes from the table's (and
    records it). A file that cannot be written (a full disk) is a ``TierIOError`` naming it and
    the step that stands (``resume``: how the caller resumes)."""
    buffer = io.BytesIO()
    state = {"model": model.state_dict(), "optimizer": dense.state_dict()}
    torch.save({**state, "scaler": scaler.state_dict(), APPLIED_KEY: applied}, buffer)
    kept = f"the last commit (step {table.store.committed_step}) stands: {resume} goes on from it"
    dense_file = out / f"dense-{step}.pt"
    with _run_file("checkpoint", dense_file, kept) as f:
        f.write(buffer.getvalue())
    log = out / "loss.csv"
    with _run_file("checkpoint", log, kept, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "tokens_per_second"])
        writer.writerows(losses)
    table.commit(step)
    _recorded(out, table.store, step, resume)


def _recorded(
    out: Path, store: TieredStore, step: int, resume: str, *, check: bool = False
) -> None:
    """A checkpoint's end, once the table committed ``step``: ``committed.json`` records it,
    then the older ``dense-S.pt`` go (a resume finishes one a kill cut short: it may train no
    step, and run no checkpoint). ``check``: the record is read first and written only where
    it does not hold ``step`` already (a resume's; a checkpoint's is always behind its step).
    ``resume``: how the caller resumes."""
    kept = f"step {step} is committed: {resume} goes on from it"
    record = out / COMMITTED_FILE
    written = None  # not read, or damaged: written anew
    if check:
        with contextlib.suppress(ConfigError):
            written = _record(out, str(out))
    if written != (step, _run_id(store)):  # a resume's holds its step, unless killed before
        with _run_file("checkpoint", record, kept, "w") as f:
            json.dump({"committed_step": step, RUN_ID_KEY: _run_id(store)}, f)
    for old in out.glob("dense-*.pt"):
        written = re.fullmatch(DENSE_NAME, old.name)  # train's, not a user's copy
        if written and int(written[1]) < step:
            old.unlink()


@contextlib.contextmanager
def _run_file(
    what: str, path: Path, kept: str, mode: str = "wb", step: str = "writing it", **open_kwargs
) -> Iterator[IO[Any]]:
    """``atomic_write(path, mode, **open_kwargs)`` whose ``OSError`` (a full disk) is a
    ``TierIOError`` naming the run's ``what`` and ``path`` and ``step``, saying what is
    ``kept`` (``write_step``)."""
    with write_step(f"{what} {path}", step, kept), atomic_write(path, mode, **open_kwargs) as f:
        yield f


def _run_id(store: TieredStore) -> str | None:
    """The id of the run whose table ``store`` serves (None: a table made before run ids)."""
    return (store.cold.manifest.metadata or {}).get("trainable", {}).get(RUN_ID_KEY)


def _record(out: Path, out_name: str) -> tuple[int, str | None] | None:
    """The committed step and run id the run recorded in ``committed.json`` (None: none
    recorded, as by runs before the record; a run id None: a record or table before run ids);
    ``ConfigError`` naming the file (``out`` as ``out_name``) when it is damaged."""
    path = out / COMMITTED_FILE
    try:
        record = json.loads(path.read_text())
        step, run = record["committed_step"], record.get(RUN_ID_KEY)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"committed_step: got {step!r}, expected an integer >= 1")
        if run is not None and not isinstance(run, str):
            raise ValueError(f"{RUN_ID_KEY}: got {run!r}, expected the run's id (a string)")
    except (FileNotFoundError, NotADirectoryError):  # no run there (or no folder)
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(
            f"{out_name}: {path}: {why}; expected the step the run recorded at its last commit "
            f'({{"committed_step": N, "{RUN_ID_KEY}": ...}}): restore it, or remove it to go on '
            "from the table's step"
        ) from None
    return step, run


def _check_progress(
    out: Path, table_step: int | None, table_run: str | None, out_name: str
) -> None:
    """``ConfigError`` when the run's table (``table_step``; None: no table) holds an earlier
    step than the run recorded: its later commits are lost, and going on would delete their
    dense checkpoint and log; or when the record is another run's (its run id is not the
    table's ``table_run``), or cannot be told from one (no run id, beside a table with one). A
    table ahead of the record (a kill before it) is fine. ``out_name``: ``out``'s name in it."""
    record = _record(out, out_name)
    if record is None:
        return
    recorded, recorded_run = record
    if table_step is not None and recorded_run is None and table_run is not None:
        raise ConfigError(  # not told from another run's record: this run's, by an older version?
            f"{out_name}: {out / COMMITTED_FILE}: records committed step {recorded} but no run id "
            "(written by an older version of tiered-store, or by hand), so it cannot be told from "
            f"another run's record; the table there ({TABLE_FILE}, at step {table_step}) belongs "
            f"to run {table_run!r}; nothing was changed: if the record is this run's (an older "
            f'version resumed it), add "{RUN_ID_KEY}": "{table_run}" to it; else remove it to go '
            f"on from the table's step {table_step}"
        )
    if table_step is not None and recorded_run != table_run:
        whose = f"belongs to run {table_run!r}" if table_run else "has no run id (made before them)"
        raise ConfigError(
            f"{out_name}: {out / COMMITTED_FILE}: records committed step {recorded} of run "
            f"{recorded_run!r}, but the table there ({TABLE_FILE}) {whose}: "
            "the record is another run's (copied in?) and says nothing of this run's commits; "
            f"nothing was changed: restore this run's {COMMITTED_FILE}, or remove it to go on "
            f"from the table's step {table_step}"
        )
    if table_step is not None and table_step >= recorded:
        return
    if table_step is None:
        held = f"no table (no {TABLE_FILE} with its manifest)"
    else:
        delta = delta_path(current_version(out / TABLE_FILE)[0]).name
        held = f"a table at step {table_step} (its delta, {delta}/, is missing or older)"
    raise ConfigError(
        f"{out_name}: {out} recorded committed step {recorded} ({COMMITTED_FILE}) but holds "
        f"{held}: steps {(table_step or 0) + 1}..{recorded} are lost to it, and going on would "
        f"rewrite loss.csv and replace dense-{recorded}.pt; nothing was changed: restore the run's "
        f"table files as they were at step {recorded} (a copy of the run made with cp -r keeps "
        f"the delta folder), or choose another {out_name} (to go on from step {table_step or 0} "
        f"anyway, remove {COMMITTED_FILE})"
    )


def _loss_log(out: Path, upto: int, out_name: str) -> list[tuple[int, float, float]]:
    """The logged losses of steps up to ``upto`` (later ones were never committed);
    ``ConfigError`` naming the line of a log that is not the one ``train`` writes."""
    path = out / "loss.csv"
    if not upto or not path.exists():
        return []
    losses = []
    try:
        # bytes that are not UTF-8 read as \xNN escapes: a number with one is not one either
        with open(path, encoding="utf-8", errors="backslashreplace") as f:
            for number, line in enumerate(f, 1):
                if number == 1:
                    continue  # the header
                line = line.removesuffix("\n")
                try:
                    step, loss, rate = next(csv.reader([line]), [])
                    entry = (int(step), float(loss), float(rate))
                except (ValueError, csv.Error):  # a field too many, too few, too long, not a number
                    raise ConfigError(
                        f"{_option('resume', out_name)}: {path}: line {number} is "
                        f"{shown(line, 100)}; expected step,loss,tokens_per_second as train "
                        "writes them (restore it, or remove it: the log then goes on from step "
                        f"{upto + 1})"
                    ) from None
                if entry[0] <= upto:
                    losses.append(entry)
    except OSError as exc:  # a folder of its name, unreadable (EACCES, EIO)
        raise ConfigError(
            f"{_option('resume', out_name)}: {path}: {exc.strerror or exc}; expected the loss "
            f"log train writes (restore it, or remove it: the log then goes on from step "
            f"{upto + 1})"
        ) from None
    return losses


def _plot(path: Path, losses) -> None:
    """The loss curve as a PNG (matplotlib's Agg canvas, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [s for s, _, _ in losses]
    ax.plot(steps, [v for _, v, _ in losses], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("EngramLM training, tables in the tiered store")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)


def _take_run_lock(out: Path, out_name: str) -> int:
    """The run's table writer lock (``take_writer_lock``): a second trainer of the run, or a
    compaction of its table, is refused before either touches the other's files (the error
    names ``out`` as ``out_name``)."""
    lock = f"{TABLE_FILE}.writer.lock"
    return take_writer_lock(
        out / TABLE_FILE,
        refused=lambda holder: TierIOError(
            errno.EBUSY,
            f"{out_name}: {out} is being trained (or compacted) by another trainer or store: {lock} "
            f"is held by {holder}; expected one trainer per run: wait for it to end, or choose "
            f"another {out_name}",
        ),
    )


def _holds_a_run(out: Path, out_name: str) -> bool:
    """Whether ``out`` holds a run's table (after a compaction only ``TABLE.gN.npy`` is there);
    False when nothing is there or a creation was killed before its manifest, which it writes
    last. A run's table that fails its check raises: it is never made anew over committed steps
    (nor when a compaction elsewhere switches versions while this reads them). ``out_name``:
    ``out``'s name in the error."""
    table = out / TABLE_FILE
    if not has_history(table) and not table_paths(table)[1].exists():
        return False
    try:
        check_current_version(table)
    except (TieredStoreError, OSError) as exc:
        raise ConfigError(
            f"{out_name}: {out} holds a training run whose table fails its check ({exc}); "
            f"expected a readable table to resume (repair or move it, or choose another "
            f"{out_name})"
        ) from None
    return True


def _settings(
    out: Path,
    given: TrainSettings,
    resume: bool,
    asked: Collection[str] | None,
    out_name: str,
) -> tuple[TrainSettings, Path | None]:
    """The run's settings, checked: saved ones on resume (the step count may grow: ``steps``
    None means not asked, the run's own), else ``given``; a resume warns of the ``asked`` settings
    (None: those not at their default) it ignores. Returns them and the saved settings file
    they came from (None: not a resume's). Reads ``out`` (named ``out_name`` in errors),
    writes nothing."""

    def named(name: str, expected: str, saved: Path | None) -> str:
        """An error's subject and remedy: the option given (``saved`` None), or the run's saved
        setting in ``saved`` (one an older version took, or an edit), which no option given
        with a resume changes."""
        if saved is None:
            return f"{_option(name, out_name)}: {expected}"
        return _saved_error(f"{name}: {expected}", saved, out_name)

    def counted(settings: TrainSettings, name: str, saved: Path | None) -> TrainSettings:
        """``settings`` with its count ``name`` an int, checked (``seq_len`` >= 2, others >= 1);
        an error names it as ``named`` does."""
        value = getattr(settings, name)
        count = as_integer(value)  # saved as a JSON integer (True is no count)
        least, why = (2, " (a next-token loss)") if name == "seq_len" else (1, "")
        if value is None and saved is not None:  # a saved file without it (steps, an edit)
            raise ConfigError(named(name, f"missing; expected an integer >= {least}{why}", saved))
        if count is None or count < least:
            raise ConfigError(
                named(name, f"expected an integer >= {least}{why}, got {shown(value)}", saved)
            )
        return replace(settings, **{name: count})

    path = out / SETTINGS_FILE
    saved_in = None  # the run's saved settings file, once they are the ones checked (a resume)
    holds = _holds_a_run(out, out_name)  # read once: the branches below see one state of out
    if not holds:  # the table of a run that committed steps gone: refused
        _check_progress(out, None, None, out_name)
    if resume and not path.exists() and holds:
        raise ConfigError(
            f"{_option('resume', out_name)}: {out} holds a training run without its settings "
            f"({path.name} is missing); expected the {path.name} that run saved (restore it, or "
            f"choose another {out_name})"
        )
    if resume and path.exists() and holds:
        saved = _saved_settings(path, out_name)
        if given.steps is not None:  # the count asked for (the run's may grow to it): the
            given = counted(given, "steps", None)  # caller's to name
        default = TrainSettings()
        ignored = [  # asked for (a default value too), and not what the run uses
            f"{_option(f.name, out_name)} (not the run's model, which {path} holds)"
            if f.name == "model"  # every section, twice: not a readable line
            else f"{_option(f.name, out_name)} {getattr(given, f.name)} (it uses "
            f"{getattr(saved, f.name)})"
            for f in fields(TrainSettings)
            if f.name != "steps"
            and (
                f.name in asked
                if asked is not None
                else getattr(given, f.name) != getattr(default, f.name)
            )
            and getattr(given, f.name) != getattr(saved, f.name)
        ]
        if given.steps is not None and given.steps < (saved.steps or 0):  # fewer: it has more
            steps = _option("steps", out_name)
            ignored.append(f"{steps} {given.steps} (it runs {saved.steps}; steps only grow)")
        if ignored:
            warnings.warn(
                f"{_option('resume', out_name)}: the run in {out} keeps its settings (only "
                f"{_option('steps', out_name)} may grow); ignored: {', '.join(ignored)}",
                stacklevel=3,
            )
        if given.steps is not None:  # not asked: the run's own, checked below (no default)
            saved.steps = max(saved.steps or 0, given.steps)
        given, saved_in = saved, path
    elif resume:
        warnings.warn(
            f"{_option('resume', out_name)}: no run in {out} to resume; starting a new one",
            stacklevel=3,
        )
    elif holds:
        raise ConfigError(
            f"{out_name}: {out} already holds a training run; pass {_resume_flag(out_name)} to "
            "continue it, or choose another directory"
        )
    if given.steps is None and saved_in is None:  # not asked, and no run to take it from
        given = replace(given, steps=DEFAULT_STEPS)
    if given.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"{_option('optimizer', out_name)}: {given.optimizer!r}; expected one of {OPTIMIZERS}"
        )
    if given.precision not in AUTOCAST:
        raise ConfigError(
            f"{_option('precision', out_name)}: {given.precision!r}; expected one of "
            f"{', '.join(AUTOCAST)}"
        )
    if given.io not in IO_MODES:
        raise ConfigError(
            f"{_option('io', out_name)}: {given.io!r}; expected one of {', '.join(IO_MODES)}"
        )
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
        given = counted(given, name, saved_in)
    seed = as_integer(given.seed)  # torch's and NumPy's generators take [0, 2**64)
    if seed is None or not 0 <= seed < 2**64:
        raise ConfigError(
            named("seed", f"expected an integer in [0, 2**64), got {shown(given.seed)}", saved_in)
        )
    given = replace(given, seed=seed)
    for name in ("hot", "warm"):  # a NumPy row count saved as a JSON integer
        if not isinstance(getattr(given, name), str):
            count = as_integer(getattr(given, name))
            given = given if count is None else replace(given, **{name: count})
    for name in ("table_lr", "dense_lr"):
        lr = getattr(given, name)
        if not (
            isinstance(lr, numbers.Real)  # NumPy's too (its bool is none)
            and not isinstance(lr, bool)  # a flag passed for a number: not a learning rate of 1
            and math.isfinite(lr)
            and lr > 0
        ):
            raise ConfigError(
                named(name, f"got {lr!r}; expected a positive finite learning rate", saved_in)
            )
        given = replace(given, **{name: lr if isinstance(lr, int | float) else float(lr)})
    return given, saved_in


def _saved_error(what: str, saved_in: Path, out_name: str) -> str:
    """The message of an error in a resume's saved settings file ``saved_in`` (``what``: the
    setting and what is wrong with it): the file, and how to go on."""
    return (
        f"{_option('resume', out_name)}: {saved_in}: {what}; expected the settings `train` "
        f"saved there (restore them, or choose another {out_name})"
    )


@contextlib.contextmanager
def _in_saved(saved_in: Path | None, out_name: str, prefix: str = "") -> Iterator[None]:
    """A ``ConfigError`` raised inside, about a setting that is the resume's saved one
    (``saved_in``: its file; None: not a resume's), names the file (``prefix``: the setting,
    where the error does not name it) and how to go on; else it goes through as it is."""
    try:
        yield
    except ConfigError as exc:
        if saved_in is None:
            raise
        raise ConfigError(_saved_error(f"{prefix}{exc}", saved_in, out_name)) from None


def _option(name: str, out_name: str) -> str:
    """How errors name ``train``'s parameter or setting ``name``: as the command's option when
    ``out_name`` is one (``--batch-size``), else as it is (``batch_size``)."""
    return f"--{name.replace('_', '-')}" if out_name.startswith("--") else name


def _resume_flag(out_name: str) -> str:
    """What a message tells a caller to pass to resume a run: ``--resume`` or ``resume=True``."""
    return "--resume" if out_name.startswith("--") else "resume=True"


_SAVED_TYPES = {  # a field's type in train.json, and how a message names it
    **dict.fromkeys(
        ("steps", "batch_size", "seq_len", "checkpoint_every", "seed"), (int, "an integer")
    ),
    **dict.fromkeys(("table_lr", "dense_lr"), (int | float, "a number")),
    **dict.fromkeys(("optimizer", "io", "precision"), (str, "a string")),
    **dict.fromkeys(("hot", "warm"), (int | str, "a row count or size")),
    "corpus": (list | type(None), "a list of paths or null"),
    "model": (dict, "an object"),
}
_SAVED_CHOICES = {"optimizer": OPTIMIZERS, "io": IO_MODES, "precision": tuple(AUTOCAST)}  # values


def _save_settings(out: Path, settings: TrainSettings) -> None:
    """Write the run's ``train.json`` (atomically); ``TierIOError`` naming it when it cannot."""
    path = out / SETTINGS_FILE
    kept = "the run is as it was: run the command again"
    with _run_file("settings", path, kept, "w", step="writing them") as f:
        json.dump(asdict(settings), f, indent=1)


def _saved_settings(path: Path, out_name: str) -> TrainSettings:
    """A run's saved settings; ``ConfigError`` naming the file when it is damaged or not one
    that ``train`` saved (a field missing is its default: ``steps`` None, named missing unless
    the resume is given a count; ``out_name``: the run folder's name)."""
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        for name, value in doc.items():
            kind, what = _SAVED_TYPES.get(name, (None, None))
            if kind is None:
                raise ValueError(f"unknown field {name!r}")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name}: got {value!r}, expected {what}")
            choices = _SAVED_CHOICES.get(name)
            if choices is not None and value not in choices:
                raise ValueError(f"{name}: got {value!r}, expected one of {', '.join(choices)}")
        if any(not isinstance(c, str) for c in doc.get("corpus") or []):
            raise ValueError(f"corpus: got {doc['corpus']!r}, expected a list of paths")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{_option('resume', out_name)}: {path}: {exc}; expected the settings `train` saved "
            f"there (restore them, or choose another {out_name})"
        ) from None
    return TrainSettings(**doc)


class _Given(argparse.Action):
    """Store the option's value and note it as given: a --resume names the options given that
    it ignores, one set to its default value too."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def register(sub) -> None:
    """Add ``tiered-store train``."""
    d = TrainSettings()
    p = sub.add_parser(
        "train",
        help=command_help("train"),
        description=__doc__.split("\n\n", 1)[1],
        epilog="examples:\n  tiered-store train --out run1\n"
        "  tiered-store train --out run1 --resume          # after any stop, kill -9 included\n"
        "  tiered-store train --out run2 --corpus 'docs/**/*.md' --steps 50 --optimizer adam",
        formatter_class=DocHelpFormatter,
    )
    p.add_argument(
        "--out",
        type=output_folder,
        required=True,
        help="run directory (tables, checkpoints; made if missing, in a folder that is there)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--corpus", action=_Given, nargs="+", metavar="PATH", help="default: the stdlib's sources"
    )
    p.add_argument(
        "--steps",
        type=at_least(1, "at least 1 step"),
        help=f"optimizer steps in all (default {DEFAULT_STEPS}; with --resume, the run's own unless "
        "given, and only ever more)",
    )

    def setting(flag: str, help: str, **kwargs: Any) -> None:
        """An option of a TrainSettings field, its default the field's, noted when given."""
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, action=_Given, default=default, help=help, **kwargs)

    setting("--batch-size", "sequences per step", type=int)
    setting("--seq-len", "tokens per sequence", type=int)
    setting("--checkpoint-every", "steps per commit", type=int)
    setting("--optimizer", "table optimizer", choices=OPTIMIZERS)
    setting("--table-lr", "the tables' learning rate", type=positive_number)
    setting("--dense-lr", "the dense model's learning rate (Adam)", type=positive_number)
    setting("--hot", "hot tier capacity (rows, bytes or %%)", type=capacity)
    setting("--warm", "warm tier capacity (rows, bytes or %%)", type=capacity)
    setting("--io", "cold tier I/O", choices=IO_MODES)
    setting(
        "--precision",
        "the model's arithmetic: fp32, or torch.autocast to bf16 or fp16 (fp16 scales the loss "
        "with a GradScaler; the tables' rows stay float32)",
        choices=list(AUTOCAST),
    )
    p.add_argument(
        "--model",
        action=_Given,
        type=given_path,
        help="YAML/JSON of engram/backbone/transformer sections",
    )
    setting("--seed", "seed of the weights and the batches", type=at_least(0))
    p.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="where the model computes and the hot tier lives: cpu, cuda or cuda:N (not saved "
        "with the run: a resume may move it) (default: cpu)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    """The command: settings from the options, the run, its summary as JSON."""

    settings = TrainSettings(
        steps=args.steps,  # None: not asked
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        checkpoint_every=args.checkpoint_every,
        optimizer=args.optimizer,
        table_lr=args.table_lr,
        dense_lr=args.dense_lr,
        hot=args.hot,
        warm=args.warm,
        io=args.io,
        precision=args.precision,
        corpus=args.corpus,
        seed=args.seed,
    )
    if args.model is not None:
        settings.model = load_yaml(args.model, what="--model")
    summary = train(
        args.out,
        settings,
        resume=args.resume,
        progress=not args.quiet,
        given=getattr(args, "given", set()),
        out_name="--out",
        device=args.device,
        model_file=args.model,
    )
    print(json.dumps(summary, indent=1))
    return 0
