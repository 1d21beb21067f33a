"""``tiered-store demo``: end to end with tiny sizes, its options, config file and errors."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import yaml

from tiered_store.cli import build_parser, main
from tiered_store.config import StoreConfig
from tiered_store.corpus import resolve_corpus
from tiered_store.demo import DEMO_DEFAULTS, DemoConfig, demo_settings
from tiered_store.engram.model import ModelConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "engram-demo.yaml"
TINY_ARGS = [
    "--batches", "4",
    "--batch-size", "128",
    "--seq-len", "64",
    "--rounds", "2",
    "--rows", "4000",
    "--hidden-size", "32",
    "--layers", "4",
    "--warm-start-tokens", "512",
    "--corpus", str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py"),
]  # fmt: skip


def _parse(argv: list[str]):
    return build_parser().parse_args(["demo", *argv])


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", *TINY_ARGS, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for expected in ("table in memory", "tiered store", "overhead", "hit rate", "stall"):
        assert expected in out
    for tier in ("hot", "warm", "cold"):
        assert f"\n{tier} " in out
    # pread reads whole pages: their bytes were shown as the rows' ("1,338 rows read (2.9 MiB)"
    # for rows of 128 bytes)
    assert re.search(r"\ncold +[\d,]+ rows read \([\d.]+ [KMG]iB read in whole pages\)", out)
    assert "results checked on 1 batch: tiered logits bit-identical" in out
    assert list(tmp_path.iterdir()) == []  # the work directory is cleaned up


def test_demo_config_file_and_overrides(tmp_path, capsys):
    config = tmp_path / "demo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "engram": {"n_embed_per_ngram": 64, "n_head_per_ngram": 2, "layer_ids": [0]},
                "backbone": {"num_layers": 2},
                "tiers": {"hot": {"capacity": 0}, "warm": {"capacity": "50%"}},
                "run": {"lookahead": 0, "dtype": "bfloat16"},
            }
        )
    )
    args = [*TINY_ARGS, "--config", str(config), "--workdir", str(tmp_path), "--no-check"]
    settings = demo_settings(_parse(args))
    assert settings["engram"]["layer_ids"] == [0] and settings["run"]["batches"] == 4
    assert settings["engram"]["engram_vocab_size"] == [1000, 1000]  # --rows 4000 / (2 x 2)
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    assert "Engram at layers [0]" in out and "bfloat16" in out and "results checked" not in out


def test_example_config_is_the_builtin_default():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert data == DEMO_DEFAULTS
    ModelConfig.from_dict({k: data[k] for k in ("engram", "backbone", "transformer")})
    StoreConfig.from_dict(
        {"table": {"path": "t.npy"}, "tiers": data["tiers"], "prefetch": data["prefetch"]}
    )


def test_help_explains_the_demo():
    text = build_parser()._subparsers._group_actions[0].choices["demo"].format_help()
    for word in (
        "--config",
        "--corpus",
        "--batches",
        "--hot",
        "--warm",
        "--io",
        "memory",
        "tiered",
    ):
        assert word in text
    # it checked every 10th batch, where --help, the description and the README said every one
    flat = " ".join(text.split())
    assert "bit-identical to the in-memory ones (batch 0 and every 10th batch after it)" in flat
    assert "bit-identity check (of every 10th batch, from the first)" in flat


def test_help_says_which_files_of_a_corpus_folder_the_demo_reads(tmp_path):
    # --help said "directories (*.py below)", but the demo reads every text file of a folder
    (tmp_path / "notes.md").write_text("the hot rows repeat")
    assert [f.name for f in resolve_corpus([str(tmp_path)]).files] == ["notes.md"]
    text = " ".join(
        build_parser()._subparsers._group_actions[0].choices["demo"].format_help().split()
    )
    assert "*.py below" not in text and "directories (every text file below)" in text


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        ("tiers: {hot: {capacity: lots}}", [], "tiers.hot.capacity"),
        ("model: {}", [], "model: unknown section"),
        ("run: {speed: 3}", [], "run.speed: unknown key"),
        ("engram: {layer_ids: [9]}", [], "engram.layer_ids[0]: expected a layer id below"),
        (None, ["--batches", "0"], "run.batches: expected an integer >= 1"),
        (None, ["--batch-size", "100"], "run.batch_size: expected a multiple of run.seq_len="),
        ("run: {dtype: int8}", [], "run.dtype: expected float32, float16 or bfloat16"),
        ("run: {corpus: docs}", [], "run.corpus: expected a list of paths"),
        # a NUL (YAML's "\0") ended in pathlib's bare ValueError (embedded null byte)
        ('run: {corpus: ["a\\0b/*.py"]}', [], "; expected a path without a NUL character"),
        (None, ["--corpus", "/nonexistent/*.txt"], "the pattern matches no files"),
        (None, ["--hot", "200%"], "argument --hot: '200%' is more than 100% of the table"),
        (None, ["--device", "gpu"], "argument --device: got 'gpu'; expected 'cpu', 'cuda' or"),
        (None, ["--warm", "1GiB"], "tiers.warm.capacity: '1GiB' is"),
        (None, ["--device", "cuda:99"], "--device: 'cuda:99' but "),  # no such GPU, or no CUDA
    ],
)
def test_bad_demo_input_gives_a_clear_error(tmp_path, capsys, content, argv, message):
    extra = []
    if content is not None:
        (tmp_path / "bad.yaml").write_text(content)
        extra = ["--config", str(tmp_path / "bad.yaml")]
    try:  # a check of the demo's, or argparse's (which exits): both 2
        code = main(["demo", *TINY_ARGS, *extra, *argv, "--workdir", str(tmp_path)])
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    out, err = capsys.readouterr()
    assert message in err
    assert "profiling" not in out  # refused before the warm-start profile and the conversion


@pytest.mark.parametrize(
    ("argv", "setting", "part"),
    [
        (["--rows", "100000000000"], "--rows 100000000000", "Engram tables 23.3 TiB"),
        (["--hidden-size", "1000000000"], "--hidden-size 1000000000", "dense weights"),
        (
            ["--config", "huge.yaml"],
            "engram.engram_vocab_size [10000000000, 1000]",
            "Engram tables",
        ),
    ],
)
def test_a_model_too_large_for_the_memory_is_named_by_its_setting(
    tmp_path, monkeypatch, capsys, argv, setting, part
):
    """It was the allocator's traceback (DefaultCPUAllocator: can't allocate memory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "huge.yaml").write_text("engram: {engram_vocab_size: [10000000000, 1000]}\n")
    args = [a for a in TINY_ARGS if a not in ("--rows", "4000", "--hidden-size", "32")]
    assert main(["demo", *args, *argv, "--workdir", str(tmp_path / "work")]) == 2
    out, err = capsys.readouterr()
    assert f"demo: error: {setting}: the model needs " in err and part in err
    assert "of host RAM" in err and "is available; expected a smaller model" in err
    assert "building" not in out and not (tmp_path / "work").exists()  # refused before any work


