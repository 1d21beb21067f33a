"""The ``tiered-store`` command line: one subcommand per job; ``--help`` on each explains it."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_args import (
    COMMANDS,
    ArgumentParser,
    IntermixedParser,
    as_option_error,
    at_least,
    capacity,
    command_help,
    device_name,
    given_path,
    output_file,
    output_folder,
    output_table,
    path_template,
    run_script,
    saying_made,
)
from .errors import ConfigError, TieredStoreError, shown

if TYPE_CHECKING:
    from .table_format import TableExistsError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tiered-store`` console script."""
    args_given = sys.argv[1:] if argv is None else argv
    named = next((a for a in args_given if not a.startswith("-")), None)
    parser = build_parser([named] if named in COMMANDS else [])
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2

    def run() -> int:
        # serve installs its own SIGTERM handler (a drain) inside run_script's
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line(args.command)  # restored on return
            return int(args.run(args) or 0)

    return run_script(run, f"tiered-store {args.command}")  # (141 into a closed pipe)


def _warning_line(command: str):
    """``warnings.showwarning`` for the command line: one ``tiered-store CMD: warning: ...`` line,
    without the library's file, line and source."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        print(f"tiered-store {command}: warning: {message}", file=file or sys.stderr)

    return show


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser with ``commands``' parsers built (default: all); every other subcommand is
    listed, with its help, but parses nothing."""
    parser = ArgumentParser(
        prog="tiered-store",
        description="A tiered (GPU / host RAM / NVMe) memory store for Engram N-gram embedding tables.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, help_line) in COMMANDS.items():
        if commands is None or name in commands:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _add_init(sub) -> None:
    p = sub.add_parser(
        "init",
        help=command_help("init"),
        description="Create TABLE.npy and its manifest atomically, streaming in chunks. "
        "Exactly one source: --from-npy, --from-safetensors with --tensor, or --random ROWSxDIM.",
    )
    p.add_argument("table", type=output_table, help="output table path (.npy)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-npy", type=given_path, metavar="PATH", help="a 2-D .npy array")
    src.add_argument(
        "--from-safetensors",
        type=given_path,
        metavar="PATH",
        help="a safetensors file (needs --tensor)",
    )
    src.add_argument("--random", metavar="ROWSxDIM", help="seeded normal init, e.g. 1000000x64")
    p.add_argument("--tensor", help="tensor name inside the safetensors file")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="store as this dtype"
    )
    p.add_argument(
        "--seed", type=at_least(0), help="seed for --random, >= 0 (default 0; only with --random)"
    )
    p.add_argument(
        "--std",
        type=_std,
        help="standard deviation for --random (default 1.0; only with --random)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at TABLE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_init)


def _std(text: str) -> float:
    """An argparse ``type``: init's --std, a finite number >= 0, refused naming it as given."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):  # '1e400' is inf: named as typed
        raise argparse.ArgumentTypeError(
            f"expected a finite standard deviation >= 0, got {shown(text)}"
        )
    return value


def _run_init(args) -> int:
    from . import table_format as tf

    if args.table.is_dir():  # NAME.npy beside it would not open as NAME: info and verify refuse it
        raise tf.not_a_table(args.table)
    if args.random is None:  # they shape random rows only: a copied array would ignore them
        for option, value in (("--seed", args.seed), ("--std", args.std)):
            if value is not None:  # a seed as typed (":g" wrote 12345678 as 1.23457e+07)
                shown = value if isinstance(value, int) else f"{value:g}"
                raise _usage(f"{option} {shown}: only with --random; expected no {option}")
    if args.from_safetensors is not None:
        if not args.tensor:
            raise _usage("--from-safetensors needs --tensor NAME (the tensor inside the file)")
        source = tf.SafetensorsSource(args.from_safetensors, args.tensor)
    elif args.tensor is not None:
        raise _usage(
            f"--tensor {args.tensor!r}: only with --from-safetensors; expected no --tensor"
        )
    elif args.from_npy is not None:
        source = args.from_npy
    else:
        rows, dim = _parse_shape(args.random)
        seed = 0 if args.seed is None else args.seed
        std = 1.0 if args.std is None else args.std
        source = tf.RandomSource(rows, dim, dtype=args.dtype or "float32", seed=seed, std=std)
    try:
        manifest = tf.create_table(
            args.table, source, dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite
        )
    except tf.TableExistsError as exc:
        raise _name_overwrite(exc) from None
    except tf.TableFormatError as exc:  # its dtype= and std= hints, as the command line says them
        text = re.sub(r"dtype='(\w+)'", r"--dtype \1", str(exc)).replace("dtype=", "--dtype")
        text = text.replace("RandomSource std=", "--std ")
        raise tf.TableFormatError(text) from None
    path = tf.table_paths(args.table)[0]  # NAME.npy when given NAME
    print(f"created {path}: {manifest.rows:,} x {manifest.dim} {manifest.dtype}")
    return 0


def _name_overwrite(exc: TableExistsError) -> TableExistsError:
    """``exc`` as the command line says it: the option to pass is ``--overwrite``."""
    from .table_format import TableExistsError

    return TableExistsError(
        exc.errno, exc.strerror.replace("overwrite=True", "--overwrite"), exc.filename
    )


def _add_export_trace(sub) -> None:
    p = sub.add_parser(
        "export-trace",
        help=command_help("export-trace"),
        description="Stream the row ids of one table of a trace (from `tiered-store analyze` or "
        "TraceWriter) into OUT.npy, one int64 per lookup in request order; batch boundaries are "
        "dropped. The file is written under a temporary name and moved into place at the end.",
    )
    p.add_argument("trace", type=given_path, help="trace file")
    p.add_argument("out", type=output_file, help="output .npy")
    p.add_argument(
        "--table",
        help="which table of the trace (default: its only one; a trace of several needs it, as "
        "each table numbers its rows from 0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_export_trace)


def _run_export_trace(args) -> int:
    from .errors import ConfigError
    from .trace import TraceReader, trace_to_npy

    with TraceReader(args.trace) as reader:
        if args.table is None and len(reader.tables) > 1:  # one id space would mix their rows
            raise ConfigError(
                f"--table: {args.trace} holds {len(reader.tables)} tables "
                f"({', '.join(reader.tables)}); expected --table naming one (each numbers its "
                "rows from 0, so their ids would mix in one file)"
            )
        table = None if args.table is None else reader.table_index(args.table)
        ids = trace_to_npy(
            reader, args.out, table=table, overwrite=args.overwrite, progress=not args.quiet
        )
    print(f"wrote {args.out}: {ids.size:,} row ids (int64)")
    return 0


def _add_recover_trace(sub) -> None:
    p = sub.add_parser(
        "recover-trace",
        help=command_help("recover-trace"),
        description="A trace recording killed before it closed (`serve --record-trace` "
        "SIGKILLed or OOM-killed, a TraceWriter in a process that died) leaves no trace, only "
        "its hidden temporary .NAME.HEX.tmp beside NAME (replay and export-trace name it). "
        "This reads LEFTOVER's chunks from the start, keeps every whole one whose header and "
        "payload checksums and records check, stops at the first one cut off or corrupt (saying "
        "at which byte and chunk, and what was kept and lost), rebuilds the footer (chunk index, "
        "totals per table) and writes a complete trace that replay and export-trace read. What "
        "the writer still held in memory (its chunk being filled) is lost. The last batch kept "
        "may lack the tables the writer had yet to write for it. TRACE is written under a "
        "temporary name and moved into place at the end; LEFTOVER is left as it was.",
    )
    p.add_argument("leftover", type=given_path, help="the killed writer's .NAME.HEX.tmp")
    p.add_argument(
        "--out",
        type=output_file,
        metavar="TRACE",
        help="the trace to write in a folder that is there (default: NAME, beside LEFTOVER)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing TRACE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_recover_trace)


def _run_recover_trace(args) -> int:
    from .trace_recovery import recover_trace

    got = recover_trace(args.leftover, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(
        f"recovered {got.trace}: {got.chunks:,} chunks, {got.lookups:,} row ids in "
        f"{got.batches:,} batches (bytes 0..{got.kept_bytes:,} of {got.leftover}'s {got.size:,})"
    )
    if not got.stopped:
        print(f"{got.leftover} was whole: nothing lost")
        return 0
    rest = got.size - got.kept_bytes
    why = "the leftover's end (every chunk in it whole)" if rest == 0 else got.stopped
    print(f"stopped at chunk {got.chunks:,}, byte {got.kept_bytes:,}: {why}")
    unwritten = "what the writer had not yet written (the chunk it was filling)"
    if got.lost_chunks:
        chunks = "chunk" if got.lost_chunks == 1 else "chunks"
        lost = f"{got.lost_lookups:,} row ids in {got.lost_chunks:,} {chunks} from there on"
        lost += " (their headers' counts)"
        if got.lost_to_batch is not None:
            lost += f", batches up to {got.lost_to_batch:,}"
        lost += f", and {unwritten}"
    elif rest:
        lost = f"its last {rest:,} bytes (no readable chunk header), and {unwritten}"
    else:
        lost = f"only {unwritten}"
    print(f"lost: {lost}; {got.leftover} is kept: remove it once {got.trace} is checked")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help=command_help("info"),
        description="Print the manifest of a table's current version as JSON (after compaction "
        "TABLE.npy.current names the file that holds it; `file` and `generation` say which).",
    )
    p.add_argument("table", type=given_path, help="the table's .npy path (its first version)")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .delta.table_versions import present_version
    from .table_format import read_manifest

    path, generation = present_version(args.table)
    manifest = read_manifest(path)
    info = {"file": str(path), "generation": generation, **manifest.to_json()}
    info["manifest_crc32c"] = manifest.manifest_crc32c  # null: written before manifest checksums
    info["rows"], info["dim"] = manifest.rows, manifest.dim
    info["blocks"] = len(info.pop("block_checksums"))
    print(json.dumps(info, indent=2, default=str))
    return 0


VERIFY_NO_VERDICT = 75  # verify's exit status for a table being made anew (EX_TEMPFAIL: retry)


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help=command_help("verify"),
        description="Re-read the whole table and check every block's CRC-32 and every page's "
        "CRC32C; exit 1 naming the first bad block or page, 2 when the table cannot be read (an "
        "I/O error: the message names the table and the byte; or no table at that path), or 75 "
        "(no verdict) when the table was being made anew over its path, or compacted (the version "
        "read removed), while it ran: run it again once the writer is done. "
        "With --add-page-checksums: check the "
        "blocks, then write the page checksums (NAME.npy.pages.crc32c, which every cold read "
        "checks) and record them in the manifest, atomically; for tables made before them. "
        "A compacted table is checked in its current version (the file TABLE.npy.current names).",
    )
    p.add_argument("table", type=given_path, help="the table's .npy path (its first version)")
    p.add_argument(
        "--add-page-checksums",
        action="store_true",
        help="compute and add (or rebuild) the table's page checksums",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from .delta.table_versions import present_version
    from .errors import TableFormatError
    from .table_format import (
        TableChangingError,
        TableNotFoundError,
        add_page_checksums,
        not_a_table,
        table_paths,
        verify_table,
    )

    wrong = not_a_table(args.table)
    if wrong is not None:  # a usage error (exit 2), not a table that failed its checks (1)
        raise wrong
    path = None  # the version checked, once found
    try:
        path = present_version(args.table)[0]
        if args.add_page_checksums:
            report = add_page_checksums(path, progress=not args.quiet)
        else:
            report = verify_table(path, progress=not args.quiet)
    except TableChangingError as exc:  # not a corrupt table: a writer's, not done yet
        print(f"tiered-store verify: NO VERDICT: {exc}", file=sys.stderr)
        return VERIFY_NO_VERDICT
    except (TableFormatError, TableNotFoundError) as exc:
        now = None if path is None else _compacted_since(args.table, path)
        if now is not None:  # the version read was compacted and removed: no verdict on it
            print(
                f"tiered-store verify: NO VERDICT: {exc}; the table was compacted while verify "
                f"ran (its current version is now {now.name}): run it again",
                file=sys.stderr,
            )
            return VERIFY_NO_VERDICT
        if isinstance(exc, TableNotFoundError):
            raise
        print(f"tiered-store verify: FAILED: {exc}", file=sys.stderr)
        return 1
    same = path.resolve() == table_paths(args.table)[0].resolve()
    label = args.table if same else f"{args.table} ({path.name})"
    seconds = max(report.seconds, 1e-9)
    speed = f"in {report.seconds:.2f} s ({report.bytes_checked / seconds / 1e6:,.0f} MB/s)"
    blocks = f"{report.blocks_checked:,} blocks, {report.bytes_checked:,} bytes"
    if not report.manifest_checksum:  # a note, not a failure: older versions wrote none
        print(
            f"{label}: note: its manifest has no checksum of its own (written before manifest "
            "checksums), so damage to it is not detected; `tiered-store verify "
            f"--add-page-checksums {args.table}` rewrites it with one",
            file=sys.stderr,
        )
    if args.add_page_checksums:
        print(
            f"{label}: OK: {blocks} checked, {report.pages_checked:,} page checksums added {speed}"
        )
    elif report.pages_checked:
        print(f"{label}: OK: {blocks}, {report.pages_checked:,} pages checked {speed}")
    else:
        print(
            f"{label}: OK: {blocks} checked {speed}; no page checksums, so reads of it are "
            f"not verified: add them with `tiered-store verify --add-page-checksums {args.table}`"
        )
    return 0


def _compacted_since(table: Path, read: Path) -> Path | None:
    """The current version of ``table`` when a compaction replaced (and removed) the version
    ``read`` since it was read; None otherwise."""
    from .delta.table_versions import current_version
    from .errors import TableFormatError

    if read.exists():
        return None
    try:
        now = current_version(table)[0]
    except (TableFormatError, OSError):  # no pointer to read: not a compaction's doing
        return None
    return now if now.resolve() != read.resolve() and now.exists() else None


def _add_shard(sub) -> None:
    p = sub.add_parser(
        "shard",
        help=command_help("shard"),
        description="Cut TABLE into RANKS shard tables, NAME.shard-R-of-RANKS.npy next to it (or "
        "--out with {rank} and {ranks}), each with its manifest and page checksums, published "
        "atomically. --by heads (default) cuts at the hash-head boundaries the manifest's Engram "
        "metadata records (whole heads per rank; heads split into row ranges when there are fewer "
        "heads than ranks); --by rows cuts equal row ranges (any table). Each shard's manifest "
        "records the shard map, the table's version and the run's id, which ShardedStore (and "
        "unshard) check on every rank: a set of two runs' shards (a --overwrite killed between "
        "its renames) is named a mixed set. "
        "A compacted table is cut in its current version, its rows checked against its page "
        "checksums; a table with written rows not yet compacted is refused (`tiered-store "
        "compact` it first).",
    )
    p.add_argument(
        "table", type=given_path, help="the table to cut (.npy; its current version is cut)"
    )
    p.add_argument("--ranks", type=int, required=True, help="number of ranks (shards)")
    p.add_argument("--by", choices=["heads", "rows"], help="default: heads")
    p.add_argument(
        "--out",
        type=path_template,
        default=None,
        help="shard path template with {rank} (and {ranks})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing shard files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_shard)


def _run_shard(args) -> int:
    from .distributed import write_shards
    from .table_format import TableExistsError, not_a_table

    wrong = not_a_table(args.table)
    if wrong is not None:
        raise wrong
    if args.out is not None and "{rank}" not in args.out:
        raise _usage(f"--out: got {args.out!r}; expected a path template containing {{rank}}")
    if args.out is not None:  # rank 0's shard checked as every output table, before any work
        first = args.out.replace("{rank}", "0").replace("{ranks}", str(args.ranks))
        try:
            output_table(first)
        except argparse.ArgumentTypeError as exc:
            raise _usage(f"--out {args.out!r}: rank 0's shard {exc}") from None
    by = args.by or "heads"
    try:
        shards = write_shards(
            args.table,
            args.ranks,
            by,
            template=args.out,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except TableExistsError as exc:
        raise _name_overwrite(exc) from None
    except ConfigError as exc:  # named by the option the user typed (or left at its default)
        error = as_option_error(exc, ["ranks", "by"])
        if args.by is None and str(error).startswith("--by: 'heads' but"):
            error = ConfigError(str(error).replace("'heads' but", "'heads' (the default) but", 1))
        raise error from None
    for shard in shards:
        start, stop = shard.shard_map.shard_range(shard.rank)
        print(f"rank {shard.rank}: {shard.path} rows [{start:,}, {stop:,})")
    print(f"by {by}, table version {shards[0].shard_map.table_version}")
    return 0


def _add_unshard(sub) -> None:
    p = sub.add_parser(
        "unshard",
        help=command_help("unshard"),
        description="Write TABLE from its shards: every shard's current rows (a compacted shard's "
        "current version) in global row order, read through their page checksums, with the "
        "table's metadata (the Engram layout; a trainable table's optimizer and run id) and the "
        "shards' committed step; the shard metadata is dropped. Name the shards as `shard` wrote "
        "them, --ranks N (NAME.shard-R-of-N.npy next to TABLE, or --shards with the template "
        "given to `shard --out`), or list the shard files after TABLE. TABLE is published "
        "atomically: a run that fails or is killed leaves no half table and an old one as it was; "
        "an existing TABLE (the table the shards were cut from, or an earlier unshard of them: "
        "metadata.joined_from records the shards' table version and `shard` run) needs "
        "--overwrite, which drops its writes and versions; another table there is refused (remove "
        "it first). Refused before writing: a missing shard, shards of different shard "
        "maps, table versions or `shard` runs, two shards of one rank, shards at different committed steps (a "
        "torn commit: resume and commit again on every rank), a shard with written rows not yet "
        "compacted (`tiered-store compact` each shard first), a shard being written, TABLE being "
        "one of the shards. To re-shard for another number of ranks: unshard, then `tiered-store "
        "shard TABLE --ranks M`.",
    )
    p.__class__ = IntermixedParser  # `unshard OUT --overwrite SHARD...`: the shards after options
    p.add_argument("table", type=output_table, help="the whole table to write (.npy)")
    p.add_argument(
        "shard_files",
        nargs="*",
        default=[],  # (without it, argparse names SHARD as required when TABLE is missing)
        type=given_path,
        metavar="SHARD",
        help="the shard files (or --ranks)",
    )
    p.add_argument("--ranks", type=int, help="number of shards `shard --ranks` cut TABLE into")
    p.add_argument(
        "--shards",
        type=path_template,
        default=None,
        metavar="TEMPLATE",
        help="with --ranks: the shard path template with {rank} given to `shard --out`",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing TABLE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_unshard)


def _run_unshard(args) -> int:
    from .distributed import join_shards
    from .table_format import TableExistsError, table_paths

    if args.table.is_dir():
        raise _usage(f"TABLE: {args.table} is a directory; expected the table file to write (.npy)")
    if args.shard_files and args.ranks is not None:
        raise _usage(
            f"--ranks {args.ranks} with shard files; expected one: --ranks N (the shards `shard` "
            "wrote for TABLE) or the shard files"
        )
    if args.shards is not None and args.ranks is None:
        raise _usage(f"--shards {args.shards!r} without --ranks; expected --ranks N with it")
    if args.shards is not None and "{rank}" not in args.shards:
        raise _usage(f"--shards: got {args.shards!r}; expected a path template containing {{rank}}")
    if not args.shard_files and args.ranks is None:
        raise _usage(
            "no shards: expected --ranks N (the shards `tiered-store shard TABLE --ranks N` "
            "wrote) or the shard files after TABLE"
        )
    try:
        if args.shard_files:
            manifest = join_shards(
                args.shard_files, args.table, progress=not args.quiet, overwrite=args.overwrite
            )
        else:
            manifest = join_shards(
                args.table,
                ranks=args.ranks,
                template=args.shards,
                progress=not args.quiet,
                overwrite=args.overwrite,
            )
    except TableExistsError as exc:
        raise _name_overwrite(exc) from None
    except ConfigError as exc:
        raise as_option_error(exc, ["ranks"]) from None
    shards = len(args.shard_files) or args.ranks
    print(
        f"wrote {table_paths(args.table)[0]}: {manifest.rows:,} x {manifest.dim} {manifest.dtype} "
        f"from {shards} shards, committed step {manifest.metadata.get('committed_step', 0)}"
    )
    return 0


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, dim = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise _usage(f"--random: got {shown(text)}; expected ROWSxDIM like 1000000x64") from None
    if rows <= 0 or dim <= 0:
        raise _usage(f"--random: got {shown(text)}; expected positive ROWS and DIM")
    return rows, dim


def _usage(message: str) -> TieredStoreError:
    return ConfigError(message)


def _add_convert_hf(sub) -> None:
    from .cold_table import IO_MODES

    p = sub.add_parser(
        "convert-hf",
        help=command_help("convert-hf"),
        description="Read CHECKPOINT_DIR (config.json, model.safetensors or shards with "
        "model.safetensors.index.json, optionally tokenizer.json), check every Engram tensor "
        "against the config, then write to OUT_DIR one table of packed fp8 rows per Engram layer "
        "(engram_layer{L}.npy), dense.safetensors (wkv, q_weight, k_weight), config.json, "
        "tokenizer.json and layer{L}.yaml, a store config for TieredStore.open. Tables stream in "
        "bounded memory; every file is published atomically; rerun after a kill to finish (complete "
        "tables are kept). config.json is written last: until a conversion into an OUT_DIR that "
        "held another is complete, OUT_DIR has none. Before it, that other conversion's tables "
        "and layer{L}.yaml of layers this checkpoint has not are removed (each file named; one a "
        "store has open or has written stays, with a warning).",
    )
    p.add_argument(
        "checkpoint",
        type=given_path,
        metavar="CHECKPOINT_DIR",
        help="the downloaded Hugging Face checkpoint (config.json, *.safetensors)",
    )
    p.add_argument(
        "out_dir",
        type=output_folder,
        metavar="OUT_DIR",
        help="where the tables, dense.safetensors and layer{L}.yaml go (made if missing, in a "
        "folder that is there)",
    )
    p.add_argument(
        "--hot",
        type=capacity,
        default="1%",
        help="hot tier capacity in layer{L}.yaml: rows, bytes or %% (default 1%%)",
    )
    p.add_argument(
        "--warm",
        type=capacity,
        default="5%",
        help="warm tier capacity in layer{L}.yaml: rows, bytes or %% (default 5%%)",
    )
    p.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="hot tier device in layer{L}.yaml: cpu, cuda or cuda:N (default cpu)",
    )
    p.add_argument(
        "--io",
        choices=list(IO_MODES),
        default="direct",
        help="cold reads (default direct)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_convert_hf)


def _run_convert_hf(args) -> int:
    import torch

    from .engram.hf_checkpoint import DEFAULT_STORE, convert_hf_checkpoint

    tiers = DEFAULT_STORE["tiers"]
    store = {
        **DEFAULT_STORE,
        "tiers": {
            "hot": {**tiers["hot"], "capacity": args.hot, "device": args.device},
            "warm": {**tiers["warm"], "capacity": args.warm},
            "cold": {**tiers["cold"], "io": args.io},
        },
    }
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"note: no CUDA here; the layer configs name {args.device!r} for the machine that "
            "serves them (TieredStore.open refuses it where CUDA is missing)",
            file=sys.stderr,
        )
    try:
        with saying_made(args.out_dir, "OUT_DIR"):
            result = convert_hf_checkpoint(
                args.checkpoint, args.out_dir, store=store, progress=not args.quiet
            )
    except KeyboardInterrupt:
        print(
            "convert-hf: stopped; finished layers are kept and open now (layerL.yaml): run the "
            "same command again to finish the rest",
            file=sys.stderr,
        )
        raise
    for layer, path in result.tables.items():
        note = " (already complete)" if layer in result.skipped else ""
        print(f"layer {layer}: {path}{note}; store config {result.store_configs[layer]}")
    print(f"dense Engram weights: {result.dense}")
    for layer, names in result.removed.items():
        print(
            f"layer {layer}: removed an earlier conversion's {', '.join(names)} from "
            f"{result.directory} (not an Engram layer of this checkpoint)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
