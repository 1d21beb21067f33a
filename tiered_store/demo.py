"""``tiered-store demo``: an Engram language model over real text, tables in memory vs tiered.

Builds a small Engram LM (random weights), converts it into a checkpoint directory (one table file
per Engram layer plus the dense weights), then runs the same model over the same batches of real
text (by default the Python standard library's sources, tokenised with the DeepSeek tokenizer)
twice: with each Engram table loaded into memory, and with each table in a ``TieredStore`` (hot
and warm caches in front of the table file, rows prefetched a batch ahead). The two runs alternate
in rounds; the report compares tokens/s, shows per-tier hit rates and the time lookups stalled,
and checks that the tiered logits are bit-identical to the in-memory ones (batch 0 and every
10th batch after it).
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import model_validator
from tqdm.auto import tqdm

from .atomic_file import scratch_directory
from .capacity import format_bytes, resolve_capacity
from .cli_args import capacity, command_help, device_name, given_path, make_folder, output_folder
from .cold_table import IO_MODES
from .config import (
    ConfigModel,
    FieldError,
    PrefetchConfig,
    TiersConfig,
    checked_by,
    checked_path_text,
    config_folder,
    int_at_least,
    load_yaml,
    no_nul,
)
from .engram.config import ModelConfig, v41_refusal
from .errors import ConfigError, shown
from .stats import hit_ratio

# Built-in defaults of the demo (examples/engram-demo.yaml spells out the same values).
DEMO_DEFAULTS: dict[str, Any] = {
    "engram": {
        "engram_vocab_size": [62500, 62500],  # rows per head before prime rounding, n = 2, 3
        "max_ngram_size": 3,
        "n_embed_per_ngram": 128,  # 4 heads x 32 wide rows per n-gram order
        "n_head_per_ngram": 4,
        "layer_ids": [1, 3],
    },
    "backbone": {"hidden_size": 512, "hc_mult": 4, "num_layers": 4},
    "transformer": {"num_attention_heads": 8},
    "tiers": {
        "hot": {"capacity": "5%", "device": "cpu", "policy": "lru"},
        "warm": {"capacity": "20%", "policy": "lru"},
        "cold": {"io": "pread", "threads": 4},
    },
    "prefetch": {"depth": 2},
    "run": {
        "batches": 16,  # measured batches (each run once per variant)
        "batch_size": 2048,  # tokens per batch (whole sequences: a multiple of seq_len)
        "seq_len": 256,  # tokens per sequence
        "rounds": 4,  # the two variants alternate this many times
        "lookahead": 1,  # batches prefetched ahead of the one computing
        "warm_start_tokens": 200_000,  # profiled (hashing only) to preload hot/warm; 0 = cold start
        "dtype": "float32",  # table dtype on disk
        "corpus": None,  # paths/globs; None = the Python standard library's sources
        "seed": 0,
    },
}
CHECK_EVERY = 10  # compare tiered with in-memory logits on every 10th batch
# Command-line options that set a key of the run section (option --batch-size: key batch_size).
_RUN_OPTIONS = (
    "batches",
    "batch_size",
    "seq_len",
    "rounds",
    "lookahead",
    "warm_start_tokens",
    "dtype",
    "seed",
)
# Command-line options that set a key of a tier: option -> (tier, key).
_TIER_OPTIONS = {
    "hot": ("hot", "capacity"),
    "warm": ("warm", "capacity"),
    "io": ("cold", "io"),
    "device": ("hot", "device"),
}


def _check_dtype(value: Any) -> str:
    """A table dtype name."""
    if value in ("float32", "float16", "bfloat16"):
        return value
    raise ValueError(f"expected float32, float16 or bfloat16, got {shown(value)}")


def _check_corpus(value: Any) -> list[str] | None:
    """``None`` or a list of paths/globs (without a NUL: pathlib raised a bare ValueError)."""
    if value is None or (isinstance(value, list) and all(isinstance(c, str) for c in value)):
        return value if value is None else [no_nul(c) for c in value]
    raise ValueError(f"expected a list of paths or globs, got {shown(value)}")


class RunConfig(ConfigModel):
    """The demo's ``run`` section: what the demo does (defaults: ``DEMO_DEFAULTS["run"]``)."""

    section: ClassVar[tuple[str, ...]] = ("run",)
    batches: int_at_least(1)
    batch_size: int_at_least(1)
    seq_len: int_at_least(1)
    rounds: int_at_least(1)
    lookahead: int_at_least(0)
    warm_start_tokens: int_at_least(0)
    dtype: checked_by(_check_dtype, str)
    corpus: checked_by(_check_corpus, list)
    seed: int_at_least(0)