def test_a_workdir_that_cannot_be_made_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "sub"  # under a file: it was a FileNotFoundError traceback
    with pytest.raises(SystemExit) as exited:  # argparse's, with the usage
        main(["demo", *TINY_ARGS, "--workdir", str(workdir)])
    assert exited.value.code == 2
    expected = (
        f"argument --workdir: '{workdir}': '{tmp_path / 'file'}' is a file; expected a folder"
    )
    assert expected in capsys.readouterr().err


def test_a_workdir_in_a_missing_folder_is_refused_and_a_new_one_said(tmp_path, capsys):
    """--workdir made every missing folder on its way without a word (a typo's whole chain, as
    far up as /) and left them there; a new folder is made only in one that is there, and said."""
    workdir = tmp_path / "typo" / "work"
    with pytest.raises(SystemExit) as exited:
        main(["demo", *TINY_ARGS, "--workdir", str(workdir)])
    assert exited.value.code == 2
    assert (
        f"argument --workdir: '{workdir}': '{tmp_path / 'typo'}' does not exist; expected an "
        in (capsys.readouterr().err)
    )
    assert list(tmp_path.iterdir()) == []
    assert main(["demo", *TINY_ARGS, "--workdir", str(tmp_path / "work")]) == 0
    assert f"--workdir: created '{tmp_path / 'work'}'" in capsys.readouterr().err
    assert list((tmp_path / "work").iterdir()) == []  # its temporary folder removed


def test_a_workdir_of_a_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """``--workdir '~'`` (quoted, or from a variable: the shell left it) made a folder named ``~``
    in the current one, which the stores' configs then read as the home folder: 'cannot read
    /HOME/tiered-store-demo-.../engram_layer1.hot_rows.npy'. It is the home folder, as there."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TIERED_STORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(cwd)
    assert main(["demo", *TINY_ARGS, "--workdir", "~"]) == 0, capsys.readouterr().err
    assert f"converting the checkpoint into {home}/tiered-store-demo-" in capsys.readouterr().out
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []


def test_a_corpus_too_small_for_one_batch_is_named_with_its_own_token_count(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("the hot rows repeat; the cold tier holds the tail. " * 10)
    argv = [*TINY_ARGS, "--corpus", str(tmp_path / "small.txt"), "--workdir", str(tmp_path)]
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    count = int(err.split("corpus: ")[1].split(" tokens")[0].replace(",", ""))
    assert count > 0 and "do not fill one batch of 2 x 64" in err  # it said 0 tokens


def test_a_section_left_empty_in_the_config_file_takes_the_defaults(tmp_path):
    """``prefetch:`` with its keys commented out was "expected a mapping, got NoneType"."""
    config = tmp_path / "demo.yaml"
    config.write_text("prefetch:\n  # depth: 4\nrun:\n  batches: 3\n")
    settings = demo_settings(_parse(["--config", str(config)]))
    assert settings["prefetch"] == DEMO_DEFAULTS["prefetch"] and settings["run"]["batches"] == 3


def test_a_tier_left_empty_in_the_config_file_takes_the_demo_defaults(tmp_path):
    """``tiers.hot:`` with its keys commented out replaced the demo's hot tier with null: the
    demo ran with no hot tier (the store's default capacity, 0), and --hot was a TypeError."""
    config = tmp_path / "demo.yaml"
    config.write_text("tiers:\n  hot:\n    # capacity: 5%\n  warm: {capacity: 10%}\n")
    settings = demo_settings(_parse(["--config", str(config)]))
    assert settings["tiers"]["hot"] == DEMO_DEFAULTS["tiers"]["hot"]
    assert DemoConfig.from_dict(settings).tiers.warm.capacity == "10%"
    settings = demo_settings(_parse(["--config", str(config), "--hot", "1%"]))
    assert settings["tiers"]["hot"] == {**DEMO_DEFAULTS["tiers"]["hot"], "capacity": "1%"}


def test_paths_in_the_config_file_are_relative_to_it(tmp_path, capsys, monkeypatch):
    """run.corpus in --config was read against the working directory, while every other config
    file's paths are relative to the file: the corpus beside the YAML was not found."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "small.txt").write_text("the hot rows repeat; the cold tier holds. " * 10)
    config = tmp_path / "conf" / "demo.yaml"
    config.write_text("run: {corpus: [small.txt]}\ntiers: {hot: {preload_rows: hot.npy}}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    args = [a for a in TINY_ARGS if "json" not in a and a != "--corpus"]
    settings = demo_settings(_parse([*args, "--config", str(config)]))
    assert settings["tiers"]["hot"]["preload_rows"] == str(tmp_path / "conf" / "hot.npy")
    assert main(["demo", *args, "--config", str(config), "--workdir", str(tmp_path)]) == 2
    assert "do not fill one batch of 2 x 64" in capsys.readouterr().err  # it was read


def test_a_config_path_in_a_folder_named_tilde_beside_it_is_not_the_home_folder(
    tmp_path, monkeypatch
):
    """A --config in the working directory whose run.corpus or row list is './~/x' (a folder
    named ``~`` beside the YAML) was joined as Path('.') / './~/x', the text '~/x', which the
    corpus reader and the store config read in the home folder; it is the folder beside it."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (cwd / "~").mkdir(parents=True)
    home.mkdir()
    (cwd / "~" / "small.txt").write_text("the hot rows repeat. " * 10)
    (cwd / "demo.yaml").write_text(
        "run: {corpus: [./~/small.txt]}\ntiers: {hot: {preload_rows: ./~/hot.npy}}\n"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    args = [a for a in TINY_ARGS if "json" not in a and a != "--corpus"]
    settings = demo_settings(_parse([*args, "--config", "demo.yaml"]))
    files = resolve_corpus(settings["run"]["corpus"]).files
    assert [f.resolve() for f in files] == [cwd / "~" / "small.txt"]
    config = StoreConfig.from_dict(
        {"table": {"path": "t.npy"}, "tiers": settings["tiers"]}, base_dir=cwd
    )
    assert config.tiers.hot.preload_rows == str(cwd / "~" / "hot.npy")


def test_files_the_demo_cannot_read_as_text_are_named(tmp_path, capsys):
    # a binary and a latin-1 file in --corpus were dropped without a word
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "small.txt").write_text("the hot rows repeat; the cold tier holds the tail. " * 10)
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (corpus / "latin.txt").write_bytes("café crème".encode("latin-1"))
    argv = [*TINY_ARGS, "--corpus", str(corpus), "--workdir", str(tmp_path)]
    assert main(["demo", *argv]) == 2  # too small for a batch: the warning comes first
    err = capsys.readouterr().err
    assert "tiered-store demo: warning: skipped 2 files (1 binary, 1 not UTF-8): " in err
    assert f"{corpus / 'blob.bin'} (binary), {corpus / 'latin.txt'} (not UTF-8)" in err


def test_a_tilde_in_the_config_file_with_home_empty_names_the_file_and_key(tmp_path, monkeypatch):
    """With HOME set but empty, a '~/...' path in demo.yaml was refused naming only the path:
    not the file nor which of its keys (run.corpus, a tier's row list or profile) gave it."""
    from tiered_store.errors import ConfigError

    config = tmp_path / "demo.yaml"
    monkeypatch.setenv("HOME", "")
    args = [a for a in TINY_ARGS if "json" not in a and a != "--corpus"]
    for text, key in (
        (
            "run: {corpus: [~/small.txt]}\n",
            "run.corpus",
        ),
        ("tiers: {hot: {preload_rows: ~/hot.npy}}\n", "tiers.hot.preload_rows"),
    ):
        config.write_text(text)
        with pytest.raises(ConfigError) as err:
            demo_settings(_parse([*args, "--config", str(config)]))
        assert str(err.value).startswith(f"{config}: {key}: '~/"), str(err.value)
        assert "HOME is set but empty" in str(err.value)


def test_a_config_from_a_pipe_is_read_and_its_relative_paths_refused_by_key(tmp_path):
    """demo --config <(gen-config): a pipe is read as any file; its relative paths, which would
    be under /dev/fd, are refused naming the file and the key, its absolute ones kept."""
    import os

    from tiered_store.errors import ConfigError

    args = [a for a in TINY_ARGS if "json" not in a and a != "--corpus"]
    for text, wrong in (
        (f"run: {{corpus: [{tmp_path / 'a.txt'}]}}\n", None),
        ("tiers: {hot: {preload_rows: hot.npy}}\n", "tiers.hot.preload_rows: 'hot.npy' is a"),
    ):
        read, write = os.pipe()
        os.write(write, text.encode())
        os.close(write)
        try:
            parsed = _parse([*args, "--config", f"/dev/fd/{read}"])
            if wrong is None:
                assert demo_settings(parsed)["run"]["corpus"] == [str(tmp_path / "a.txt")]
                continue
            with pytest.raises(ConfigError) as err:
                demo_settings(parsed)
            assert f"/dev/fd/{read}: {wrong} relative path in a config read from a pipe" in str(
                err.value
            )
        finally:
            os.close(read)