class DemoConfig(ModelConfig):
    """The demo's configuration: the model's sections, the store's (without ``table``) and ``run``.

    Examples
    --------
    >>> demo = DemoConfig.from_dict(DEMO_DEFAULTS)
    >>> demo.run.batches, demo.tiers.hot.capacity, demo.model.backbone.hidden_size
    (16, '5%', 512)
    """

    tiers: TiersConfig
    prefetch: PrefetchConfig
    run: RunConfig

    @model_validator(mode="after")
    def _check_whole_sequences(self) -> DemoConfig:
        """A batch is whole sequences: its tokens a multiple of the sequence length."""
        if self.run.batch_size % self.run.seq_len:
            raise FieldError(
                ("run", "batch_size"),
                f"expected a multiple of run.seq_len={self.run.seq_len} (a batch is whole "
                f"sequences), got {self.run.batch_size}",
            )
        return self

    @model_validator(mode="after")
    def _check_float_tables(self) -> DemoConfig:
        """The demo converts its model with ``save_tiered``: float tables only."""
        if self.engram.is_v41:
            raise FieldError(
                ("engram", "geometry"),
                f"{v41_refusal('the demo cannot convert into table files')}; a DeepSeek-V4.1 "
                "checkpoint converts with `tiered-store convert-hf`",
            )
        return self

    @property
    def model(self) -> ModelConfig:
        """The model's sections alone."""
        return ModelConfig(engram=self.engram, backbone=self.backbone, transformer=self.transformer)


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    run, tiers = DEMO_DEFAULTS["run"], DEMO_DEFAULTS["tiers"]
    backbone = DEMO_DEFAULTS["backbone"]
    p = sub.add_parser(
        "demo",
        help=command_help("demo"),
        description=__doc__.split("\n\n", 1)[1].replace("``", "")
        + "\nNo arguments needed; options override the built-in defaults and --config.",
        epilog="examples:\n"
        "  tiered-store demo\n"
        "  tiered-store demo --config examples/engram-demo.yaml --io direct --warm 10%\n"
        "  tiered-store demo --corpus 'docs/**/*.md' --batches 48 --device cuda",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        type=given_path,
        help="YAML with engram/backbone/transformer (model), tiers/prefetch (store) and run "
        "sections; examples/engram-demo.yaml spells out the defaults",
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help="files, directories (every text file below) or globs (default: the Python stdlib's "
        "sources)",
    )
    p.add_argument("--batches", type=int, help=f"measured batches (default {run['batches']})")
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"tokens per batch, a multiple of --seq-len (default {run['batch_size']})",
    )
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {run['seq_len']})")
    p.add_argument(
        "--rounds", type=int, help=f"times the two variants alternate (default {run['rounds']})"
    )
    p.add_argument(
        "--lookahead", type=int, help=f"batches prefetched ahead (default {run['lookahead']})"
    )
    p.add_argument(
        "--warm-start-tokens",
        type=int,
        help="tokens of other text profiled to preload the hot/warm tiers; 0 = start with empty "
        f"caches (default {run['warm_start_tokens']})",
    )
    p.add_argument(
        "--rows",
        type=int,
        help="rows per Engram table: sets engram_vocab_size (each head's table is rounded up to "
        "a prime)",
    )
    p.add_argument(
        "--hidden-size", type=int, help=f"model width (default {backbone['hidden_size']})"
    )
    engram_layers = DEMO_DEFAULTS["engram"]["layer_ids"]
    p.add_argument(
        "--layers",
        type=int,
        help=f"Transformer layers (default {backbone['num_layers']}); more than the largest "
        f"Engram layer id ({max(engram_layers)} of {engram_layers}: engram.layer_ids in --config)",
    )
    p.add_argument(
        "--hot",
        type=capacity,
        help="hot tier capacity per table: rows, bytes like 64MiB, or %% of the table "
        f"(default {tiers['hot']['capacity']})".replace("%)", "%%)"),
    )
    p.add_argument(
        "--warm",
        type=capacity,
        help=f"warm tier capacity per table (default {tiers['warm']['capacity']})".replace(
            "%)", "%%)"
        ),
    )
    p.add_argument(
        "--io",
        choices=list(IO_MODES),
        help=f"cold tier I/O (default {tiers['cold']['io']})",
    )
    p.add_argument(
        "--device",
        type=device_name,
        help=f"compute device and hot tier: cpu, cuda, cuda:N (default {tiers['hot']['device']})",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help=f"table dtype on disk (default {run['dtype']})",
    )
    p.add_argument(
        "--workdir",
        type=output_folder,
        help="where the run's temporary folder (the checkpoint's tables, removed at exit) goes, "
        "e.g. on the NVMe disk to measure: a folder that is there, or a new one (made, and said) "
        "in one that is there (default: the system's temporary directory)",
    )
    p.add_argument(
        "--seed", type=int, help=f"seed of the weights and file order (default {run['seed']})"
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help=f"skip the bit-identity check (of every {CHECK_EVERY}th batch, from the first)",
    )
    p.set_defaults(run=run_demo)


@dataclass
class _Variant:
    """One way of serving the tables, and what its runs measured."""

    name: str
    tables: dict[int, Any]
    prefetch: bool = True
    tokens: int = 0
    seconds: float = 0.0
    lookup_seconds: float = 0.0
    stall_seconds: float = 0.0
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    round_rates: list[float] = field(default_factory=list)  # tokens/s of each round

    @property
    def tokens_per_second(self) -> float:
        """Throughput over every measured batch."""
        return self.tokens / self.seconds if self.seconds else 0.0


def _check_capacities(demo: DemoConfig, model: Any) -> None:
    """Each tier's capacity against every Engram table it will hold; errors name the key."""
    row_bytes = (
        demo.model.engram.head_dim
        * torch.empty(0, dtype=getattr(torch, demo.run.dtype)).element_size()
    )
    for layer in demo.model.engram.layer_ids:
        for name in ("hot", "warm"):
            resolve_capacity(
                getattr(demo.tiers, name).capacity,
                table_rows=model.hasher.table_rows(layer),
                row_bytes=row_bytes,
                key=f"tiers.{name}.capacity",
            )


def run_demo(args) -> int:
    """Run the demo with parsed arguments; prints the report and returns 0 on success."""
    from .corpus import resolve_corpus
    from .engram.checkpoint import load_table_in_memory, open_tables, save_tiered
    from .engram.corpus import read_tokens, token_batches
    from .engram.model import EngramLM, check_model_memory
    from .engram.pipeline import profile_rows
    from .store import compute_device

    settings = demo_settings(args)
    demo = DemoConfig.from_dict(settings, source="demo settings")  # checked before any work
    run = demo.run
    device = compute_device(demo.tiers.hot.device, "--device")  # before any work
    check_model_memory(demo.model, names=_model_options(args))
    torch.manual_seed(run.seed)
    if args.workdir is not None:
        make_folder(args.workdir, "--workdir")
    print("building the model and tokenizer ...", flush=True)
    model = EngramLM(demo.model).eval()
    _check_capacities(demo, model)  # before the warm-start profile and the conversion
    corpus = resolve_corpus(run.corpus).shuffled(run.seed)  # sample the whole corpus
    seq_len = run.seq_len
    rows_per_batch = run.batch_size // seq_len
    per_batch = rows_per_batch * seq_len
    profiled = -(-run.warm_start_tokens // per_batch) * per_batch
    tokens = read_tokens(
        corpus, model.hasher.tokenizer, max_tokens=profiled + run.batches * per_batch
    )
    if len(tokens) < per_batch:  # named with the corpus's own count, before it is cut
        token_batches(tokens, rows_per_batch, seq_len)
    # a small corpus: measured batches first, the warm-start profile gets what is left
    measured = min(run.batches, len(tokens) // per_batch) * per_batch
    profiled = min(profiled, len(tokens) - measured) // per_batch * per_batch
    batches = token_batches(tokens[profiled : profiled + measured], rows_per_batch, seq_len)
    with scratch_directory("tiered-store-demo-", args.workdir) as tmp:
        print(f"converting the checkpoint into {tmp} ...", flush=True)
        converted = save_tiered(model, tmp, dtype=run.dtype)
        memory = _Variant(
            "table in memory",
            {i: load_table_in_memory(p).to(device) for i, p in converted.table_paths.items()},
        )
        model.set_tables(memory.tables)  # the same values the table files hold
        model.to(device)
        store = {k: settings[k] for k in ("tiers", "prefetch")}
        hottest = None
        if profiled:  # other text than the measured batches: the store's earlier traffic
            print(f"profiling {profiled:,} tokens for the warm start ...", flush=True)
            hottest = profile_rows(model, token_batches(tokens[:profiled], rows_per_batch, seq_len))
        stores = open_tables(converted.table_paths, model.hasher, store, warm_start=hottest)
        tiered = _Variant("tiered store", stores)
        try:
            _print_setup(model, converted, demo, corpus, batches)
            checked = _run_rounds(model, [memory, tiered], batches, run, check=not args.no_check)
            _report(memory, tiered, checked, demo.tiers.cold.io)
        finally:
            for store_ in tiered.tables.values():
                store_.close()
    return 0


def _model_options(args) -> dict[str, str]:
    """The model settings given as options, as the command line says them."""
    names = {}
    if args.rows is not None:
        names["engram.engram_vocab_size"] = f"--rows {args.rows}"
    if args.hidden_size is not None:
        names["backbone.hidden_size"] = f"--hidden-size {args.hidden_size}"
    return names


def demo_settings(args) -> dict[str, Any]:
    """Built-in defaults, overlaid with ``--config`` and then with the command-line options.

    The result is plain data; ``DemoConfig.from_dict`` checks it (``run_demo`` does, before any
    work starts)."""
    settings = _merge(DEMO_DEFAULTS, _read_config(args.config) if args.config else {})
    if args.config:  # the file's run section on its own: options replace values, not mistakes
        RunConfig.from_dict(settings["run"], source=str(args.config))
    options = vars(args)
    for key in _RUN_OPTIONS:
        if options.get(key) is not None:
            settings["run"][key] = options[key]
    if args.corpus:
        settings["run"]["corpus"] = list(args.corpus)
    if args.hidden_size is not None:
        settings["backbone"]["hidden_size"] = args.hidden_size
    if args.layers is not None:
        settings["backbone"]["num_layers"] = args.layers
    if args.rows is not None:
        engram = settings["engram"]
        orders = int(engram["max_ngram_size"]) - 1
        heads = int(engram["n_head_per_ngram"])
        if args.rows < orders * heads * 2:
            raise ConfigError(
                f"--rows: expected at least {orders * heads * 2} ({orders} orders x {heads} "
                f"heads x 2), got {args.rows}"
            )
        engram["engram_vocab_size"] = [args.rows // (orders * heads)] * orders
    for option, (tier, key) in _TIER_OPTIONS.items():
        if options.get(option) is not None:
            settings["tiers"].setdefault(tier, {})[key] = options[option]
    return settings


def _read_config(path: Path) -> dict[str, Any]:
    """The demo YAML: known sections only, each a mapping (their keys are DemoConfig's to check)."""
    data = load_yaml(path, what="--config")
    # a known section left empty (its keys commented out) takes the defaults
    data = {k: v for k, v in data.items() if v is not None or k not in DEMO_DEFAULTS}
    for key, value in data.items():
        if key not in DEMO_DEFAULTS:
            raise ConfigError(
                f"{path}: {key}: unknown section; expected one of {sorted(DEMO_DEFAULTS)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
    return _relative_to(path, data)


def _relative_to(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its relative paths (``run.corpus``, the tiers' row lists and profiles) made
    relative to the folder of ``path``, the YAML, as every config file's paths are; a ``~`` that
    cannot be read (HOME set but empty) is refused naming the file and the key."""

    folder = config_folder(path)  # (/dev/fd/N, /dev/stdin: the folder of the file open there)

    def under(text: Any, key: str) -> Any:
        if not isinstance(text, str):
            return text  # DemoConfig names what is wrong with it
        text = checked_path_text(folder, text, f"{path}: {key}")
        return text if os.path.isabs(text) else os.path.join(folder, text)  # ('./~' kept)

    run = data.get("run") or {}
    if isinstance(run.get("corpus"), list):
        run["corpus"] = [under(entry, "run.corpus") for entry in run["corpus"]]
    for name, tier in (data.get("tiers") or {}).items():
        for key in ("static_rows", "preload_rows", "profile"):
            if isinstance(tier, dict) and key in tier:
                tier[key] = under(tier[key], f"tiers.{name}.{key}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep copy of ``base`` with ``over`` merged in (mappings recursively, the rest replaced; a
    mapping left empty in ``over``, YAML's null, keeps ``base``'s)."""
    out = {k: _merge(v, {}) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in over.items():
        if isinstance(out.get(key), dict) and (value is None or isinstance(value, dict)):
            out[key] = _merge(out[key], value or {})
        else:
            out[key] = value
    return out


def _run_rounds(model, variants: list[_Variant], batches, run: RunConfig, *, check: bool) -> int:
    """Alternate the variants over consecutive groups of batches; returns batches checked."""
    from .engram.corpus import iter_batches
    from .engram.pipeline import PrefetchPipeline

    # one untimed batch per variant first: threads, allocator and caches start here
    for variant in variants:
        model.set_tables(variant.tables)
        for _ in PrefetchPipeline(model).run(batches[:1]):
            pass
    checked = 0
    bar = tqdm(total=len(batches) * len(variants), desc="forward", unit="batch")
    offset = 0
    for r, group in enumerate(iter_batches(batches, min(run.rounds, len(batches)))):
        order = variants if r % 2 == 0 else variants[::-1]
        for variant in order:
            model.set_tables(variant.tables)
            bar.set_description(variant.name)
            pipeline = PrefetchPipeline(model, lookahead=run.lookahead, prefetch=variant.prefetch)
            for i, (_, out) in enumerate(pipeline.run(group)):
                if check and (offset + i) % CHECK_EVERY == 0:
                    variant.outputs[offset + i] = out.cpu()
                bar.update()
            _accumulate(variant, pipeline.stats)
        if check:
            checked += _compare(variants, offset, len(group))
        offset += len(group)
    bar.close()
    return checked


def _accumulate(variant: _Variant, stats) -> None:
    """Add one run's statistics to the variant's totals (tier counters summed over layers)."""
    variant.tokens += stats.tokens
    variant.seconds += stats.seconds
    variant.round_rates.append(stats.tokens_per_second)
    variant.lookup_seconds += stats.lookup_seconds
    variant.stall_seconds += stats.stall_seconds
    for layer_stats in stats.tables.values():
        for tier in ("hot", "warm", "cold"):
            totals = variant.tiers.setdefault(tier, {})
            for key, value in layer_stats[tier].items():
                if key not in ("hit_rate", "capacity", "occupancy"):
                    totals[key] = totals.get(key, 0) + value
    for tier in ("hot", "warm"):
        if tier in variant.tiers:
            t = variant.tiers[tier]
            t["capacity"] = sum(s[tier]["capacity"] for s in stats.tables.values())


def _compare(variants: list[_Variant], offset: int, count: int) -> int:
    """Check the variants' saved outputs of batches [offset, offset + count) are bit-identical."""
    reference, *others = variants
    done = 0
    for index in range(offset, offset + count):
        if index not in reference.outputs:
            continue
        want = reference.outputs.pop(index)
        for other in others:
            got = other.outputs.pop(index)
            if not torch.equal(got, want):
                diff = (got.float() - want.float()).abs().max().item()
                raise AssertionError(
                    f"demo: batch {index}: {other.name} logits differ from {reference.name} "
                    f"(max |diff| {diff:.3g}); expected bit-identical results"
                )
        done += 1
    return done


def _print_setup(model, converted, demo: DemoConfig, corpus, batches) -> None:
    """What is about to run."""
    cfg = model.config
    tiers, run = demo.tiers, demo.run
    table_bytes = sum(p.stat().st_size for p in converted.table_paths.values())
    tables = model.tables
    rows = sorted({int(t.rows) for t in tables.values()})
    dim = cfg.engram.head_dim
    dense = model.dense_parameters()
    print(
        f"\nmodel   {cfg.backbone.num_layers} layers x {cfg.backbone.hidden_size} hidden, "
        f"hc_mult {cfg.backbone.hc_mult}, {cfg.transformer.num_attention_heads} attention heads, "
        f"Engram at layers {list(cfg.engram.layer_ids)}; {dense / 1e6:.1f}M dense parameters"
    )
    print(
        f"tables  {len(tables)} x {'/'.join(f'{r:,}' for r in rows)} rows x {dim} {run.dtype} "
        f"(one table file per Engram layer, {format_bytes(table_bytes)} on disk, "
        f"{model.table_parameters() / max(dense, 1):.1f}x the dense parameters)"
    )
    hot, warm, cold = tiers.hot, tiers.warm, tiers.cold
    print(
        f"store   hot {hot.capacity} ({hot.device}, {hot.policy}), warm {warm.capacity} "
        f"({warm.policy}), cold io {cold.io}; prefetch lookahead {run.lookahead} batch(es)"
    )
    b, t = batches[0].shape
    print(
        f"corpus  {len(batches) * b * t:,} tokens measured, {len(batches)} batches of {b} x {t}, "
        f"from {corpus.description}; torch threads {torch.get_num_threads()}\n",
        flush=True,
    )


def _report(memory: _Variant, tiered: _Variant, checked: int, io: str) -> None:
    """The paper-style table: throughput, overhead, hit rates, stall (``io``: the cold tier's)."""
    # rounds alternate the variants on a shared machine: compare round by round, take the median
    ratios = [t / m for t, m in zip(tiered.round_rates, memory.round_rates, strict=True) if m]
    ratio = statistics.median(ratios) if ratios else 0.0
    print(f"\n{'':<18}{'tokens/s':>10}{'vs memory':>11}{'lookup s':>10}{'stall s':>9}")
    print(f"{memory.name:<18}{memory.tokens_per_second:>10,.0f}{1.0:>11.3f}{'-':>10}{'-':>9}")
    print(
        f"{tiered.name:<18}{tiered.tokens_per_second:>10,.0f}{ratio:>11.3f}"
        f"{tiered.lookup_seconds:>10.3f}{tiered.stall_seconds:>9.3f}"
    )
    print(
        f"tiered-store overhead: {(1 - ratio) * 100:+.1f}% of the in-memory throughput "
        f"({tiered.tokens:,} tokens per variant; median of the per-round ratios "
        f"{', '.join(f'{r:.3f}' for r in ratios)}; on a shared machine rounds vary by a few %)\n"
    )
    print(
        f"{'tier':<6}{'capacity':>12}{'hit rate':>10}{'lookups':>13}{'admissions':>12}{'evictions':>11}"
    )
    for name in ("hot", "warm"):
        t = tiered.tiers.get(name, {})
        rate = hit_ratio(t.get("hits", 0), t.get("lookups", 0))
        print(
            f"{name:<6}{t.get('capacity', 0):>12,}{rate:>10.1%}{t.get('lookups', 0):>13,}"
            f"{t.get('admissions', 0):>12,}{t.get('evictions', 0):>11,}"
        )
    cold = tiered.tiers.get("cold", {})
    hot = tiered.tiers.get("hot", {})
    served = hot.get("hits", 0) + tiered.tiers.get("warm", {}).get("hits", 0)
    total = hot.get("lookups", 0)
    # bytes moved: whole pages but with mmap (ColdTable.bytes_read), not the rows' own size
    moved = format_bytes(cold.get("bytes_read", 0))
    moved += " of rows" if io == "mmap" else " read in whole pages"
    print(
        f"cold  {cold.get('rows_read', 0):>12,} rows read ({moved}); "
        f"caches served {hit_ratio(served, total):.1%} of {total:,} row lookups"
    )
    if checked:
        noun = "batch" if checked == 1 else "batches"
        print(f"\nresults checked on {checked} {noun}: tiered logits bit-identical to in-memory")
