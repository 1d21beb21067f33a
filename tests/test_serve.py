"""``tiered-store serve``: config, answers (against the same model in memory), endpoints, faults,
load, trace replay, scrubbing, and the SIGTERM drain."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.serve_support import CONFIG, TABLES, break_lookups, make_checkpoint, write_config
from tiered_store import IgnoredSettingWarning
from tiered_store.engram.checkpoint import load_table_in_memory
from tiered_store.errors import ConfigError, TierIOError
from tiered_store.serve import (
    GuardedTable,
    InferenceServer,
    ServeConfig,
    ServedModel,
    build_app,
    parse_request,
)
from tiered_store.serve.client import (
    ServeProcess,
    get_json,
    post_json,
    raw_exchange,
    run_load,
    zipf_requests,
)
from tiered_store.trace import TraceReader
from zipf_analysis.replay import replay

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve.yaml"


def start_server(path, *, metrics: bool = False, **kwargs) -> InferenceServer:
    """An in-process server on free loopback ports."""
    config = ServeConfig.from_yaml(path).with_overrides(
        address="127.0.0.1:0", metrics_address="127.0.0.1:0" if metrics else ""
    )
    server = InferenceServer(config, **kwargs)
    server.start()
    return server


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(config_path):
    srv = start_server(config_path)
    yield srv
    srv.stop()


def _fds_open_on(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (resolved)."""
    return sum(1 for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(path))


def _commit_a_new_version(table: str | Path) -> None:
    """A writer's commit to ``table``: row 1 zeroed, a new version of its file."""
    from tiered_store import TieredStore

    with TieredStore.open({"table": {"path": str(table)}}) as writer:
        writer.write([1], torch.zeros(1, writer.dim))
        writer.commit()


def _answered_during_a_reload(
    served: ServedModel, held: threading.Event, go_on: threading.Event
) -> tuple[list[list[int]], list[list[str]]]:
    """The shapes of the answers to a request asked once ``held`` is set by a reload run in a
    thread (held up until ``go_on``, set then), and what that reload reloaded."""
    reloaded: list[list[str]] = []
    reloader = threading.Thread(
        target=lambda: reloaded.append(served.reload_if_stale(force_check=True))
    )
    reloader.start()
    request = parse_request(b'{"input_ids": [[1, 2, 3]]}', served.config.server, served)
    answers: list[list[int]] = []
    asker = threading.Thread(target=lambda: answers.append(served.answer(request)["shape"]))
    during: list[list[int]] = []
    try:
        assert held.wait(30)
        asker.start()
        asker.join(30)
        during = list(answers)
    finally:
        go_on.set()
        reloader.join(60)
        if asker.is_alive():
            asker.join(60)
    return during, reloaded


# -- config -----------------------------------------------------------------------------------------


def test_example_config_is_valid():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the example sets nothing it ignores
        cfg = ServeConfig.from_yaml(EXAMPLE)
    assert cfg.model is not None and cfg.model.engram.layer_ids == (1, 3)
    assert cfg.metrics_address == "127.0.0.1:9400" and cfg.server.address == "127.0.0.1:8080"
    assert cfg.store_config(3).table.path == str(
        EXAMPLE.parent / "checkpoint" / "engram_layer3.npy"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": {}}, "bogus: unknown key"),
        ({"tables": {"path": "t.npy"}}, "tables: unknown key"),
        ({"server": {"max_batch": 0}}, "server.max_batch"),
        ({"server": {"address": "localhost"}}, "config: server.address: got 'localhost'; expected 'host:port'"),
        # a port of digits that are not ASCII ("²" passes str.isdigit, then int() raised)
        ({"server": {"address": "127.0.0.1:\u00b2"}}, "config: server.address: got '127.0.0.1:\u00b2'; expected 'host:port'"),
        # refused by the store section's own check, as replay and a store refuse it
        ({"store": {"metrics": {"address": "h:\u00b9"}}}, "config (store section): invalid configuration\n  metrics.address: got 'h:\u00b9'; expected 'host:port'"),
        # a store section that is not a mapping, not taken for an empty one
        ({"store": []}, "config: store: got list; expected a mapping"),
        ({"store": False}, "config: store: got bool; expected a mapping"),
        ({"store": 0}, "config: store: got int; expected a mapping"),
        ({"server": {"address": "127.0.0.1:99999"}}, "server.address: port 99999 in '127.0.0.1:99999'; expected a port in 0..65535"),
        ({"store": {"table": {"path": "x.npy"}}}, "store.table"),
        ({"store": {"tiers": {"hot": {"capacity": "lots"}}}}, "tiers.hot.capacity"),
        # no table has more than 100%: refused when read, not after --create-tables built one
        ({"store": {"tiers": {"warm": {"capacity": "200%"}}}}, "config (store section): invalid configuration\n  tiers.warm.capacity: '200%' is more than 100% of the table"),
        ({"store": {"metrics": {"address": "9400"}}}, "metrics.address: got '9400'"),
        # not "(store section, layer 0)": the model's Engram layers are 1 and 3
        ({"store": {"prefetch": {"depht": 2}}}, "config (store section): invalid configuration\n  prefetch.depht: unknown key; expected one of depth, lookahead"),
        ({"store": {"tiers": {"hot": {"policy": "lur"}}}}, "config: store.tiers.hot.policy: unknown policy 'lur' in 'lur'; did you mean 'lru'?"),
        ({"model": {"engram": {"layer_ids": [1, 1]}}}, "layer_ids"),
        ({"model": [1]}, "model: got list"),
        ({"checkpoint": {"dtype": "int8"}}, "checkpoint.dtype"),
        ({"server": {"request_timeout_s": True}}, "server.request_timeout_s: expected a number, got True"),
        # values a thread's wait, torch's thread pool or its seed cannot take: they failed later
        ({"checkpoint": {"scrub_interval_s": float("inf")}}, "checkpoint.scrub_interval_s: expected a finite number, got inf"),
        # not "less than or equal to 9223372036 (got nan)", which did not say NaN was the fault
        ({"server": {"request_timeout_s": float("nan")}}, "server.request_timeout_s: expected a finite number, got nan"),
        ({"server": {"request_timeout_s": "1e999"}}, "server.request_timeout_s: expected a finite number, got inf"),  # quoted in the YAML
        ({"server": {"keep_alive_s": 1e300}}, "server.keep_alive_s: Input should be less than or equal to"),
        ({"server": {"torch_threads": 2**31}}, "server.torch_threads: Input should be less than or equal to 4096"),
        # past a C int: serve's listen raised socket's bare OverflowError once the tables were open
        ({"server": {"backlog": 2**31}}, "server.backlog: Input should be less than or equal to 2147483647 (got 2147483648)"),
        ({"server": {"max_announced": 0}}, "server.max_announced: Input should be greater than or equal to 1 (got 0)"),
        ({"server": {"max_announced": True}}, "server.max_announced: Input should be a valid integer (got True)"),
        ({"server": {"record_flush_s": -1}}, "server.record_flush_s: Input should be greater than or equal to 0"),
        ({"server": {"record_flush_s": True}}, "server.record_flush_s: expected a number, got True"),
        ({"checkpoint": {"seed": 2**70}}, "checkpoint.seed: Input should be less than or equal to 18446744073709551615"),
        ({"store": {"cost_model": {"compute_seconds_per_batch": True}}}, "cost_model.compute_seconds_per_batch: expected a number, got True"),
        # a key that is not a string (YAML's no: or 1:) raised pydantic's bare TypeError
        ({"server": {1: 2}}, "config: invalid configuration\n  server: key 1: expected a string key"),
        ({"store": {"tiers": {"hot": {False: 1}}}}, "tiers.hot: key False: expected a string key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(change, message):
    data = {k: dict(v) for k, v in CONFIG.items()}
    data.update(change)
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_dict(data)
    assert message in str(info.value)


def test_metrics_address_overrides_a_metrics_section_left_empty():
    """``store: {metrics:}`` (its keys commented out) takes the defaults; ``--metrics-address``
    over it raised a bare TypeError (``'NoneType' object is not a mapping``)."""
    data = {**CONFIG, "store": {**CONFIG.get("store", {}), "metrics": None}}
    config = ServeConfig.from_dict(data)
    assert config.metrics_address == "127.0.0.1:9400"
    assert config.with_overrides(metrics_address="127.0.0.1:0").metrics_address == "127.0.0.1:0"
    assert config.with_overrides(metrics_address="").metrics_address == ""


def test_the_scrubbers_byte_rate_takes_a_size_or_0_for_no_limit():
    """``checkpoint.scrub_bytes_per_s`` paces the background checksum pass (verify_table's
    ``bytes_per_s``): a byte size with a unit, a number of bytes, or 0 for no limit."""
    rates = {"256MiB": 256 << 20, 4096: 4096, "1.5KiB": 1536, 0: None}
    for value, rate in rates.items():
        data = {**CONFIG, "checkpoint": {"scrub_interval_s": 60, "scrub_bytes_per_s": value}}
        assert ServeConfig.from_dict(data).checkpoint.scrub_rate == rate
    for value, message in (
        (-1, "greater than or equal to 0"),
        ("fast", "got 'fast'; expected bytes a second"),
        (2.5, "got 2.5; expected bytes a second"),
    ):
        data = {**CONFIG, "checkpoint": {"scrub_bytes_per_s": value}}
        with pytest.raises(ConfigError, match=rf"checkpoint.scrub_bytes_per_s.*{message}"):
            ServeConfig.from_dict(data)


def test_a_scrub_rate_without_scrub_passes_warns_that_nothing_reads_it(recwarn):
    """``checkpoint.scrub_bytes_per_s`` paces only the passes of ``scrub_interval_s``; set with
    no interval (0, the default) it was silently ignored, the user believing the scrub paced
    when none runs. It warns naming the file, both keys and that ``verify_on_start`` is not
    paced; with an interval, or left unset, nothing is said."""
    data = {**CONFIG, "checkpoint": {"scrub_bytes_per_s": "64MiB"}}
    with pytest.warns(IgnoredSettingWarning) as caught:
        ServeConfig.from_dict(data, source="serve.yaml")
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "serve.yaml: checkpoint.scrub_bytes_per_s: ignored; checkpoint.scrub_interval_s is 0, "
        "so no checksum pass runs while serving (verify_on_start reads unpaced); give "
        "scrub_interval_s or remove it"
    )
    recwarn.clear()
    ServeConfig.from_dict(
        {**CONFIG, "checkpoint": {"scrub_interval_s": 60, "scrub_bytes_per_s": 0}}
    )
    ServeConfig.from_dict(CONFIG)
    assert [w for w in recwarn if issubclass(w.category, IgnoredSettingWarning)] == []


def test_a_scrub_rate_written_otherwise_is_refused_saying_how_to_write_it():
    """A rate written '256MB/s', 1e9 (which YAML reads unquoted as text) or 1.0e+9 (a float)
    was refused 'expected a number and a unit' or 'Input should be a valid integer', neither
    saying that a plain number of bytes, a size or 0 is what the key takes."""
    expected = "expected bytes a second: an integer, or a size like '256MiB' (no '/s'), 0: no limit"
    for text in ("256MB/s", "1e9", "1.0e+9", "true", "fast"):
        value = yaml.safe_load(text)
        data = {**CONFIG, "checkpoint": {"scrub_bytes_per_s": value}}
        with pytest.raises(ConfigError) as info:
            ServeConfig.from_dict(data)
        assert f"checkpoint.scrub_bytes_per_s: got {value!r}; {expected}" in str(info.value)


def test_a_scrub_rate_past_a_floats_range_is_no_limit_not_an_overflow(tmp_path):
    """``checkpoint.scrub_bytes_per_s`` takes any integer, one of 401 digits too; every
    checksum pass over it raised OverflowError while its reads were sized by a float division
    (logged as a failed pass, tried again and given up, the tables never checked). Such a rate
    reads as fast as the disk goes."""
    rate = 10**400
    path = make_checkpoint(
        tmp_path,
        checkpoint={"path": "checkpoint", "scrub_interval_s": 3600, "scrub_bytes_per_s": rate},
    )
    config = ServeConfig.from_yaml(path)
    served = ServedModel(config)
    try:
        assert served.verify_tables(bytes_per_s=config.checkpoint.scrub_rate) == []
        assert [h.verifications for h in served.health.values()] == [1, 1]
    finally:
        served.close()


def test_a_missing_checkpoint_is_an_error_without_create(tmp_path):
    config = ServeConfig.from_yaml(write_config(tmp_path))
    with pytest.raises(ConfigError, match="'checkpoint' does not exist .*--create-tables"):
        ServedModel(config)
    config.checkpoint_dir.mkdir()  # a folder without the dense weights
    with pytest.raises(ConfigError, match="has no dense.safetensors.*--create-tables"):
        ServedModel(config)


def test_a_home_folder_in_paths_is_expanded(tmp_path, monkeypatch):
    """``checkpoint.path: ~/ckpt`` and a tier's ``static_rows: ~/rows.npy`` were taken as a
    folder named ``~`` beside serve.yaml."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = {
        **CONFIG,
        "checkpoint": {"path": "~/ckpt"},
        "store": {"tiers": {"hot": {"policy": "static+lru", "static_rows": "~/rows.npy"}}},
    }
    config = ServeConfig.from_dict(data, base_dir=tmp_path / "conf")
    assert config.checkpoint_dir == (tmp_path / "home" / "ckpt").resolve()
    rows = config.store_spec(1)["tiers"]["hot"]["static_rows"]
    assert rows == str((tmp_path / "home" / "rows.npy").resolve())


def test_a_config_named_from_the_home_folder_has_its_paths_under_it(tmp_path, monkeypatch):
    """``ServeConfig.from_yaml("~/serve.yaml")`` read the file in the home folder but took its
    folder as ``~`` (not read): its relative paths were under a folder named ``~`` here."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    write_config(home)
    config = ServeConfig.from_yaml("~/serve.yaml")
    assert config.base_dir == home
    assert config.checkpoint_dir == (home / "checkpoint").resolve()


def test_store_section_errors_and_warnings_at_open_name_the_file_and_layer(tmp_path):
    """A store section that validates but not against a layer's table (a capacity past it), or
    a setting its policy ignores: the error or warning named the key alone, neither serve.yaml
    nor the layer (whose table's rows differ)."""
    import warnings

    from tiered_store import IgnoredSettingWarning

    path = make_checkpoint(tmp_path)
    write_config(tmp_path, store={"tiers": {"warm": {"capacity": 10**8}}})
    with pytest.raises(
        ConfigError, match=rf"^{path}: store \(layer 1\): tiers.warm.capacity: 100000000 is"
    ):
        ServedModel(ServeConfig.from_yaml(path))
    write_config(tmp_path, store={"tiers": {"hot": {"capacity": 10, "profile": "p.npz"}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ServedModel(ServeConfig.from_yaml(path)).close()
    assert [str(w.message) for w in caught if w.category is IgnoredSettingWarning] == [
        f"{path}: store (layer {layer}): tiers.hot.profile: policy 'lru' ignores it; only "
        "zipf-tuned uses it"
        for layer in (1, 3)
    ]


# -- answers ----------------------------------------------------------------------------------------


def test_tiered_answers_equal_the_same_model_with_tables_in_memory(server):
    """The served answer, then the same ServedModel code with each table read whole into RAM."""
    ids = [[5, 17, 900, 17, 5, 12], [1, 2, 3, 4, 5, 6]]
    status, answer = post_json(server.url + "/v1/engram", {"input_ids": ids, "top_k": 3})
    assert status == 200, answer
    assert answer["shape"] == [2, 6] and answer["layers"] == [1, 3]
    assert answer["rows_looked_up"] == {"engram_layer1": 2 * 6 * 4, "engram_layer3": 2 * 6 * 4}
    assert len(answer["next_token_ids"][0]) == 3 and answer["lengths"] == [6, 6]
    logprobs = np.asarray(answer["next_token_logprobs"])
    assert (np.diff(logprobs, axis=1) <= 0).all() and (logprobs < 0).all()

    config = server.config
    memory = ServedModel(config)
    try:
        in_ram = {}
        for layer in memory.layer_ids:
            name = config.table_name(layer)
            in_ram[layer] = GuardedTable(
                load_table_in_memory(config.table_path(layer)), name, memory.health[name]
            )
        memory.model.set_tables(in_ram)
        request = parse_request(
            json.dumps({"input_ids": ids, "top_k": 3}).encode(), config.server, memory
        )
        expected = memory.answer(request)
        # the EngramLM's own forward, for the next-token ids
        with torch.no_grad():
            last = memory.model(torch.tensor(ids), logits="last")
    finally:
        memory.close()
    for key in ("next_token_ids", "logits", "hidden_checksum", "layer_checksums"):
        assert answer[key] == expected[key], key
    assert [row[0] for row in answer["next_token_ids"]] == last.argmax(-1).tolist()

    _, again = post_json(server.url + "/v1/engram", {"input_ids": ids, "top_k": 3})
    assert again["hidden_checksum"] == answer["hidden_checksum"]  # now partly from the caches
    assert again["layer_checksums"] == answer["layer_checksums"]


def test_text_is_tokenised_and_padded_and_each_sequence_reads_its_last_token(server):
    status, answer = post_json(server.url + "/v1/engram", {"text": ["Hello, Engram!", "Hi"]})
    assert status == 200, answer
    tokenizer = server.model.tokenizer
    first, second = tokenizer.encode("Hello, Engram!").tolist(), tokenizer.encode("Hi").tolist()
    assert answer["lengths"] == [len(first), len(second)]
    pad = server.model.pad_id
    assert answer["input_ids"] == [first, second + [pad] * (len(first) - len(second))]
    _, alone = post_json(server.url + "/v1/engram", {"input_ids": [second]})
    assert alone["next_token_ids"][0] == answer["next_token_ids"][1]  # causal: padding is invisible


def test_get_endpoints(server):
    client = TestClient(build_app(server))
    assert (client.get("/healthz").status_code, client.get("/healthz").json()) == (
        200,
        {"status": "ok"},
    )
    index = client.get("/").json()
    assert "POST /v1/engram" in index["endpoints"] and index["tables"] == TABLES
    stats = client.get("/stats").json()
    assert set(stats["tables"]) == set(TABLES)
    assert set(stats["tables"]["engram_layer1"]) >= {"hot", "warm", "cold", "prefetch", "lookup"}
    assert stats["geometry"]["engram_layer1"]["file"] == "engram_layer1.npy"
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {
        "tiered_store_lookups",
        "tiered_store_lookup_failures",
        "tiered_store_http_requests",
        "process_resident_memory_bytes",
    } <= names
    head = client.head("/healthz")
    assert head.status_code == 200 and head.content == b""


# -- server faults ----------------------------------------------------------------------------------


def test_a_failing_table_gives_503_without_paths_counts_and_turns_healthz(config_path):
    server = start_server(config_path)
    try:
        store = server.model.stores["engram_layer3"]
        secret = str(store.cold.path)
        break_lookups(store, f"table {secret}")
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})
        assert status == 503, answer
        assert answer == {
            "error": "table data unavailable (table engram_layer3: cold tier read failed)"
        }
        status, health = get_json(server.url + "/healthz")
        assert status == 503 and len(health["problems"]) == 1
        assert health["problems"][0].startswith("table engram_layer3: lookups failing (1 so far")
        assert "engram_layer3.npy" in health["problems"][0] and "/" not in health["problems"][0]
        text, _ = server.metrics_text()
        failures = {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
            if s.name == "tiered_store_lookup_failures_total"
        }
        assert failures == {"engram_layer1": 0, "engram_layer3": 1}

        def boom(body):
            raise RuntimeError(f"secret internal detail {secret}")

        server.infer = boom
        status, answer = post_json(server.url + "/v1/engram", {"input_ids": [[1]]})
        assert (status, answer) == (
            500,
            {"error": "internal server error (details are in the server log)"},
        )
        stats = get_json(server.url + "/stats")[1]
        assert stats["server"]["requests"]["/v1/engram"] == {"500": 1, "503": 1}
    finally:
        server.stop()


def test_healthz_recovers_after_the_hold(tmp_path, config_path):
    path = write_config(
        tmp_path,
        checkpoint={"path": str(config_path.parent / "checkpoint")},
        server={"health_hold_s": 0.3},
    )
    server = start_server(path)
    try:
        guarded = server.model.model.tables[1]
        guarded.failed("read", "injected")  # what a failed lookup records
        assert get_json(server.url + "/healthz")[0] == 503
        time.sleep(0.4)
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
    finally:
        server.stop()


def test_the_lookup_failure_hold_ends_once_the_table_is_reopened_on_another_file(tmp_path):
    """A lookup that failed kept /healthz at 503 for the whole server.health_hold_s (600 s here)
    after the table was made anew (repaired) and reopened on it: a verdict on a file no longer
    served, as a failed checksum pass is. Reopened on another file, the hold ends; on the same
    file (a writer's commit) it stays."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.table_format import create_table

    path = make_checkpoint(tmp_path, server={"health_hold_s": 600})
    server = start_server(path)
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        table = served.config.table_path(3)
        rows = load_table_in_memory(table).weight.numpy().copy()
        served.model.tables[3].failed("read", "injected")  # what a failed lookup records
        assert get_json(server.url + "/healthz")[0] == 503
        _commit_a_new_version(table)  # the same file
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        status, doc = get_json(server.url + "/healthz")
        assert status == 503 and "engram_layer3: lookups failing" in " ".join(doc["problems"])
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)  # repaired
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
        assert served.health["engram_layer3"].lookup_failures == 1  # still counted
    finally:
        server.stop()


def test_the_lookup_failure_hold_stays_when_the_store_swapped_in_reads_the_same_file(
    tmp_path, monkeypatch
):
    """A reload whose new store opened on the file served (a writer's commit) while the table
    was made anew over its path before the swap took its path naming another file for a store
    on another file: the lookup failure's hold ended, and a failed pass was queued again, while
    the store swapped in still read the file they were about. Files are told apart by identity."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.table_format import create_table

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"health_hold_s": 600}))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        table = config.table_path(3)
        rows = load_table_in_memory(table).weight.numpy().copy()
        health = served.health["engram_layer3"]
        served.model.tables[3].failed("read", "injected")  # what a failed lookup records
        _commit_a_new_version(table)  # the same file
        real = served._open_checked

        def open_then_remade(name, old):  # made anew after the open ahead, before the swap
            new = real(name, old)
            layout = table_metadata(served.model.hasher, 3)
            create_table(table, rows, progress=False, overwrite=True, metadata=layout)
            return new

        monkeypatch.setattr(served, "_open_checked", open_then_remade)
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        monkeypatch.setattr(served, "_open_checked", real)
        assert served.stores["engram_layer3"].cold.replaced()  # the old file, still
        assert health.last_lookup_failure_at is not None  # the hold stays
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert health.last_lookup_failure_at is None  # on the file made anew: it ends
        assert health.lookup_failures == 1
    finally:
        served.close()


def test_the_lookup_failure_hold_ends_when_a_closed_store_s_file_is_made_anew_on_its_inode(
    tmp_path,
):
    """A store closed (its map grown elsewhere, left closed by a refused reload) frees its file's
    inode once the file is removed: a table made anew there can get that inode, and told apart
    by (st_dev, st_ino) alone the store reopened on it counted as on the same file: the lookup
    failure's hold stayed. Once it closed, its mtime when opened joins its identity."""
    import os

    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.table_format import create_table

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"health_hold_s": 600}))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        table = config.table_path(3)
        rows = load_table_in_memory(table).weight.numpy().copy()
        health = served.health["engram_layer3"]
        served.model.tables[3].failed("read", "injected")  # what a failed lookup records
        old = served.stores["engram_layer3"]
        inode = os.stat(table).st_ino
        old.close()  # as a refused reload leaves it
        table.unlink()  # made anew: the old file removed first
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        if os.stat(table).st_ino != inode:
            pytest.skip("this file system gave the new file another inode")
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert health.last_lookup_failure_at is None  # on another file: the hold ends
    finally:
        served.close()


def test_the_lookup_failure_hold_of_a_closed_store_ends_once_it_is_reopened(tmp_path):
    """A table whose store a reload left closed answers 503 'closed' until a check reopens it,
    and /healthz held that failure for server.health_hold_s (600 s here) after it was reopened
    on the same file, serving again: a closed store says nothing about its file. The hold ends
    at the reopen; one of a failure about the file before it (a read) stays."""
    path = make_checkpoint(tmp_path, server={"health_hold_s": 600})
    server = start_server(path)
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        request = {"input_ids": [[1, 2, 3]]}
        served.stores["engram_layer3"].close()  # what a refused reload leaves
        assert post_json(server.url + "/v1/engram", request)[0] == 503
        assert get_json(server.url + "/healthz")[0] == 503
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]  # the same file
        assert post_json(server.url + "/v1/engram", request)[0] == 200
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
        served.model.tables[3].failed("read", "injected")  # a failure about the file
        served.stores["engram_layer3"].close()
        assert post_json(server.url + "/v1/engram", request)[0] == 503
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        status, doc = get_json(server.url + "/healthz")
        assert status == 503, doc
        assert "engram_layer3: lookups failing (3 so far" in " ".join(doc["problems"])
        assert "cold tier read failed: injected" in " ".join(doc["problems"])
    finally:
        server.stop()


def test_a_slow_stats_or_scrape_holds_no_other_request_back(server, monkeypatch):
    """GET /stats and /metrics read the stores on the event loop: while one took its time (a
    store's statistics, a scrape), every other connection waited, /healthz included. They are
    read in a thread now, as other blocking work is."""
    import threading

    for path, method in (("/stats", "stats"), ("/metrics", "metrics_text")):
        release, entered = threading.Event(), threading.Event()
        real = getattr(server, method)

        def slow(real=real, release=release, entered=entered):
            entered.set()
            release.wait(60)  # as a stats() waiting on a lock
            return real()

        monkeypatch.setattr(server, method, slow)
        answers: list[int] = []
        reader = threading.Thread(
            target=lambda url, out: out.append(urllib.request.urlopen(url).status),
            args=(server.url + path, answers),
        )
        reader.start()
        try:
            assert entered.wait(30)
            assert get_json(server.url + "/healthz", timeout=10)[0] == 200, path
        finally:
            release.set()
            reader.join(60)
        assert answers == [200], path


# -- load -------------------------------------------------------------------------------------------


def test_small_load_no_errors_no_lost_requests(server):
    # the module's server: earlier tests may have served requests (or none, run alone)
    served = get_json(server.url + "/stats")[1]["server"]["requests"]
    before = served.get("/v1/engram", {}).get("200", 0)
    bodies = zipf_requests(48, batch=2, tokens=32, seed=3)
    result = run_load(
        server.url + "/v1/engram", bodies, clients=4, check=lambda a: "hidden_checksum" in a
    )
    assert result.errors == {} and result.lost == 0 and result.answered == 48
    assert result.requests_per_second > 0 and result.percentile_ms(99) >= result.percentile_ms(50)
    deadline = time.monotonic() + 10  # a request is counted just after its answer is written
    while True:
        stats = get_json(server.url + "/stats")[1]["server"]
        if stats["requests"]["/v1/engram"]["200"] == before + 48 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert stats["requests"]["/v1/engram"]["200"] == before + 48
    assert stats["in_flight"] == 1  # this /stats request itself


# -- trace, scrubbing --------------------------------------------------------------------------------


def test_recorded_trace_replays_to_the_store_statistics(tmp_path, config_path, capsys):
    """Concurrent clients, then replay: the same cache code on the same batches, equal counters."""
    server = start_server(config_path, trace=tmp_path / "served.trace")
    bodies = zipf_requests(30, batch=2, tokens=24, seed=4)
    result = run_load(server.url + "/v1/engram", bodies, clients=3)
    assert result.answered == 30
    server.stop()
    stats = server.model.stats()
    reader = TraceReader(tmp_path / "served.trace")
    assert reader.tables == TABLES and reader.n_batches == 60
    for layer, name in zip(server.model.layer_ids, TABLES, strict=True):
        replayed = replay(server.config.store_config(layer), reader, table=name)
        for tier in ("hot", "warm"):
            for key in ("lookups", "hits", "admissions", "evictions"):
                assert replayed.tiers[tier][key] == stats[name][tier][key], (name, tier, key)

    # `tiered-store replay` reads it too, with the layer's store config the server wrote beside it
    from tiered_store.cli import main

    store_yaml = tmp_path / "served.trace.engram_layer1.store.yaml"
    assert yaml.safe_load(store_yaml.read_text())["table"]["path"] == str(
        server.config.table_path(1)
    )
    out = tmp_path / "replay-out"
    args = ["replay", str(store_yaml), str(tmp_path / "served.trace"), "--table", "engram_layer1"]
    assert main([*args, "--no-bounds", "--sweep", "", "--out", str(out)]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["results"][0]["tiers"]["hot"]["hits"] == stats["engram_layer1"]["hot"]["hits"]
    capsys.readouterr()


def test_a_recorded_trace_is_not_replayed_with_another_row_width(tmp_path, config_path):
    """A served trace gave its tables' rows but not their row width: replayed without the table
    file, a config's table.dim of another width was taken without a word (bytes moved, stall)."""
    from tiered_store.config import StoreConfig
    from tiered_store.table_format import read_manifest

    trace = tmp_path / "served.trace"
    server = start_server(config_path, trace=trace)
    bodies = zipf_requests(2, batch=1, tokens=8, seed=2)
    assert run_load(server.url + "/v1/engram", bodies, clients=1).answered == 2
    dim = read_manifest(server.config.table_path(1)).values_per_row
    server.stop()
    store = {"table": {"path": str(tmp_path / "none.npy"), "dim": 2 * dim}}
    with pytest.raises(ConfigError, match=f"table.dim: got {2 * dim} but trace table"):
        replay(StoreConfig.from_dict(store), trace, table="engram_layer1")
    store["table"]["dim"] = dim
    assert replay(StoreConfig.from_dict(store), trace, table="engram_layer1").lookups > 0


def test_closing_under_a_recording_worker_the_drain_gave_up_on(tmp_path):
    """close() took the trace away without the lock its writers hold, while a worker the drain
    gave up on (its prefetch outlasting server.request_timeout_s) still ran: its next write met
    None and failed with a bare AttributeError. Its batch is now left out of the closed trace,
    which holds whole batches, and the worker fails as any lookup on a closed table does."""
    import threading

    from tiered_store.serve.guarded_table import TableUnavailableError

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    trace = tmp_path / "served.trace"
    served = ServedModel(config, trace=trace)
    body = json.dumps({"input_ids": [[7, 8, 9]]}).encode()
    served.answer(parse_request(body, config.server, served))
    prefetch, prefetched = served.model.prefetch, threading.Event()

    def slow_prefetch(*args, **kwargs):  # a wait only: done after the close stopped waiting
        out = prefetch(*args, **kwargs)
        prefetched.set()
        time.sleep(1.5)
        return out

    served.model.prefetch = slow_prefetch
    errors = []

    def worker():
        try:
            served.answer(parse_request(body, config.server, served))
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert prefetched.wait(30)
    served.close()
    thread.join(30)
    assert [type(e) for e in errors] == [TableUnavailableError], errors
    with TraceReader(trace) as reader:
        reader.verify()
        assert reader.n_batches == 2 and [b.table for b in reader.batches()] == TABLES


def test_replay_refuses_a_profile_hashed_otherwise_than_a_recorded_trace(tmp_path, config_path):
    """A served trace records its Engram config as {"engram": ..., "source": ...}: replay took a
    profile of another hash seed over it (or one made from it over a table of another seed)."""
    from dataclasses import replace as replace_fields

    from tiered_store import TieredStore
    from tiered_store.config import StoreConfig
    from tiered_store.table_format import read_manifest
    from zipf_analysis.profile import profile_trace

    trace = tmp_path / "served.trace"
    server = start_server(config_path, trace=trace)
    bodies = zipf_requests(8, batch=2, tokens=24, seed=2)
    assert run_load(server.url + "/v1/engram", bodies, clients=1).answered == 8
    table = server.config.table_path(1)
    server.stop()
    with TraceReader(trace) as reader:
        own = profile_trace(reader, "engram_layer1")
    config = own.metadata["config"]
    seed = config["engram"]["seed"]
    other = replace_fields(
        own,
        metadata={
            **own.metadata,
            "config": {**config, "engram": {**config["engram"], "seed": seed + 1}},
        },
    )
    own.save(tmp_path / "own.npz")
    other.save(tmp_path / "other.npz")
    tiers = {
        "warm": {"capacity": 64, "policy": "zipf-tuned", "profile": str(tmp_path / "other.npz")}
    }
    dim = read_manifest(table).values_per_row
    store = {"table": {"path": str(tmp_path / "none.npy"), "dim": dim}, "tiers": tiers}
    with pytest.raises(
        ConfigError, match=f"other.npz was made with seed={seed + 1} but trace {trace}"
    ):
        replay(StoreConfig.from_dict(store), trace, table="engram_layer1")
    with pytest.raises(ConfigError, match=f"other.npz was made with seed={seed + 1} but the table"):
        TieredStore.open({**store, "table": {"path": str(table)}}).close()
    tiers["warm"]["profile"] = str(tmp_path / "own.npz")
    replayed = replay(StoreConfig.from_dict(store), trace, table="engram_layer1")
    assert replayed.tiers["warm"]["lookups"] > 0
    TieredStore.open({**store, "table": {"path": str(table)}}).close()


@pytest.mark.parametrize("folder", ["ckpt", "my models"])  # a space: no path left either
def test_background_scrub_finds_a_corrupt_table(tmp_path, folder):
    config = make_checkpoint(tmp_path / folder, checkpoint={"scrub_interval_s": 0.2})
    server = start_server(config, metrics=True)
    try:
        path = server.config.table_path(3)
        with open(path, "r+b") as f:  # flip one byte of layer 3's data
            f.seek(4096 + 1000)
            byte = f.read(1)
            f.seek(4096 + 1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, health = get_json(server.url + "/healthz")
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503, health
        problem = health["problems"][0]
        assert (
            problem.startswith("table engram_layer3: checksum pass failed") and "block 0" in problem
        )
        assert str(tmp_path) not in problem and "models" not in problem, problem
        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            text = response.read().decode()
        failures = {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "tiered_store_checksum_failures_total"
        }
        assert failures["engram_layer3"] >= 1 and failures["engram_layer1"] == 0
    finally:
        server.stop()


def _healthz_within(server, want: int, seconds: float = 15) -> tuple[int, dict]:
    """Poll ``/healthz`` until it answers ``want`` (or the time is up); the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        status, health = get_json(server.url + "/healthz")
        if status == want or time.monotonic() > deadline:
            return status, health
        time.sleep(0.1)


def test_the_scrub_checks_the_served_version_and_outlives_a_missing_table(tmp_path):
    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table

    config = make_checkpoint(
        tmp_path, checkpoint={"scrub_interval_s": 0.2, "verify_on_start": True}
    )
    table = ServeConfig.from_yaml(config).table_path(3)
    for step in range(2):  # twice: the second removes generation 0, which nothing holds
        with TieredStore.open({"table": {"path": str(table)}}) as writer:
            writer.write([5], torch.full((1, writer.dim), 0.01 * (step + 1)))
            writer.commit()
        compact_table(table, progress=False)
    assert not table.exists()  # served from engram_layer3.g2.npy
    server = start_server(config, metrics=True)  # verify_on_start checks that version
    try:
        assert _healthz_within(server, 200)[0] == 200
        served = server.model.stores["engram_layer3"].cold.path
        assert served.name == "engram_layer3.g2.npy"
        with open(served, "r+b") as f:  # the served version goes bad: the scrub finds it
            f.seek(4096 + 1000)
            byte = f.read(1)
            f.seek(4096 + 1000)
            f.write(bytes([byte[0] ^ 0xFF]))
        status, health = _healthz_within(server, 503)
        assert status == 503 and "checksum pass failed" in health["problems"][0], health
        served.rename(served.with_name(served.name + ".moved"))  # a table gone from disk
        before = server.model.health["engram_layer3"].verifications
        time.sleep(1.0)
        assert server._scrubber.is_alive()  # and it goes on scrubbing: passes are counted
        assert server.model.health["engram_layer3"].verifications > before
    finally:
        server.stop()


def test_a_checksum_pass_over_a_missing_table_says_so_once_without_an_errno(tmp_path):
    """A pass over a table gone from disk recorded the OSError's repr-like text: /healthz read
    "[Errno 2] table data file engram_layer3.npy does not exist: 'engram_layer3.npy'"."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        table.rename(table.with_name(table.name + ".moved"))
        assert served.verify_tables() == ["engram_layer3"]
        assert served.health["engram_layer3"].last_error == (
            f"table data file {table} does not exist"
        )
    finally:
        served.close()


def test_a_failed_pass_is_checked_again_once_the_table_is_reopened_on_another_file(tmp_path):
    """A scrub pass that found the table corrupt kept /healthz at 503 after the table was made
    anew (repaired) and reopened, until the next pass, checkpoint.scrub_interval_s later (an
    hour here): a verdict on a file no longer served. A table reopened on another file is
    checked again at once; one reopened on the same file (a writer's commit) waits its turn."""

    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.table_format import create_table, read_manifest

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, checkpoint={"scrub_interval_s": 3600}))
    table = config.table_path(3)
    rows = load_table_in_memory(table).weight.numpy().copy()
    served = ServedModel(config)
    with _scrubbing(served) as start_scrub:
        start_scrub()
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        manifest = read_manifest(table)
        with open(table, "r+b") as f:  # a flipped byte in row 0 (no lookup reads it here)
            f.seek(manifest.data_offset)
            byte = f.read(1)
            f.seek(manifest.data_offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        assert served.verify_tables() == ["engram_layer3"]  # as a scheduled pass finds it
        health = served.health["engram_layer3"]
        _commit_a_new_version(table)  # the same file
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        time.sleep(1.5)  # a pass of the same corrupt file at every commit would scan for good
        assert health.verifications == 1 and health.last_error is not None
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)  # repaired
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        _wait_for_a_good_pass(health)
        assert served.health["engram_layer1"].verifications == 1  # only the table reopened


@contextlib.contextmanager
def _scrubbing(served):
    """``start_scrub()``: start ``served``'s scrubber (once); on the way out it is stopped and
    joined, and ``served`` closed."""
    stop, threads = threading.Event(), []
    try:
        yield lambda: threads.append(served.start_scrub(stop))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        served.close()


def _compacted_with_the_old_version_bad(served, table) -> None:
    """Stop ``served``'s own version checks, commit to ``table`` and compact it (generation 1;
    0 stays while served), then damage generation 0 (row 0: no lookup reads it)."""
    from tiered_store.delta.compaction import compact_table
    from tiered_store.table_format import read_manifest

    served.reload_check_seconds = 3600.0  # checks only when the test asks
    _commit_a_new_version(table)
    compact_table(table, progress=False)
    manifest = read_manifest(table)
    with open(table, "r+b") as f:
        f.seek(manifest.data_offset)
        byte = f.read(1)
        f.seek(manifest.data_offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _wait_for_a_good_pass(health) -> None:
    """Wait (15 s at most) for a pass to find the table good: its second verification."""
    deadline = time.monotonic() + 15
    while health.last_error is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health.last_error is None and health.verifications == 2


def test_a_pass_that_failed_over_a_version_replaced_meanwhile_is_checked_again(
    tmp_path, monkeypatch
):
    """A pass under way when the table was reopened on a new version (a compaction) failed over
    the old version's file, no longer served: with no failure known at the swap, nothing
    checked the table again, and /healthz said 503 until the next pass, an hour later. A pass
    that fails over a file a reload replaced meanwhile is checked again within a second."""

    from tiered_store.serve import served_model

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, checkpoint={"scrub_interval_s": 3600}))
    table = config.table_path(3)
    served = ServedModel(config)
    with _scrubbing(served) as start_scrub:
        _compacted_with_the_old_version_bad(served, table)
        real = served_model.verify_counted

        def reloaded_as_it_starts(path, health, stop=None, bytes_per_s=None):  # the old file
            monkeypatch.setattr(served_model, "verify_counted", real)
            assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
            return real(path, health, stop, bytes_per_s)

        monkeypatch.setattr(served_model, "verify_counted", reloaded_as_it_starts)
        assert served.verify_tables({"engram_layer3"}) == ["engram_layer3"]
        health = served.health["engram_layer3"]
        assert health.last_error is not None and served.stores["engram_layer3"].generation == 1
        start_scrub()
        _wait_for_a_good_pass(health)


def test_a_pass_that_fails_as_the_swap_takes_its_table_is_checked_again(tmp_path, monkeypatch):
    """A pass over the old version that failed while a reload swapped the table in (after the
    swap looked for a failed pass, before the new store was in ``stores``) was checked again by
    neither: the swap had seen no failure, and the pass still saw the old store served. /healthz
    said 503 over the new version, whole, until the next pass, an hour later. The swap looks for
    a failed pass once the new store is served, so one of the two sees the other."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, checkpoint={"scrub_interval_s": 3600}))
    table = config.table_path(3)
    served = ServedModel(config)
    with _scrubbing(served) as start_scrub:
        _compacted_with_the_old_version_bad(served, table)
        real, passes = served._announce_again, []

        def pass_ends_meanwhile(reopened):  # in _swap_in, before the new store is served
            passes.append(served.verify_tables({"engram_layer3"}))
            return real(reopened)

        monkeypatch.setattr(served, "_announce_again", pass_ends_meanwhile)
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        health = served.health["engram_layer3"]
        assert passes == [["engram_layer3"]] and health.last_error is not None
        start_scrub()
        _wait_for_a_good_pass(health)


def test_a_new_version_that_runs_out_of_memory_is_refused_and_leaks_nothing(tmp_path, monkeypatch):
    """A new version's store that ran out of memory beside the old ones (its tiers allocated
    while the old ones still hold theirs) escaped the reload: the request whose check opened it
    failed (500), once a second, and the stores already opened for the other stale tables were
    never closed (their memory and files held, at every check). It is refused as any other
    failure is: logged, in /healthz's warnings, counted, every store opened closed again, and
    the request served on the version open now."""

    from tiered_store import store as store_module

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    layer1 = config.table_path(1).resolve()

    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every request checks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real, opened = store_module.CacheHierarchy.from_config, _fds_open_on(layer1)

        def out_of_memory_for_layer3(store_config, *args, **kwargs):
            if Path(store_config.table.path).name == "engram_layer3.npy":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(store_config, *args, **kwargs)

        monkeypatch.setattr(
            store_module.CacheHierarchy, "from_config", staticmethod(out_of_memory_for_layer3)
        )
        request = parse_request(b'{"input_ids": [[7, 8, 9]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]  # on the version open now
        assert "out of memory" in (served.reload_refused or "")
        assert [served.health[name].reload_failures for name in TABLES] == [1, 1]
        assert _fds_open_on(layer1) == opened  # the store opened for layer 1 closed again
        monkeypatch.undo()
        assert served.reload_if_stale(force_check=True) == TABLES
        assert served.reload_refused is None
    finally:
        served.close()


def test_requests_are_served_while_a_reload_opens_the_new_version(tmp_path, monkeypatch):
    """A reload opened the new version's store while holding the request gate exclusively:
    every request waited for the whole open (a big table's: its tiers allocated, its page
    checksums read) at each writer's commit. The stores open first, requests served on the
    old ones meanwhile; only the swap holds requests back."""
    import threading

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(config.table_path(3))
        opening, go_on, real = threading.Event(), threading.Event(), served._open_checked

        def slow_open(name, old):  # a big table's open
            opening.set()
            assert go_on.wait(60)
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", slow_open)
        # the answers given while the open still ran
        during, reloaded = _answered_during_a_reload(served, opening, go_on)
        assert during == [[1, 3]] and reloaded == [["engram_layer3"]]
        store = served.stores["engram_layer3"]
        assert served.model.tables[3].table is store and not store.closed
        assert served.reload_if_stale(force_check=True) == []  # on the version now
    finally:
        served.close()


def test_an_old_store_whose_close_raises_leaves_the_others_closed_and_counted(tmp_path, caplog):
    """A reload of two tables whose first old store's close raised (its warm-restart save
    failed under -W error) left the second old store open for good (its threads, file and
    tiers) and counted neither reload, though both tables were served on their new version.
    Every old store closes, each reload counts, and the error is logged naming the table."""
    from tiered_store.warm_restart import RestartWarning, restart_path

    tiers = {**CONFIG["store"]["tiers"], "restart": {"enabled": True}}
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, store={"tiers": tiers}))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # a new version of both
            _commit_a_new_version(config.table_path(layer))
        old = dict(served.stores)
        in_the_way = restart_path(config.table_path(1))
        in_the_way.mkdir()  # layer 1's save fails: a directory where its file goes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RestartWarning)  # the new store's open: cold
            warnings.filterwarnings("error", "warm restart: could not save", RestartWarning)
            served.reload_if_stale(force_check=True)
        in_the_way.rmdir()
        assert {name: store.closed for name, store in old.items()} == dict.fromkeys(TABLES, True)
        assert {name: h.reloads for name, h in served.health.items()} == dict.fromkeys(TABLES, 1)
        assert served.reloads == 2
        assert all(not served.stores[name].closed for name in TABLES)
        assert "closing engram_layer1's store of the version swapped out failed" in caplog.text
    finally:
        served.close()


def test_requests_are_served_while_a_reload_closes_the_old_stores(tmp_path, monkeypatch):
    """A reload closed the old stores while it still held the request gate: every request
    waited for their close (a warm-restart save of the tiers, the prefetches' drain) at each
    writer's commit. They close once the gate opens again, requests served on the new stores
    meanwhile, none on an old one."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(config.table_path(3))
        old = served.stores["engram_layer3"]
        calls = old.stats()["lookup"]["calls"]
        closing, go_on, real = threading.Event(), threading.Event(), old.close

        def slow_close(**kwargs):  # a big table's warm-restart save
            closing.set()
            assert go_on.wait(60)
            return real(**kwargs)

        monkeypatch.setattr(old, "close", slow_close)
        # the answers given while the old store still closed
        during, reloaded = _answered_during_a_reload(served, closing, go_on)
        assert during == [[1, 3]] and reloaded == [["engram_layer3"]]
        assert old.closed and old.stats()["lookup"]["calls"] == calls  # none read the old one
        store = served.stores["engram_layer3"]
        assert served.model.tables[3].table is store and not store.closed
        assert served.health["engram_layer3"].reloads == 1
    finally:
        served.close()


def test_a_ctrl_c_as_a_reload_closes_the_old_stores_closes_every_one(tmp_path, monkeypatch, caplog):
    """A Ctrl-C (or an error) as a reload closed the old stores, after the gate opened, left the
    old stores after that one open for good (their files, their prefetch workers) and their
    reloads uncounted. Every old store closes; the Ctrl-C is raised then, and the next reload
    works."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks

        def commit_both() -> None:
            for layer in (1, 3):  # both tables stale
                _commit_a_new_version(config.table_path(layer))

        commit_both()
        old = dict(served.stores)
        real = old["engram_layer1"].close

        def interrupted_close(**kwargs):  # Ctrl-C as its close (a warm-restart save) ends
            real(**kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(old["engram_layer1"], "close", interrupted_close)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        assert all(store.closed for store in old.values())
        assert all(served.stores[name] is not old[name] for name in TABLES)
        assert [served.health[name].reloads for name in TABLES] == [1, 1]
        commit_both()
        old = dict(served.stores)
        real = old["engram_layer1"].close

        def failed_close(**kwargs):  # an error as it ends (a device's, say): the swap is done
            real(**kwargs)
            raise RuntimeError("injected close failure")

        monkeypatch.setattr(old["engram_layer1"], "close", failed_close)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == TABLES  # not raised to a request
        assert "engram_layer1's store of the version swapped out failed: " in caplog.text
        assert all(store.closed for store in old.values())
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
    finally:
        served.close()


def test_an_old_store_whose_close_and_carry_both_fail_logs_both(tmp_path, monkeypatch, caplog):
    """An old store whose close raised, then whose last counts could not be carried to its
    table's metrics: the carry's error replaced the close's, and was logged as the close's
    failure, the close's own error lost. Each is logged as what it is."""
    from tiered_store.serve import served_model

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(config.table_path(3))
        old = served.stores["engram_layer3"]
        real_close, real_counts = old.close, served_model.store_counts

        def failed_close(**kwargs):  # an error as it ends (a device's, say): the swap is done
            real_close(**kwargs)
            raise RuntimeError("injected close failure")

        def counts(table, store):  # the closed store's last counts cannot be read
            if store is old and store.closed:
                raise RuntimeError("injected counts failure")
            return real_counts(table, store)

        monkeypatch.setattr(old, "close", failed_close)
        monkeypatch.setattr(served_model, "store_counts", counts)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert old.closed and served.health["engram_layer3"].reloads == 1
        assert (
            "closing engram_layer3's store of the version swapped out failed: "
            "injected close failure" in caplog.text
        ), caplog.text
        assert "engram_layer3" in caplog.text and "injected counts failure" in caplog.text
        assert "swapped out failed: injected counts failure" not in caplog.text, caplog.text
    finally:
        served.close()


def test_a_reload_leaves_an_old_store_whose_read_hangs_to_close_under_it(tmp_path, monkeypatch):
    """An old store with a prefetch's cold read hung for good (a dead disk) held the reload in
    its close after the gate, without end: no reload came after, and a stop waited for it past
    stop_within_s (a close waits for the reload under way). The old store's close waits at most
    server.request_timeout_s; it is then left to close under the read, its table in
    left_closing (the serve command exits past it)."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    served = ServedModel(config)
    release = threading.Event()
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        old = served.stores["engram_layer3"]
        entered, read_rows = threading.Event(), old.cold.read_rows

        def hung_read(ids):  # a dead disk, until the test ends
            entered.set()
            release.wait(60)
            return read_rows(ids)

        monkeypatch.setattr(old.cold, "read_rows", hung_read)
        handle = old.prefetch([1, 2, 3])  # an announced request's, say
        assert entered.wait(10)
        _commit_a_new_version(config.table_path(3))
        reloaded: list[list[str]] = []
        reloader = threading.Thread(
            target=lambda: reloaded.append(served.reload_if_stale(force_check=True))
        )
        with pytest.warns(RuntimeWarning, match="engram_layer3.npy still under way after"):
            reloader.start()
            reloader.join(20)
            ended = not reloader.is_alive()  # while the read still hangs
        assert ended and reloaded == [["engram_layer3"]]
        assert old.closed and served.left_closing == ["engram_layer3"]
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]  # on the new store
    finally:
        release.set()
        served.close()
    assert handle.future.result(10) is not None  # the read ended on its own


def test_a_trace_that_fails_to_close_still_closes_the_stores(tmp_path):
    """The recorded trace's close failing (its directory removed, a full disk) raised out of
    ServedModel.close before any store closed: no warm-restart save, the stores' files and
    prefetch workers left open. The stores close all the same; the trace's error is raised
    after."""
    import shutil

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path / "ckpt"))
    traces = tmp_path / "traces"
    traces.mkdir()
    served = ServedModel(config, trace=traces / "t.trace")
    request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
    assert served.answer(request)["shape"] == [1, 3]
    shutil.rmtree(traces)  # its rename into place fails
    stores = dict(served.stores)
    with pytest.raises(OSError):
        served.close()
    assert all(store.closed for store in stores.values())
    assert _fds_open_on(config.table_path(1).resolve()) == 0


def test_serve_until_signal_restores_the_signal_handlers_when_its_stop_raises(tmp_path):
    """serve_until_signal put SIGTERM's and SIGINT's handlers back only if its stop returned:
    one that raised (the recorded trace's close failing, its directory removed) left its own
    in place, and a Ctrl-C in the process no longer interrupted anything. They are put back
    all the same, and the stop's error is raised."""
    import shutil
    import signal

    traces = tmp_path / "traces"
    traces.mkdir()
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path / "ckpt")).with_overrides(
        address="127.0.0.1:0", metrics_address=""
    )
    server = InferenceServer(config, trace=traces / "t.trace")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def stop_it() -> None:  # once listening: the trace's folder gone, then SIGTERM
        deadline = time.monotonic() + 60
        while server._uvicorn is None or not server._uvicorn.started:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        shutil.rmtree(traces)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_it)
    stopper.start()
    try:
        with pytest.raises(TierIOError, match="t.trace"):
            server.serve_until_signal()
    finally:
        stopper.join(60)
        after = {s: signal.getsignal(s) for s in before}
        for s, handler in before.items():
            signal.signal(s, handler)
    assert after == before
    assert all(store.closed for store in server.model.stores.values())


def test_a_close_during_a_reload_ends_the_reload_at_its_open_under_way(tmp_path, monkeypatch):
    """A close (a server's stop) while a reload opened the stale tables' new versions waited
    for the whole reload: every other table's open (a big table's tiers, its warm restore), the
    wait for the answers in flight, the swap, the old stores' close; none of it bounded by the
    stop's stop_within_s. The reload ends once the open under way is done, what it opened
    closed, and the close goes on."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    layer1 = config.table_path(1).resolve()
    served = ServedModel(config)
    closer = None
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        opening, opens, real = threading.Event(), [], served._open_checked

        def slow_open(name, old):  # a big table's open; the close comes meanwhile
            opens.append(name)
            opening.set()
            deadline = time.monotonic() + 10
            while not getattr(served, "_closing", threading.Event()).is_set():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", slow_open)
        reloaded: list[list[str]] = []
        reloader = threading.Thread(
            target=lambda: reloaded.append(served.reload_if_stale(force_check=True))
        )
        reloader.start()
        assert opening.wait(30)
        closer = threading.Thread(target=served.close)
        closer.start()
        reloader.join(60)
        closer.join(60)
        assert reloaded == [[]] and opens == ["engram_layer1"]  # no open after the close began
        assert not closer.is_alive() and all(s.closed for s in served.stores.values())
        assert _fds_open_on(layer1) == 0  # the store it opened closed too
    finally:
        if closer is None:
            served.close()


def test_a_stop_during_the_version_watch_s_reload_ends_it_at_its_open_under_way(
    tmp_path, monkeypatch
):
    """stop() joined the version watch (up to 30 s) before it closed the model, so a reload the
    watch had under way ran on meanwhile, every stale table opened in turn, unbounded by
    stop_within_s (the close that ends a reload at its open under way came after). The model
    is closed first: the reload ends at its open under way, and the watch with it."""
    from tiered_store import TieredStore

    server = start_server(make_checkpoint(tmp_path))
    try:
        served = server.model
        opening, opens, real = threading.Event(), [], served._open_checked

        def slow_open(name, old):  # a big table's open; the stop comes meanwhile
            opens.append(name)
            opening.set()
            deadline = time.monotonic() + 10
            while not served._closing.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", slow_open)
        for layer in (1, 3):  # both tables stale: the watch reopens them within a second
            with TieredStore.open({"table": {"path": str(served.config.table_path(layer))}}) as w:
                w.write([1], torch.zeros(1, w.dim))
                w.commit()
        assert opening.wait(30)
    finally:
        server.stop()
    assert opens == ["engram_layer1"]  # no open after the stop began
    assert not server._version_watch.is_alive()
    assert all(store.closed for store in served.stores.values())


def _grow_delta_map(path: str, rows: int, row_bytes: int) -> int:
    """Commit every row of the delta at ``path`` 8 times from a map of 64 KiB, which grows
    past the map a store pinned on it has (a store here must close before another opens)."""
    from tiered_store.delta.row_delta import RowDelta

    delta = RowDelta(path, row_bytes, map_bytes=1 << 16)
    try:
        start = delta.latest_step()
        for step in range(start + 1, start + 9):
            delta.commit(np.arange(rows), np.zeros((rows, row_bytes), dtype=np.uint8), step=step)
        return delta.map_grows
    finally:
        delta.close()


def test_a_table_whose_map_grew_elsewhere_leaves_the_others_opened_ahead(tmp_path, monkeypatch):
    """A stale table whose delta's map another process grew must close its old store before
    its new one opens (under the gate): the open ahead stopped there, and every stale table
    after it opened under the gate too, every request held back meanwhile. It goes on with
    them; only that one opens under the gate, once: its old store closed first (opened again
    beside it, it was refused again, its tiers allocated for nothing, requests held back)."""
    from tests import forkserver
    from tiered_store import TieredStore
    from tiered_store.delta import row_delta
    from tiered_store.delta.row_delta import delta_path

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):
            _commit_a_new_version(config.table_path(layer))
        assert served.reload_if_stale(force_check=True) == ["engram_layer1", "engram_layer3"]
        first = served.stores["engram_layer1"]
        with forkserver.context().Pool(1) as pool:  # layer 1's map grown in another process
            path = str(delta_path(first.cold.path))
            assert pool.apply(_grow_delta_map, (path, first.rows, first.row_bytes)) > 0
        with TieredStore.open({"table": {"path": str(config.table_path(3))}}) as writer:
            writer.write([1], torch.ones(1, writer.dim))
            writer.commit()
        opens: list[tuple[str, bool]] = []  # each open, and whether requests were held back
        real = served._open_checked

        def watched_open(name, old):
            opens.append((name, served._gate._exclusive))
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", watched_open)
        assert served.reload_if_stale(force_check=True) == ["engram_layer1", "engram_layer3"]
        assert opens == [
            ("engram_layer1", False),  # refused beside the old store: opened under the gate
            ("engram_layer3", False),
            ("engram_layer1", True),  # once the old store closed
        ]
        assert not any(store.closed for store in served.stores.values())
    finally:
        served.close()


def _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release):
    """Layer 1's table given a delta (its store reloaded), its delta's map grown in another
    process (a new store cannot open beside the old one: ESTALE), and a prefetch's cold read
    hung in the old store until ``release`` is set: the old store and the prefetch's handle."""
    from tests import forkserver
    from tiered_store.delta.row_delta import delta_path

    served.reload_check_seconds = 3600.0  # checks only when the test asks
    _commit_a_new_version(served.config.table_path(1))  # layer 1 gets a delta
    assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
    old = served.stores["engram_layer1"]
    with forkserver.context().Pool(1) as pool:  # its map grown in another process
        path = str(delta_path(old.cold.path))
        assert pool.apply(_grow_delta_map, (path, old.rows, old.row_bytes)) > 0
    entered, read_rows = threading.Event(), old.cold.read_rows

    def hung_read(ids):  # a prefetch's cold read hangs until the test releases it
        entered.set()
        release.wait(60)
        return read_rows(ids)

    monkeypatch.setattr(old.cold, "read_rows", hung_read)
    handle = old.prefetch([1, 2, 3])
    assert entered.wait(10)
    return old, handle


def test_healthz_does_not_flap_to_503_while_a_table_grown_elsewhere_is_reopened(
    tmp_path, monkeypatch
):
    """A table whose map grew elsewhere has its old store closed under the request gate before
    its new store opens: while that open ran, closed_tables named it and /healthz answered 503
    ("closed"), though requests waited for the swap and none failed, and a load balancer took
    the server out for a reopen that succeeded. It is named closed only once that open failed."""
    from tests import forkserver
    from tiered_store.delta import row_delta
    from tiered_store.delta.row_delta import delta_path

    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(ServeConfig.from_yaml(make_checkpoint(tmp_path)))
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(served.config.table_path(1))  # layer 1 gets a delta
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        old = served.stores["engram_layer1"]
        with forkserver.context().Pool(1) as pool:  # its map grown in another process
            path = str(delta_path(old.cold.path))
            assert pool.apply(_grow_delta_map, (path, old.rows, old.row_bytes)) > 0
        real, seen = served._open_checked, []

        def probed_open(name, store):  # a probe of /healthz as the new store opens
            if store.closed:
                seen.append(served.closed_tables())
            return real(name, store)

        monkeypatch.setattr(served, "_open_checked", probed_open)
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert seen == [[]], seen
        assert served.closed_tables() == []
    finally:
        served.close()


def test_table_open_agrees_with_healthz_while_a_table_grown_elsewhere_is_reopened(
    tmp_path, monkeypatch
):
    """While a reload reopened a table grown elsewhere (its old store closed under the request
    gate, requests waiting, none failing), /healthz did not name it closed, but
    tiered_store_table_open read 0 for it: the metric and its alert said a closed table that the
    health check did not. It reads 0 only for a table /healthz names closed."""
    from tests import forkserver
    from tiered_store.delta import row_delta
    from tiered_store.delta.row_delta import delta_path

    def table_open() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as scraped:
            text = scraped.read().decode()
        return {
            s.labels["table"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "tiered_store_table_open"
        }

    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    server = start_server(make_checkpoint(tmp_path))
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(served.config.table_path(1))  # layer 1 gets a delta
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        old = served.stores["engram_layer1"]
        with forkserver.context().Pool(1) as pool:  # its map grown in another process
            path = str(delta_path(old.cold.path))
            assert pool.apply(_grow_delta_map, (path, old.rows, old.row_bytes)) > 0
        real, seen = served._open_checked, []

        def probed_open(name, store):  # /healthz and /metrics as the new store opens
            if store.closed:
                seen.append((get_json(server.url + "/healthz")[0], table_open()[name]))
            return real(name, store)

        monkeypatch.setattr(served, "_open_checked", probed_open)
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert seen == [(200, 1)], seen
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 1}
    finally:
        server.stop()


def test_a_table_reopened_under_the_gate_is_not_named_closed_as_a_refused_swap_serves_it_alone(
    tmp_path, monkeypatch
):
    """Two tables grown elsewhere reopen under the request gate (their old stores closed first);
    the first opened, the second's new version failed: the refused swap cleared the first's
    reopen mark before it put the store opened for it into service alone, so that meanwhile
    /healthz answered 503 naming it closed and tiered_store_table_open read 0 for it (requests
    waited, none failed). Only the table left closed is named closed."""
    import errno

    from tests import forkserver
    from tiered_store.delta import row_delta
    from tiered_store.delta.row_delta import delta_path

    def table_open() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as scraped:
            text = scraped.read().decode()
        return {
            s.labels["table"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "tiered_store_table_open"
        }

    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    server = start_server(make_checkpoint(tmp_path))
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # each table gets a delta
            _commit_a_new_version(served.config.table_path(layer))
        assert served.reload_if_stale(force_check=True) == ["engram_layer1", "engram_layer3"]
        with forkserver.context().Pool(1) as pool:  # their maps grown in another process
            for old in served.stores.values():
                path = str(delta_path(old.cold.path))
                assert pool.apply(_grow_delta_map, (path, old.rows, old.row_bytes)) > 0
        real_open, real_alone, seen = served._open_checked, served._reopen_closed, []

        def failing_open(name, old):  # layer 3's new version does not open once its old closed
            if name == "engram_layer3" and old.closed:
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            return real_open(name, old)

        def probed_alone(names, ahead):  # /healthz and /metrics as layer 1 is served alone
            problems = get_json(server.url + "/healthz")[1].get("problems", [])
            seen.append(([p.split(":")[0] for p in problems], table_open()))
            return real_alone(names, ahead)

        monkeypatch.setattr(served, "_open_checked", failing_open)
        monkeypatch.setattr(served, "_reopen_closed", probed_alone)
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert seen == [(["table engram_layer3"], {"engram_layer1": 1, "engram_layer3": 0})], seen
        assert served.closed_tables() == ["engram_layer3"]
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 0}
    finally:
        server.stop()


@pytest.mark.parametrize("end", ["its open fails", "a Ctrl-C as it opens", "a Ctrl-C at the swap"])
def test_a_table_grown_elsewhere_not_reopened_is_named_closed_however_the_reload_ends(
    tmp_path, monkeypatch, end
):
    """A table grown elsewhere is marked as being reopened (TableHealth.reopening: /healthz and
    tiered_store_table_open do not name it closed) while the reload reopens it under the gate:
    however that reload ends with the table's store closed (its open failed, a Ctrl-C as it
    opened or as the swap took it), no mark is left: /healthz and the metric name it closed
    (a mark left would hide it for good), and the next check reopens it."""
    import errno

    from tests import forkserver
    from tiered_store.delta import row_delta
    from tiered_store.delta.row_delta import delta_path
    from tiered_store.metrics import build_registry

    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(ServeConfig.from_yaml(make_checkpoint(tmp_path)))
    registry = build_registry(served.stores, served.health, process=False)

    def table_open() -> dict[str, float]:
        return {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples
            if s.name == "tiered_store_table_open"
        }

    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(served.config.table_path(1))  # layer 1 gets a delta
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        old = served.stores["engram_layer1"]
        with forkserver.context().Pool(1) as pool:  # its map grown in another process
            path = str(delta_path(old.cold.path))
            assert pool.apply(_grow_delta_map, (path, old.rows, old.row_bytes)) > 0
        if end == "its open fails":
            real, failures = served._open_checked, [errno.EIO]

            def failing_open(name, store):  # once, under the gate (its old store closed)
                if store.closed and failures:
                    raise TierIOError(failures.pop(), f"{name}: injected open failure")
                return real(name, store)

            monkeypatch.setattr(served, "_open_checked", failing_open)
            assert served.reload_if_stale(force_check=True) == []
        elif end == "a Ctrl-C as it opens":
            _reload_interrupted_at(served, _called_by("_open_checked", "_open_new_version"))
        else:
            _reload_interrupted_at(served, _called_by("set_tables", "_reload_stale"))
        assert served.stores["engram_layer1"].closed
        assert not any(health.reopening for health in served.health.values())
        assert served.closed_tables() == ["engram_layer1"]
        assert table_open() == {"engram_layer1": 0, "engram_layer3": 1}
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert served.closed_tables() == []
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 1}
    finally:
        served.close()


def test_a_stale_table_whose_old_store_hangs_in_a_read_holds_no_request_back(tmp_path, monkeypatch):
    """A table whose map grew elsewhere has its old store closed under the request gate before
    its new store opens; that close waited without end for a call hung in the old store (a
    cold read on a dead disk), every request held back for good. It waits at most
    ``server.request_timeout_s``: the old store is left to close under that call (its table in
    left_closing), the table answers 503 meanwhile, and once the call ends a check opens it."""
    from tiered_store.delta import row_delta

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(config)
    release, reloader = threading.Event(), None
    try:
        old, handle = _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release)
        reloaded: list[list[str]] = []
        reloader = threading.Thread(
            target=lambda: reloaded.append(served.reload_if_stale(force_check=True))
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            reloader.start()
            reloader.join(30)  # far less than the read's hang
        assert not reloader.is_alive(), "the old store's close waited for the hung read"
        assert reloaded == [[]]
        assert served.left_closing == ["engram_layer1"]
        assert served.stores["engram_layer1"].closed  # its new store cannot open beside it
        release.set()
        assert handle.future.result(10) is not None
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
    finally:
        release.set()
        if reloader is not None:
            reloader.join()
        served.close()


def test_a_table_left_closed_under_a_hung_read_opens_at_the_first_check_once_it_ends(
    tmp_path, monkeypatch, caplog
):
    """A table whose map grew elsewhere, its old store left to close under a hung read, could
    not open its new store beside it (ESTALE): that failure set its retry's wait, so once the
    read ended it stayed closed (503) until the wait passed (up to CLOSED_RETRY_MOST_S), though
    the README says it opens once the read ends. Its first check after the read opens it (the
    log says it waits for that read)."""
    from tiered_store.delta import row_delta
    from tiered_store.serve import served_model

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    monkeypatch.setattr(served_model, "CLOSED_RETRY_FIRST_S", 3600.0)  # a wait no check outlasts
    served = ServedModel(config)
    release = threading.Event()
    try:
        old, handle = _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            assert served.reload_if_stale(force_check=True) == []
        assert served.left_closing == ["engram_layer1"]
        assert "engram_layer1 again once the calls hung in its old store end" in caplog.text
        served.reload_check_seconds = 0.0  # every call checks, as the version watch does
        assert served.reload_if_stale() == []  # the read still hangs: not opened beside it
        assert "engram_layer1" in served.reload_refused
        release.set()
        assert handle.future.result(10) is not None
        assert served.reload_if_stale() == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
        assert served.reload_refused is None
    finally:
        release.set()
        served.close()


def test_the_log_of_a_table_left_closed_under_a_hung_read_says_when_it_is_tried_again(
    tmp_path, monkeypatch, caplog
):
    """A table left closed under a hung read (ESTALE: no new store opens beside its old one) is
    tried again only once that read ends (or its files change), but the log said "trying again
    2 s later, then less often while it fails" of it before "once the calls hung in its old
    store end". It says only when it is tried."""
    from tiered_store.delta import row_delta

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(config)
    release = threading.Event()
    try:
        _, handle = _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release)
        with warnings.catch_warnings(), caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            assert served.reload_if_stale(force_check=True) == []
        assert served.left_closing == ["engram_layer1"]
        [logged] = [r.getMessage() for r in caplog.records if "could not reopen" in r.getMessage()]
        assert "s later" not in logged and "less often" not in logged, logged
        assert logged.endswith(
            "trying engram_layer1 again once the calls hung in its old store end, or once its "
            "files change"
        ), logged
        release.set()
        assert handle.future.result(10) is not None
    finally:
        release.set()
        served.close()


def test_the_log_of_a_table_left_closed_beside_one_tried_at_every_check_says_when_each_is_tried(
    tmp_path, monkeypatch, caplog
):
    """A reload refused (a table's new version did not open) with another table left closed:
    the log said "trying again 2 s later, then less often while it fails" of both, though only
    the table left closed waits so; the other is tried at every check. It says the checks' wait
    first, and names the table left closed with its own; and the next check (not forced) tries
    the other one, not the one left closed."""
    from tiered_store.serve import served_model

    monkeypatch.setattr(served_model, "CLOSED_RETRY_FIRST_S", 1800.0)  # a wait no check outlasts
    monkeypatch.setattr(served_model, "CLOSED_RETRY_MOST_S", 3600.0)
    served = ServedModel(ServeConfig.from_yaml(make_checkpoint(tmp_path)))
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(served.config.table_path(3))  # stale, its open refused below
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        _recorded_opens(served, monkeypatch, refused={"engram_layer1", "engram_layer3"})
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        [logged] = [r.getMessage() for r in caplog.records if "could not reopen" in r.getMessage()]
        assert logged.endswith(
            "trying again every 3600 s; engram_layer1 again 1800 s later, then less often while it "
            "fails (at most every 3600 s), or once its files change"
        ), logged
        refusing, tried = served._open_checked, []

        def tried_open(name, old):
            tried.append(name)
            return refusing(name, old)

        monkeypatch.setattr(served, "_open_checked", tried_open)
        served._last_version_check -= served.reload_check_seconds  # the next check is due
        assert served.reload_if_stale() == []
        assert tried == ["engram_layer3"], tried
        assert served.stores["engram_layer1"].closed
    finally:
        served.close()


def test_a_forced_check_leaves_a_table_closed_under_a_hung_read_and_reloads_the_others(
    tmp_path, monkeypatch
):
    """A forced check (``force_check``) tried at once a table left closed whose old store still
    had calls hung in it, though no new store opens beside that store (ESTALE): its failure
    refused the whole reload, so another table's new version was not served. A forced check
    waits for those calls as any check does, and reloads the other tables."""
    from tiered_store.delta import row_delta

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(config)
    release = threading.Event()
    try:
        old, handle = _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            assert served.reload_if_stale(force_check=True) == []
        assert served.left_closing == ["engram_layer1"]
        failures = served.health["engram_layer1"].reload_failures
        _commit_a_new_version(served.config.table_path(3))
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.stores["engram_layer1"].closed  # still waits for the hung read
        assert served.health["engram_layer1"].reload_failures == failures + 1
        assert "engram_layer1" in served.reload_refused
        release.set()
        assert handle.future.result(10) is not None
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert served.reload_refused is None
    finally:
        release.set()
        served.close()


def test_a_store_left_closing_is_let_go_once_its_hung_calls_end(tmp_path, monkeypatch):
    """A store a close left to close under a hung call (left_closing) was kept in a list for
    good, even after the call ended and the table reopened (listed twice then: the reopen's
    close of it was left too), its tiers' memory held for the life of the server. Once its
    calls end it is let go: freed, and no longer listed."""
    import gc
    import weakref

    from tiered_store.delta import row_delta

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    monkeypatch.setattr(row_delta, "MIN_MAP_BYTES", 1 << 16)  # a map the other process outgrows
    served = ServedModel(config)
    release = threading.Event()
    try:
        old, handle = _a_read_hung_in_a_table_grown_elsewhere(served, monkeypatch, release)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "still under way after 0.5 s"
            assert served.reload_if_stale(force_check=True) == []
        assert served.left_closing == ["engram_layer1"]
        release.set()
        assert handle.future.result(10) is not None
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert served.left_closing == []
        left = weakref.ref(old)
        del old, handle
        monkeypatch.undo()  # the patched read_rows holds the old store's file
        gc.collect()
        assert left() is None, "the store left closing is held after its calls ended"
    finally:
        release.set()
        served.close()


@contextlib.contextmanager
def _an_answer_in_flight_over_a_commit(tmp_path, request_timeout_s, hold):
    """A ServedModel (checked only when asked) whose layer 3 table a writer committed to, and an
    answer in flight in a thread (``hold(served, done)`` inside the request gate) until ``end``
    is called or the block ends; yields the model, its config, layer 3's file (resolved), the
    descriptors open on it once committed (``_fds_open_on``), and ``end``."""

    config = ServeConfig.from_yaml(
        make_checkpoint(tmp_path, server={"request_timeout_s": request_timeout_s})
    )
    layer3 = config.table_path(3).resolve()

    served = ServedModel(config)
    done, workers = threading.Event(), []

    def end() -> None:
        done.set()
        for worker in workers:
            worker.join(60)

    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(config.table_path(3))
        opened, inside = _fds_open_on(layer3), threading.Event()

        def answer() -> None:
            with served._gate.shared():
                inside.set()
                hold(served, done)

        workers.append(threading.Thread(target=answer))
        workers[0].start()
        try:
            assert inside.wait(30)
            yield served, config, layer3, opened, end
        finally:
            end()
    finally:
        served.close()


def _hung_answer(served, done) -> None:
    """For ``_an_answer_in_flight_over_a_commit``: an answer whose worker hangs on a read (until
    ``done``)."""
    done.wait(60)


def _reload_interrupted_at(served, at) -> None:
    """A forced check of ``served`` interrupted by a Ctrl-C (a real SIGINT, handled at the next
    instruction) as ``at(frame, event, arg)`` first holds for a profiled event; it raises
    KeyboardInterrupt."""
    import signal
    import sys

    def interrupt(frame, event, arg):
        if at(frame, event, arg):
            sys.setprofile(None)
            signal.raise_signal(signal.SIGINT)

    sys.setprofile(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
    finally:
        sys.setprofile(None)


def _called_by(name: str, caller: str):
    """For ``_reload_interrupted_at``: as function ``name`` is called by ``caller``."""

    def at(frame, event, arg) -> bool:
        by = frame.f_back.f_code.co_name if frame.f_back is not None else ""
        return event == "call" and (frame.f_code.co_name, by) == (name, caller)

    return at


def _recorded_opens(served, monkeypatch, refused=()) -> list:
    """The stores ``served``'s reloads open from now on, in order; the new versions of the
    tables in ``refused`` (looked at in each open) do not open (a read error)."""
    import errno

    real, opened = served._open_checked, []

    def recorded_open(name, old):
        if name in refused:
            raise TierIOError(errno.EIO, f"{name}: injected open failure")
        opened.append(real(name, old))
        return opened[-1]

    monkeypatch.setattr(served, "_open_checked", recorded_open)
    return opened


@pytest.mark.parametrize("through", ["an answer outlasting the reload", "a refused swap"])
def test_a_ctrl_c_as_a_table_reopened_alone_is_served_leaves_no_store_unnamed(
    tmp_path, monkeypatch, through
):
    """A table left closed, reopened alone by a store opened then (behind an answer outlasting
    the reload, or another table's refused version before it was opened ahead): a Ctrl-C as
    that store was being served (the model reading it already) left ``stores`` naming the
    closed one, the new one open and out of every guard's reach: /healthz named the table
    closed while it served, and the next reload left that store open for good. It is served
    (``stores`` names what the model reads), or closed."""
    with contextlib.ExitStack() as stack:
        if through == "a refused swap":
            served = ServedModel(ServeConfig.from_yaml(make_checkpoint(tmp_path)))
            stack.callback(served.close)
            served.reload_check_seconds = 3600.0  # checks only when the test asks
            _commit_a_new_version(served.config.table_path(1))  # refused below
        else:
            served, *_ = stack.enter_context(
                _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer)
            )
            assert served.reload_if_stale(force_check=True) == []  # it outlasts the wait
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        opened = _recorded_opens(served, monkeypatch, refused=("engram_layer1",))
        _reload_interrupted_at(served, _called_by("_serve_or_close", "_reopen_closed"))
        [new] = opened
        assert served.model.tables[3].table is served.stores["engram_layer3"]
        assert served.stores["engram_layer3"] is new or new.closed
        assert served.closed_tables() == ([] if not new.closed else ["engram_layer3"])


def test_a_second_ctrl_c_as_a_postponed_reload_cleans_up_leaves_no_store_open(
    tmp_path, monkeypatch
):
    """A reload postponed for an answer still running reopens the tables left closed alone; a
    Ctrl-C as it does has its guard serve or close the stores opened for them, and a second
    Ctrl-C as that guard began to close them left the rest open for good (the guard after it,
    told they were handled, closed none of them). That guard serves or closes them then."""
    from tiered_store.serve import served_model

    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (served, *_):
        for name in TABLES:  # what refused reloads may leave
            served.stores[name].close()
        opened = _recorded_opens(served, monkeypatch)
        real, closes = served_model._close_all, []

        def close_all(stores):  # after the first Ctrl-C: the table it was at closed as it
            closes.append(sorted(stores))  # unwinds, then its guard's close: a second Ctrl-C
            if len(closes) == 2:  # as it begins
                raise KeyboardInterrupt
            return real(stores)

        def interrupted(frame, event, arg) -> bool:  # its first table, not taken yet
            if _called_by("set_tables", "_reopen_closed")(frame, event, arg):
                monkeypatch.setattr(served_model, "_close_all", close_all)
                return True
            return False

        _reload_interrupted_at(served, interrupted)
        assert closes[:2] == [["engram_layer1"], TABLES], closes  # both Ctrl-Cs came
        assert len(opened) == 2, opened
        left = [s for s in opened if not s.closed and s not in served.stores.values()]
        assert left == [], "a store opened for the reload is left open, neither served nor closed"


def test_a_reload_postponed_for_an_answer_still_running_closes_the_stores_it_opened(tmp_path):
    """The new stores open before the swap waits for the answers in flight: one that outlasts
    request_timeout_s postpones the swap, and what was opened for it is closed again."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        _,
        layer3,
        opened,
        end,
    ):
        assert served.reload_if_stale(force_check=True) == []
        assert "postponed" in (served.reload_refused or "")
        assert _fds_open_on(layer3) == opened  # the store opened for the swap closed again
        end()  # the answer ends
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert _fds_open_on(layer3) == opened  # the old store's file closed, the new one's open


def test_a_table_left_closed_reopens_alone_while_an_answer_outlasts_the_reload(tmp_path):
    """A table left closed (no version of it open: every request answers 503) waited for the
    answers in flight as a swap does, and once one outlasted request_timeout_s (a worker hung
    for good) every later check was postponed behind it: the server answered 503 for as long as
    that answer hung. No answer reads a version of a table left closed, so it is reopened alone
    once the wait ends (bounded, logged), and at the checks after it; the other tables wait."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        _,
        _,
        _,
        end,
    ):
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
        assert "engram_layer3 (postponed" in (served.reload_refused or "")
        served.stores["engram_layer1"].close()  # again, while the answer still runs
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
        assert "engram_layer3 (postponed" in (served.reload_refused or "")
        assert served.health["engram_layer1"].reload_failures == 0
        end()  # the answer ends
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.reload_refused is None


def test_the_reload_failures_help_says_which_checks_not_serving_a_version_count(
    tmp_path, monkeypatch
):
    """tiered_store_reload_failures_total's help said each count was a check that found a new
    version and did not serve it, its open failed or waiting; but a reload postponed for an
    answer still running serves none and is not counted, and a table whose new version opened,
    in a swap refused for another table, is counted though its open did not fail. The help
    says both."""
    from tiered_store.metrics import METRICS

    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        config,
        _,
        _,
        end,
    ):
        assert served.reload_if_stale(force_check=True) == []  # postponed
        assert served.health["engram_layer3"].reload_failures == 0
        end()  # the answer ends
        _commit_a_new_version(config.table_path(1))  # layer 1 stale too, its new version opens
        opened = _recorded_opens(served, monkeypatch, refused={"engram_layer3"})
        assert served.reload_if_stale(force_check=True) == []
        assert len(opened) == 1 and opened[0].closed  # opened, not served: the swap refused
        counted = {name: served.health[name].reload_failures for name in TABLES}
        assert counted == {"engram_layer1": 1, "engram_layer3": 1}, counted
    said = METRICS["tiered_store_reload_failures_total"][2]
    assert "postponed" in said, said  # not counted
    assert "another table's" in said, said  # counted though its own open did not fail


def test_a_check_while_a_postponed_answer_still_runs_says_what_waits_now(tmp_path):
    """A check while the answers a reload was postponed for still ran returned at once, leaving
    /healthz's warning as that reload set it: a table stale since (or one whose version cannot
    be told) went unnamed, as if on its current version, and the answers' count stayed. It
    names every table waiting now."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        config,
        _,
        _,
        end,
    ):
        assert served.reload_if_stale(force_check=True) == []
        assert served.reload_refused == "engram_layer3 (postponed: 1 answer(s) running)"
        _commit_a_new_version(config.table_path(1))  # layer 1 stale too, meanwhile
        assert served.reload_if_stale(force_check=True) == []  # still running: not tried
        assert served.reload_refused == (
            "engram_layer1, engram_layer3 (postponed: 1 answer(s) running)"
        ), served.reload_refused
        end()  # the answer ends
        assert served.reload_if_stale(force_check=True) == TABLES
        assert served.reload_refused is None


def test_a_table_left_closed_that_does_not_reopen_behind_a_postponed_answer_is_logged_once(
    tmp_path, monkeypatch, caplog
):
    """A table left closed whose reopen alone fails (behind an answer outlasting the reload) is
    logged once as left closed, naming the table and the error, and counted as a failure."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (served, *_):
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        _recorded_opens(served, monkeypatch, refused={"engram_layer1"})
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "left closed" in r.getMessage()]
        [line] = logged
        assert line.startswith("could not reopen engram_layer1, left closed (its lookups answer"), (
            line
        )
        assert "engram_layer1: injected open failure" in line, line
        assert served.health["engram_layer1"].reload_failures == 1
        assert served.stores["engram_layer1"].closed


def test_a_table_left_closed_reopened_behind_a_postponed_answer_counts_the_answers_waited_for(
    tmp_path,
):
    """A check while an answer a reload was postponed for still ran, a table left closed
    meanwhile: that table was reopened alone, and /healthz said the others' reload was
    "postponed: N answer(s) running" counting every answer in flight, those begun since the
    reload gave up too, which it does not wait for. It counts those it waits for."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (served, *_):
        assert served.reload_if_stale(force_check=True) == []  # the answer outlasts the wait
        assert served.reload_refused == "engram_layer3 (postponed: 1 answer(s) running)"
        inside, done = threading.Event(), threading.Event()

        def answer() -> None:  # an answer begun since, still running at the next check
            with served._gate.shared():
                inside.set()
                done.wait(60)

        later = threading.Thread(target=answer)
        later.start()
        try:
            assert inside.wait(30)
            served.stores["engram_layer1"].close()  # what a refused reload may leave
            assert served.reload_if_stale(force_check=True) == ["engram_layer1"]  # alone
            assert served.reload_refused == "engram_layer3 (postponed: 1 answer(s) running)"
        finally:
            done.set()
            later.join(60)


def test_a_ctrl_c_as_a_postponed_reload_closes_the_stores_it_opened_closes_them(tmp_path):
    """A Ctrl-C (a real SIGINT) as a reload postponed for an answer still running began to close
    the stores it had opened for the swap left them open for good (neither served nor closed:
    their descriptors held). They close; the Ctrl-C is raised then."""
    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        _,
        layer3,
        opened,
        end,
    ):
        _reload_interrupted_at(served, _called_by("_close_all", "_reload_stale"))
        assert _fds_open_on(layer3) == opened  # the store opened for the swap closed again
        end()  # the answer ends


def test_a_reload_interrupted_while_it_waits_for_the_answers_in_flight(tmp_path):
    """A Ctrl-C while the reload waited for an answer in flight left the request gate closed
    for good (every later request waited on it without end, close() too), and the new
    version's store, opened before the wait, open. The gate opens again, that store closes,
    and the interrupt goes on."""
    import signal

    def answer_in_flight(served, done) -> None:  # Ctrl-C once the reload waits for it
        while not served._gate._exclusive and not done.is_set():
            time.sleep(0.01)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # its main thread
        done.wait(60)

    with _an_answer_in_flight_over_a_commit(tmp_path, 60, answer_in_flight) as (
        served,
        config,
        layer3,
        opened,
        end,
    ):
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        end()
        assert _fds_open_on(layer3) == opened  # the store opened for the swap closed again
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        answers: list[list[int]] = []
        asker = threading.Thread(target=lambda: answers.append(served.answer(request)["shape"]))
        asker.start()
        asker.join(30)
        assert answers == [[1, 3]]  # the gate let it pass
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]


def test_a_reload_interrupted_by_ctrl_c_closes_every_store_it_opened(tmp_path, monkeypatch):
    """A reload interrupted (Ctrl-C, SIGTERM's KeyboardInterrupt) after it had opened the new
    version of one stale table, while it opened the next, went up the stack with that store
    open (its memory, its files and the hold that keeps a compaction from removing the version
    it reads). Every store the reload opened is closed, and the interrupt goes on."""

    from tiered_store import store as store_module

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    layer1 = config.table_path(1).resolve()

    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real, opened = store_module.CacheHierarchy.from_config, _fds_open_on(layer1)

        def interrupted_at_layer3(store_config, *args, **kwargs):
            if Path(store_config.table.path).name == "engram_layer3.npy":
                raise KeyboardInterrupt
            return real(store_config, *args, **kwargs)

        monkeypatch.setattr(
            store_module.CacheHierarchy, "from_config", staticmethod(interrupted_at_layer3)
        )
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        assert _fds_open_on(layer1) == opened  # the store opened for layer 1 closed again
        monkeypatch.undo()
        assert served.reload_if_stale(force_check=True) == TABLES
    finally:
        served.close()


def test_a_reload_interrupted_mid_swap_leaves_the_model_on_the_stores_served(tmp_path, monkeypatch):
    """A Ctrl-C inside set_tables, once it had given layer 1 its new store and before layer 3's:
    the new stores were closed, layer 1's while the model read it, the old one still open beside
    it (every request then failed 503 'closed'). The model is back on the stores served, each
    open, the new ones closed, and the interrupt goes on."""
    from tiered_store.engram.module import MultiHeadEmbedding

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real, calls = MultiHeadEmbedding.set_backend, []

        def interrupted_at_layer3(embedding, backend):  # layers swap in order: 1, then 3
            calls.append(backend)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(embedding, backend)

        monkeypatch.setattr(MultiHeadEmbedding, "set_backend", interrupted_at_layer3)
        old = dict(served.stores)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        assert served.stores == old
        for layer in (1, 3):
            table = served.model.tables[layer]
            assert table.table is served.stores[config.table_name(layer)], layer
            assert not table.table.closed, layer
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
        assert [h.lookup_failures for h in served.health.values()] == [0, 0]
        assert served.reload_if_stale(force_check=True) == TABLES
    finally:
        served.close()


def test_a_second_ctrl_c_while_an_interrupted_swap_is_undone_leaves_no_closed_store_served(
    tmp_path, monkeypatch
):
    """A Ctrl-C inside set_tables (layer 1 on its new store, layer 3 not), then another as the
    undo put layer 1 back: every new store was closed, layer 1's while the model still read it
    (every request then failed 503 'closed' until the next check). A table the undo did not
    put back keeps its new store, which ``stores`` then names, its old one closed. (set_tables
    undoes its own swap, and the reload undoes it again: layer 1 stays on its new store when
    both are interrupted there.)"""
    from tiered_store.engram.module import MultiHeadEmbedding

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real, calls = MultiHeadEmbedding.set_backend, []

        def interrupted_twice(embedding, backend):  # layers swap in order: 1, then 3
            calls.append(backend)
            # the swap at layer 3, then set_tables' undo at layer 1 (layer 3 kept its old
            # store: not put back), then the reload's undo at layer 1
            if len(calls) in (2, 3, 4):
                raise KeyboardInterrupt
            real(embedding, backend)

        monkeypatch.setattr(MultiHeadEmbedding, "set_backend", interrupted_twice)
        old = dict(served.stores)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        for layer in (1, 3):
            table = served.model.tables[layer]
            assert table.table is served.stores[config.table_name(layer)], layer
            assert not table.table.closed, layer
        assert served.stores["engram_layer3"] is old["engram_layer3"]  # put back
        assert old["engram_layer1"].closed  # not served: closed
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
        assert [h.lookup_failures for h in served.health.values()] == [0, 0]
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
    finally:
        served.close()


def test_a_reload_interrupted_as_it_announces_serves_and_closes_as_swapped(tmp_path, monkeypatch):
    """A Ctrl-C once the model took the new stores, while the waiting requests were announced
    to them: ``stores`` kept the old ones, open, and the new ones, which the model read, were
    in no list; the next check found the old ones stale and opened the tables yet again, the
    first new stores never closed (their files and memory held for good). ``stores`` names
    what the model reads, the old stores close (their reloads counted), and the interrupt goes
    on."""

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    layer1 = config.table_path(1).resolve()

    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        opened = _fds_open_on(layer1)
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        old = dict(served.stores)

        def interrupted(reopened):
            raise KeyboardInterrupt

        monkeypatch.setattr(served, "_announce_again", interrupted)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        for layer in (1, 3):
            name = config.table_name(layer)
            assert served.model.tables[layer].table is served.stores[name], layer
            assert served.stores[name] is not old[name] and old[name].closed, layer
            assert served.health[name].reloads == 1, layer  # swapped in: counted as a reload
        assert _fds_open_on(layer1) == opened  # the old store's file closed, the new one's open
        assert served.reload_if_stale(force_check=True) == []  # on the version now
    finally:
        served.close()


def _counted_opens(monkeypatch) -> list[str]:
    """The file name of each store opened from now on (``TieredStore``), in order."""
    from tiered_store import TieredStore

    real_init, opened = TieredStore.__init__, []

    def counted_init(self, store_config, *args, **kwargs) -> None:
        opened.append(Path(store_config.table.path).name)
        real_init(self, store_config, *args, **kwargs)

    monkeypatch.setattr(TieredStore, "__init__", counted_init)
    return opened


def _make_for_another_seed(served, table, value: float = 1.0) -> np.ndarray:
    """Write layer 3's ``table`` anew as another model's (seed 7: only its layout differs),
    every value ``value``: a reload of ``served`` refuses it for what its files hold; returns
    the rows written."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.engram.hashing import NgramHasher
    from tiered_store.engram.model import ModelConfig
    from tiered_store.table_format import create_table

    seeded = ModelConfig.from_dict(
        {**CONFIG["model"], "engram": {**CONFIG["model"]["engram"], "seed": 7}}
    )
    store = served.stores["engram_layer3"]
    rows = np.full((store.rows, store.dim), value, np.float32)
    other = table_metadata(NgramHasher(seeded.engram), 3)
    create_table(table, rows, progress=False, overwrite=True, metadata=other)
    return rows


def _settle(table, ago_s: float = 10.0) -> None:
    """Date ``table``'s files (data, manifest, page checksums) ``ago_s`` seconds back: settled,
    a refusal of them is kept (files just written may change unseen)."""
    from tiered_store.page_checksums import sidecar_path
    from tiered_store.table_format import table_paths

    then = time.time_ns() - int(ago_s * 10**9)
    for path in (*table_paths(table), sidecar_path(table)):
        os.utime(path, ns=(then, then))


def test_a_pass_judges_no_file_made_anew_over_a_table_and_not_served(tmp_path):
    """The scrubber verified the file a table's path names, not the one served: a damaged table
    made anew over the path, and refused at reload (another layout), was found corrupt though
    not served. Such a table has no verdict until a reload serves the new file; the old file,
    replaced, is read by no lookup either (each fails as a read error: README's "not served
    meanwhile"), so no pass judges it."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.serve.guarded_table import TableUnavailableError
    from tiered_store.table_format import create_table, read_manifest

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        rows = _make_for_another_seed(served, table)
        manifest = read_manifest(table)
        with open(table, "r+b") as f:  # and damaged
            f.seek(manifest.data_offset)
            f.write(b"\xff")
        assert served.reload_if_stale(force_check=True) == []
        assert "expects seed=0" in (served.reload_refused or "")
        assert served.verify_tables() == []
        health = served.health["engram_layer3"]
        assert (health.verifications, health.last_error) == (0, None)
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        with pytest.raises(TableUnavailableError) as caught:  # the old file is read by none
            served.answer(request)
        assert (caught.value.table, caught.value.reason) == ("engram_layer3", "read")
        assert served.health["engram_layer1"].verifications == 1
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.verify_tables() == [] and health.verifications == 1
    finally:
        served.close()


def test_a_pass_over_a_table_being_made_anew_has_no_verdict_and_is_checked_again(tmp_path):
    """A pass that started while a table was being made anew over its path (its manifest
    unlinked under the folder's lock until the new one is moved in) counted a checksum failure,
    "table manifest ... does not exist", and /healthz said 503 (the critical alert fired) until
    the next pass, an hour later. Such a pass has no verdict, and the table is checked again
    within a second."""
    import os

    from tiered_store.process_locks import locked_folder
    from tiered_store.table_format import table_paths

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, checkpoint={"scrub_interval_s": 3600}))
    table = config.table_path(3)
    manifest, aside = table_paths(table)[1], tmp_path / "manifest.aside"
    served = ServedModel(config)
    with _scrubbing(served) as start_scrub:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        health = served.health["engram_layer3"]
        with locked_folder(table.parent):  # as _publish does, between unlink and move
            os.replace(manifest, aside)
            assert served.verify_tables() == []
            assert (health.verifications, health.checksum_failures, health.last_error) == (
                0,
                0,
                None,
            )
            assert served.health["engram_layer1"].verifications == 1
            os.replace(aside, manifest)
        start_scrub()
        deadline = time.monotonic() + 15
        while health.verifications == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (health.verifications, health.checksum_failures, health.last_error) == (1, 0, None)


def test_a_pass_that_raises_something_unexpected_tries_its_tables_again_a_few_times(
    tmp_path, monkeypatch, caplog
):
    """A checksum pass that raised something unexpected (logged: "checksum pass failed") let
    go of the tables queued to be checked again within a second (a failed verdict on a file a
    reload replaced, a pass with no verdict): they waited for the next whole pass, an hour
    later, /healthz at 503 meanwhile. They are queued again, SCRUB_RETRIES times at most (a
    pass failing for good is not run every second), then left to the next whole pass."""
    import logging

    from tiered_store.serve import served_model as served_module
    from tiered_store.serve.served_model import SCRUB_RETRIES

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, checkpoint={"scrub_interval_s": 3600}))
    served = ServedModel(config)
    real, calls = served_module.verify_counted, []

    def unexpected_once(path, health, stop=None, bytes_per_s=None):
        calls.append(Path(path).name)
        if len(calls) == 1:
            raise RuntimeError("something unexpected")
        return real(path, health, stop, bytes_per_s)

    with _scrubbing(served) as start_scrub:
        health = served.health["engram_layer3"]
        monkeypatch.setattr(served_module, "verify_counted", unexpected_once)
        served._scrub_soon("engram_layer3")
        start_scrub()
        deadline = time.monotonic() + 15
        while health.verifications == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (health.verifications, health.checksum_failures) == (1, 0)
        assert calls == ["engram_layer3.npy", "engram_layer3.npy"]

        def unexpected_always(path, health, stop=None, bytes_per_s=None):
            calls.append(Path(path).name)
            raise RuntimeError("something unexpected")

        calls.clear()
        monkeypatch.setattr(served_module, "verify_counted", unexpected_always)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            served._scrub_soon("engram_layer3")
            deadline = time.monotonic() + 30
            while "left to the next whole pass" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.05)
            time.sleep(2.5)  # two more turns of the scrubber: none checks it
        assert calls == ["engram_layer3.npy"] * (1 + SCRUB_RETRIES)
        assert "engram_layer3" in caplog.text


def test_a_checksum_pass_ends_once_the_server_stops_and_counts_nothing(tmp_path):
    """The scrubber's pass ran to its end whatever the stop: the server's stop waited up to
    30 s for it and then closed the tables under it. A pass ends once the stop is set, with no
    verdict (nothing counted, /healthz unchanged)."""
    import threading

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        stop = threading.Event()
        stop.set()
        assert served.verify_tables(stop=stop) == []
        assert [h.verifications for h in served.health.values()] == [0, 0]
        assert all(h.last_error is None for h in served.health.values())
        assert served.verify_tables(stop=threading.Event()) == []
        assert [h.verifications for h in served.health.values()] == [1, 1]
    finally:
        served.close()


def test_a_table_of_another_shape_is_refused_at_reload_and_the_stats_stay_true(tmp_path, caplog):
    """A table made anew with other rows: the check came after the stores were swapped, so the
    request answered 500, /stats described the refused table and the model kept the old one."""
    import numpy as np

    from tiered_store import create_table
    from tiered_store.engram.checkpoint import table_metadata

    config = make_checkpoint(tmp_path)
    table = ServeConfig.from_yaml(config).table_path(3)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    layout = table_metadata(server.model.model.hasher, 3)
    try:
        rows = server.model.stores["engram_layer3"].rows
        dim = server.model.stores["engram_layer3"].dim
        half = np.zeros((rows // 2, dim), np.float32)
        create_table(table, half, progress=False, overwrite=True, metadata=layout)
        assert server.model.reload_if_stale(force_check=True) == []
        assert server.model.reload_if_stale(force_check=True) == []  # logged once, not per check
        refused = [r for r in caplog.records if "could not reopen engram_layer3" in r.getMessage()]
        assert len(refused) == 1 and "does not match its own metadata" in refused[0].getMessage()
        code, body = post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})
        assert code == 503, body  # the replaced file: its rows are gone, not a server error
        assert get_json(server.url + "/stats")[1]["geometry"]["engram_layer3"]["rows"] == rows
        whole = np.zeros((rows, dim), np.float32)
        create_table(table, whole, progress=False, overwrite=True, metadata=layout)
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def test_a_table_made_anew_for_another_engram_layout_is_refused_at_reload(tmp_path, caplog):
    """A table of the same rows x dim made anew over the served one for another Engram layout
    (another hash seed: `init-model --overwrite` for another model): the reload swapped it in
    without the layout check loading makes, serving rows hashed for another model."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.engram.hashing import NgramHasher
    from tiered_store.engram.model import ModelConfig
    from tiered_store.table_format import create_table

    config = make_checkpoint(tmp_path)
    table = ServeConfig.from_yaml(config).table_path(3)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    model = server.model.model
    seeded = ModelConfig.from_dict(
        {**CONFIG["model"], "engram": {**CONFIG["model"]["engram"], "seed": 7}}
    )
    other = table_metadata(NgramHasher(seeded.engram), 3)
    assert other["engram"]["rows"] == model.hasher.table_rows(3)  # only its layout differs
    try:
        rows = np.ones((model.tables[3].rows, model.tables[3].dim), np.float32)
        create_table(table, rows, progress=False, overwrite=True, metadata=other)
        assert server.model.reload_if_stale(force_check=True) == []
        refused = [r for r in caplog.records if "could not reopen engram_layer3" in r.getMessage()]
        assert len(refused) == 1 and "expects seed=0" in refused[0].getMessage()
        assert server.model.reloads == 0
        layout = table_metadata(model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def test_reloads_and_refused_reloads_are_counted_per_table(tmp_path):
    """A new version refused at reload (made for another Engram layout) was logged once and
    listed in /healthz's warnings, but counted nowhere: no metric told a refused reload (nor a
    reload) from none. Both are counters per table now, in the metrics and in /stats."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.metrics import build_registry
    from tiered_store.table_format import create_table

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    registry = build_registry(served.stores, served.health, process=False)

    def counted(name: str) -> dict[str, float]:
        return {
            s.labels["table"]: s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples
            if s.name == name
        }

    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        rows = _make_for_another_seed(served, table)
        assert served.reload_if_stale(force_check=True) == []
        assert served.reload_if_stale(force_check=True) == []  # every check that refused it
        zero = {"engram_layer1": 0, "engram_layer3": 0}
        assert counted("tiered_store_reload_failures_total") == {**zero, "engram_layer3": 2}
        assert counted("tiered_store_reloads_total") == zero
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert counted("tiered_store_reloads_total") == {**zero, "engram_layer3": 1}
        assert counted("tiered_store_reload_failures_total") == {**zero, "engram_layer3": 2}
        health = served.health["engram_layer3"]
        assert (health.reloads, health.reload_failures) == (1, 2)
    finally:
        served.close()


def test_a_refused_version_is_not_opened_again_until_its_files_change(tmp_path, monkeypatch):
    """A new version refused at reload (made for another Engram layout) was opened again at
    every check, every second, for as long as it stayed: a whole store beside the old one each
    time (its tiers allocated, its page checksums read), to be refused again. It is opened
    again once the table's files change; it stays refused, and counted, meanwhile."""
    import os

    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.engram.hashing import NgramHasher
    from tiered_store.engram.model import ModelConfig
    from tiered_store.page_checksums import sidecar_path
    from tiered_store.table_format import create_table, table_paths

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    opened = _counted_opens(monkeypatch)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        seeded = ModelConfig.from_dict(
            {**CONFIG["model"], "engram": {**CONFIG["model"]["engram"], "seed": 7}}
        )
        store = served.stores["engram_layer3"]
        rows = np.ones((store.rows, store.dim), np.float32)
        other = table_metadata(NgramHasher(seeded.engram), 3)

        def settled() -> None:  # written a while ago (files just written may change unseen)
            then = time.time_ns() - 10**10
            for path in (*table_paths(table), sidecar_path(table)):
                os.utime(path, ns=(then, then))

        create_table(table, rows, progress=False, overwrite=True, metadata=other)
        settled()
        for _ in range(3):
            assert served.reload_if_stale(force_check=True) == []
        assert opened == ["engram_layer3.npy"]
        assert "expects seed=0" in (served.reload_refused or "")
        assert served.health["engram_layer3"].reload_failures == 3
        create_table(table, rows, progress=False, overwrite=True, metadata=other)  # made anew
        settled()
        assert served.reload_if_stale(force_check=True) == []
        assert opened == ["engram_layer3.npy"] * 2
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.reload_refused is None
    finally:
        served.close()


def test_the_log_of_a_refusal_kept_says_it_is_tried_once_its_files_change(tmp_path, caplog):
    """A new version refused for what its files hold is not opened again until they change
    (nor the tables stale with it), but the log said "trying again every 1 s", also once the
    refusal was kept (its files settled after a first refusal). Once it is kept the log says it
    is tried once its files change, once."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _make_for_another_seed(served, table)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []  # just written: not kept
            _settle(table)  # written a while ago: a refusal of them is kept
            for _ in range(3):
                assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert len(logged) == 2, logged
        assert "files change" not in logged[0], logged  # tried again at the next check
        assert logged[1].endswith(
            "trying again every 3600 s; engram_layer3 once its files change (refused for what "
            "they hold)"
        ), logged[1]
    finally:
        served.close()


def test_a_kept_refusal_whose_files_change_and_are_refused_again_is_logged_again(tmp_path, caplog):
    """A refusal kept (its files settled) is logged as tried once its files change; once they
    changed (settled when next checked) and the new ones were refused again for the same
    reason, nothing was logged: the log (as /healthz) matched what was logged before, though
    another version was tried and refused. Each version refused is logged once."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            for value, ago in ((1.0, 10), (2.0, 20)):  # another table of the other seed
                _make_for_another_seed(served, table, value)
                _settle(table, ago)  # a refusal of them is kept
                for _ in range(2):
                    assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert len(logged) == 2, logged  # each version, once
        assert all("expects seed=0" in m and "once its files change" in m for m in logged), logged
    finally:
        served.close()


def test_a_refusal_of_a_table_back_on_its_served_version_is_forgotten(
    tmp_path, monkeypatch, caplog
):
    """A refusal was remembered while the refused table's files stayed; once they went back to
    the version served (a rollback: no longer stale), it stayed remembered, and a later reload
    refused for another table logged the first one as still waiting for its files to change.
    A table no longer stale holds no refusal."""
    import errno

    from tiered_store.page_checksums import sidecar_path
    from tiered_store.table_format import table_paths

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        files = [*table_paths(table), sidecar_path(table)]
        kept = [path.with_name(path.name + ".kept") for path in files]
        for path, copy in zip(files, kept, strict=True):
            os.link(path, copy)  # the version served, to roll back to
        _make_for_another_seed(served, table)
        _settle(table)  # a refusal of them is remembered
        assert served.reload_if_stale(force_check=True) == []
        assert "expects seed=0" in (served.reload_refused or "")
        for path, copy in zip(files, kept, strict=True):
            os.replace(copy, path)  # rolled back: layer 3 is on its version again
        assert served.reload_if_stale(force_check=True) == []
        assert served.reload_refused is None
        served.stores["engram_layer1"].close()  # what a refused reload may leave

        def failing_open(name, old):  # its reopen fails (a read error)
            raise TierIOError(errno.EIO, f"{name}: injected open failure")

        monkeypatch.setattr(served, "_open_checked", failing_open)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "could not reopen" in r.getMessage()]
        assert len(logged) == 1 and "engram_layer1" in logged[0], logged
        assert "engram_layer3" not in logged[0], logged
    finally:
        served.close()


def test_a_refused_version_is_not_opened_again_at_each_commit_to_another_table(
    tmp_path, monkeypatch
):
    """A refused version was remembered by the files of every table stale with it: a writer
    committing to another table changed them, and both tables' new versions were opened again
    at each of its commits (a whole store each, beside the old ones), the refused one to be
    refused again and the other with it. A refusal is remembered per table: while the refused
    table's files stay, no store is opened for a reload it is part of."""

    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _make_for_another_seed(served, table)
        _settle(table)  # written a while ago: a refusal of them is remembered
        assert served.reload_if_stale(force_check=True) == []
        opened = _counted_opens(monkeypatch)
        for step in range(2):  # a trainer commits to the other table
            with TieredStore.open({"table": {"path": str(config.table_path(1))}}) as writer:
                writer.write([step], torch.zeros(1, writer.dim))
                writer.commit()
            opened.clear()
            assert served.reload_if_stale(force_check=True) == []
            assert opened == [], step
            assert "expects seed=0" in (served.reload_refused or "")
        assert served.health["engram_layer3"].reload_failures == 3
        assert served.health["engram_layer1"].reload_failures == 2
    finally:
        served.close()


def test_a_refused_version_repaired_within_its_mtime_tick_is_opened_again(tmp_path):
    """A refused version was not opened again until its files' (inode, size, mtime) changed: a
    damaged file repaired in place within the same tick of a coarse file clock (1 to 2 s on
    some file systems) kept all three, and stayed refused for good. A refusal is remembered only
    for files that had not changed for a while when they were looked at."""
    import os

    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.table_format import create_table

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        store = served.stores["engram_layer3"]
        rows = np.ones((store.rows, store.dim), np.float32)
        layout = table_metadata(served.model.hasher, 3)
        create_table(table, rows, progress=False, overwrite=True, metadata=layout)
        header = table.read_bytes()[:128]
        at = header.index(b"(%d," % store.rows) + 1  # the .npy header's row count
        with open(table, "r+b") as f:  # damaged in place: another row count, the same size
            f.seek(at)
            f.write(b"9")
        now = time.time_ns()
        os.utime(table, ns=(now, now))  # written just now, as the check looks
        assert served.reload_if_stale(force_check=True) == []
        assert "header shape" in (served.reload_refused or "")
        before = table.stat()
        with open(table, "r+b") as f:  # repaired in place within the same clock tick
            f.seek(at)
            f.write(header[at : at + 1])
        os.utime(table, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = table.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.reload_refused is None
    finally:
        served.close()


def test_a_conversion_rerun_is_not_served_under_the_dense_weights_loaded(
    tmp_path, caplog, monkeypatch
):
    """save_tiered(overwrite=True) over the served checkpoint (a retrained model): the reload
    swapped the new tables in under the dense weights loaded at start, a model neither
    checkpoint is, and logged nothing; also midway through the rerun (one table new, one old).
    Now nothing is reopened, an error says once that a restart serves the new checkpoint, and
    /healthz says so; the rows still cached answer as before."""
    import tiered_store.engram.checkpoint as checkpoint
    from tiered_store.engram.model import EngramLM

    config = make_checkpoint(tmp_path)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    request = {"input_ids": [[5, 6, 7, 8, 9, 10, 11, 12]]}
    real, midway = checkpoint.create_table, []

    def reload_after_each_table(*args, **kwargs):
        real(*args, **kwargs)
        midway.append(server.model.reload_if_stale(force_check=True))

    monkeypatch.setattr(checkpoint, "create_table", reload_after_each_table)
    try:
        code, before = post_json(server.url + "/v1/engram", request)
        assert code == 200, before
        torch.manual_seed(123)  # the retrained model: the same config, new weights
        checkpoint.save_tiered(
            EngramLM(server.model.model.config), server.config.checkpoint_dir, overwrite=True
        )
        assert midway == [[], []]
        assert server.model.reload_if_stale(force_check=True) == []
        assert server.model.reloads == 0
        logged = [r.getMessage() for r in caplog.records if "converted anew" in r.getMessage()]
        assert len(logged) == 1 and "restart the server" in logged[0], logged
        code, after = post_json(server.url + "/v1/engram", request)
        assert code == 200 and after["logits"] == before["logits"]  # cached: the loaded model
        code, health = get_json(server.url + "/healthz")
        assert code == 503 and "dense.safetensors is not the file" in health["problems"][0]
    finally:
        server.stop()


def test_a_conversion_rerun_found_while_an_answer_outlasts_the_reload_is_logged(tmp_path, caplog):
    """A conversion rerun (the dense file replaced) found by a reload that an answer outlasted
    (a worker hung on a read): the reload was logged as postponed, "trying again once they
    end", though no later check tries anything once the dense file changed, and that a restart
    serves the new checkpoint was never logged; /healthz kept the table "postponed" for good.
    It is refused as any reload that finds it: logged once, nothing postponed."""
    import shutil

    with _an_answer_in_flight_over_a_commit(tmp_path, 0.2, _hung_answer) as (
        served,
        config,
        _,
        _,
        end,
    ):
        copy = tmp_path / "dense.copy"
        shutil.copy2(config.dense_path, copy)
        os.replace(copy, config.dense_path)  # the same bytes, another file: converted anew
        with caplog.at_level(logging.WARNING, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
            assert served.converted_anew is not None
            end()  # the answer ends: nothing is tried again
            assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "converted anew" in r.getMessage()]
        assert len(logged) == 1 and "restart the server" in logged[0], caplog.text
        assert "postponed" not in caplog.text and "postponed" not in (served.reload_refused or "")
        assert served.reloads == 0


def test_a_conversion_rerun_of_another_model_is_said_to_need_a_restart(tmp_path):
    """A rerun of another model (another hash seed) over the served checkpoint: the reload's
    layout check refused its tables before the dense file was looked at, so the server never
    said a restart was needed, and reopened (and closed) every table at every check, forever."""
    from tiered_store.engram.checkpoint import save_tiered
    from tiered_store.engram.model import EngramLM, ModelConfig

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        engram = {**CONFIG["model"]["engram"], "seed": 7}
        other = ModelConfig.from_dict({**CONFIG["model"], "engram": engram})
        save_tiered(EngramLM(other), config.checkpoint_dir, overwrite=True)
        assert served.reload_if_stale(force_check=True) == []
        assert "restart the server" in (served.converted_anew or "")
        assert served.reload_if_stale(force_check=True) == [] and served.reloads == 0
    finally:
        served.close()


def test_a_table_gone_at_reload_names_what_makes_a_checkpoints_tables(tmp_path):
    """A compacted table removed (to convert it anew) while served: its store is stale (another
    generation) and the reload's reopen said 'expected a table made by `tiered-store init`',
    a plain table the layout check refuses. It names what loading names: the checkpoint's maker."""
    import shutil

    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    with TieredStore.open({"table": {"path": str(table)}}) as writer:
        writer.write([0], torch.ones(1, writer.dim))
        writer.commit()
    compact_table(table, progress=False)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for path in table.parent.glob("engram_layer3*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        assert served.reload_if_stale(force_check=True) == []
        refused = served.reload_refused or ""
        assert "tiered-store init`" not in refused, refused
        assert f"Engram layer 3: table {table} does not exist" in refused
        assert "convert_checkpoint" in refused and "`tiered-store init-model CONFIG`" in refused
    finally:
        served.close()


def test_checksum_failures_carry_across_a_reload(tmp_path):
    """A counter that drops is a reset to Prometheus: increase() would count the failures
    before the reload again (page failures lived in the store a reload closes), also in a
    scrape between the swap of the stores and the count's carry (it read 0 there)."""
    from tiered_store import TieredStore
    from tiered_store.metrics import TieredStoreCollector

    class ScrapedOnUpdate(dict):
        """The served stores, scraped by another thread right after a reload swaps them in."""

        def update(self, *args, **kwargs) -> None:
            super().update(*args, **kwargs)
            scraper = threading.Thread(target=lambda: during.append(failures()))
            scraper.start()
            scrapers.append(scraper)
            scraper.join(timeout=1.0)  # scraped now, unless the swap holds it until it is done

    during: list[float] = []
    scrapers: list[threading.Thread] = []

    uncached = {"tiers": {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": {"io": "pread"}}}
    config = make_checkpoint(tmp_path, store=uncached)
    table = ServeConfig.from_yaml(config).table_path(3)

    def failures() -> float:
        return next(
            s.value
            for f in collector.collect()
            for s in f.samples
            if s.name == "tiered_store_checksum_failures_total"
            and s.labels["table"] == "engram_layer3"
        )

    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    server.model.stores = ScrapedOnUpdate(server.model.stores)
    collector = TieredStoreCollector(server.model.stores, server.model.health)
    try:
        with open(table, "r+b") as f:  # a flipped byte in every page of the rows
            for offset in range(4096 + 100, table.stat().st_size, 4096):
                f.seek(offset)
                byte = f.read(1)
                f.seek(offset)
                f.write(bytes([byte[0] ^ 0xFF]))
        assert server.model.verify_tables() == ["engram_layer3"]  # a failed pass
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 503
        before = failures()
        assert before == 2  # the pass and a page a lookup read
        with TieredStore.open({"table": {"path": str(table)}}) as writer:  # a new version
            writer.write([0], torch.zeros(1, writer.dim))
            writer.commit()
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        for scraper in scrapers:
            scraper.join()
        assert during == [before] and failures() == before
    finally:
        server.stop()


def test_cold_read_errors_carry_across_a_reload(tmp_path):
    """A read of a file replaced under the store is a cold read error, and the reload that
    follows within a second closed the store that counted it: the counter dropped to 0 before
    any scrape read it, and the cold read error alert never fired."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.engram.hashing import NgramHasher
    from tiered_store.metrics import TieredStoreCollector
    from tiered_store.table_format import create_table, read_manifest

    uncached = {"tiers": {"hot": {"capacity": 0}, "warm": {"capacity": 0}, "cold": {"io": "pread"}}}
    config = make_checkpoint(tmp_path, store=uncached)
    served = ServeConfig.from_yaml(config)
    table = served.table_path(3)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    collector = TieredStoreCollector(server.model.stores, server.model.health)

    def errors() -> float:
        return next(
            s.value
            for f in collector.collect()
            for s in f.samples
            if s.name == "tiered_store_cold_read_errors_total"
            and s.labels["table"] == "engram_layer3"
        )

    try:
        manifest = read_manifest(table)
        rows = np.random.default_rng(1).standard_normal((manifest.rows, manifest.dim))
        create_table(
            table,
            rows.astype(np.float32),
            progress=False,
            overwrite=True,
            metadata=table_metadata(NgramHasher(served.model.engram), 3),
        )
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 503
        assert errors() == 1
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert errors() == 1
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def _table_counts(url: str, table: str) -> dict[tuple[str, tuple], float]:
    """``table``'s counter and histogram samples on ``url``'s /metrics, by name and labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as scraped:
        text = scraped.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.type in ("counter", "histogram")
        for s in family.samples
        if s.labels.get("table") == table
    }


def test_every_counter_and_histogram_goes_on_across_a_reload(tmp_path):
    """A table reopened on a new version (a writer's commit here) exports what its closed store
    counted: every counter and histogram started again from 0, so Prometheus lost what was
    counted since its last scrape (all of it, once the new store passed the old count before
    the next scrape), though a counter resets only when the process restarts."""
    from tiered_store import TieredStore

    config = make_checkpoint(tmp_path)
    table = ServeConfig.from_yaml(config).table_path(3)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    lookups = (
        "tiered_store_lookups_total",
        (("result", "hit"), ("table", "engram_layer3"), ("tier", "hot")),
    )
    try:
        for ids in ([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]], [[7, 8, 9]]):
            assert post_json(server.url + "/v1/engram", {"input_ids": ids})[0] == 200
        before = _table_counts(server.url, "engram_layer3")
        assert before[lookups] > 0
        assert (
            before[("tiered_store_lookup_duration_seconds_count", (("table", "engram_layer3"),))]
            == 3
        )
        with TieredStore.open({"table": {"path": str(table)}}) as writer:  # a new version
            writer.write([0], torch.zeros(1, writer.dim))
            writer.commit()
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        after = _table_counts(server.url, "engram_layer3")
        dropped = {key: (n, after.get(key)) for key, n in before.items() if after.get(key, -1) < n}
        assert dropped == {}
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3, 4, 5]]})[0] == 200
        later = _table_counts(server.url, "engram_layer3")
        assert (
            later[("tiered_store_lookup_duration_seconds_count", (("table", "engram_layer3"),))]
            == 4
        )
        assert later[lookups] >= after[lookups]
        assert later[("tiered_store_reloads_total", (("table", "engram_layer3"),))] == 1
    finally:
        server.stop()


def test_a_table_made_anew_over_the_served_one_is_reopened(tmp_path):
    """A conversion rerun into the checkpoint renames a new file over the table: served after
    the reload check, as a restart would (before, every request was a 503 until one)."""
    from tiered_store.engram.checkpoint import table_metadata
    from tiered_store.engram.hashing import NgramHasher
    from tiered_store.table_format import create_table, read_manifest

    config = make_checkpoint(tmp_path)
    served = ServeConfig.from_yaml(config)
    table = served.table_path(3)
    server = start_server(config)
    server.model.reload_check_seconds = 3600.0  # checks only when the test asks
    try:
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        manifest = read_manifest(table)
        rows = np.random.default_rng(1).standard_normal((manifest.rows, manifest.dim))
        hasher = NgramHasher(served.model.engram)
        create_table(
            table,
            rows.astype(np.float32),
            progress=False,
            overwrite=True,
            metadata=table_metadata(hasher, 3),
        )
        assert server.model.stores["engram_layer3"].is_stale()
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        ids = torch.tensor([0, 7, manifest.rows - 1])
        assert torch.equal(
            server.model.stores["engram_layer3"].lookup(ids), torch.from_numpy(rows[ids]).float()
        )
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def test_connections_that_send_no_whole_request_head_are_closed_in_time(tmp_path):
    """max_connections of them held every other client to a 503 for as long as they stayed."""
    limits = {"max_connections": 4, "keep_alive_s": 30.0, "request_timeout_s": 1.0}
    server = start_server(make_checkpoint(tmp_path, server=limits))
    host, port = server.url.removeprefix("http://").split(":")
    silent = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
    try:
        silent[1].sendall(b"POST /v1/engram HTTP/1.1\r\nHost: x\r\n")  # a head never finished
        for sock in silent:  # each closed by the server about 1 s in
            assert sock.recv(1024) == b""
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        # a kept-alive connection waits for its next request as keep_alive_s says, not 1 s
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        for _ in range(2):
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() and conn.sock is not None
            time.sleep(1.5)
        conn.close()
    finally:
        for sock in silent:
            sock.close()
        server.stop()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n",  # 415, the body unread
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",  # 404
    ],
)
def test_a_client_trickling_a_body_no_one_reads_is_closed_in_time(tmp_path, config_path, head):
    """An answer given before the body was all in kept the connection alive, each body byte
    cancelling the keep-alive wait: a byte now and then held it past both limits for good."""
    path = write_config(
        tmp_path,
        checkpoint={"path": str(config_path.parent / "checkpoint")},
        server={"keep_alive_s": 30.0, "request_timeout_s": 1.0},
    )
    server = start_server(path)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert b"\r\nconnection: close\r\n" in answer.lower(), answer
            start = time.monotonic()
            with pytest.raises(OSError):  # the server closed: a send is reset
                while time.monotonic() - start < 4:
                    sock.sendall(b"x")
                    time.sleep(0.1)
            assert time.monotonic() - start < 3  # request_timeout_s after the answer, at most
    finally:
        server.stop()


def test_a_server_at_its_connection_limit_answers_503_in_json_naming_the_limit(tmp_path):
    """Over server.max_connections: a JSON 503 naming the setting, counted (uvicorn's was plain
    text, and uncounted); served again once connections close. The metrics listener answers
    meanwhile (it shared the endpoint's limit: a flood of connections hid the server's state)."""
    limits = {"max_connections": 3, "keep_alive_s": 30.0, "request_timeout_s": 20.0}
    server = start_server(make_checkpoint(tmp_path, server=limits), metrics=True)
    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
    try:
        deadline = time.monotonic() + 10
        while len(server._uvicorn.server_state.connections) < 3:  # the server accepted them
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/stats")  # the fourth connection: past the limit
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 503 and response.getheader("Content-Type") == "application/json"
        assert answer == {
            "error": "server busy: 4 connections open, the limit (server.max_connections) is 3; "
            "retry later"
        }
        assert response.getheader("Retry-After") == "1"
        conn.close()
        with urllib.request.urlopen(server.metrics_url, timeout=30) as scraped:
            assert scraped.status == 200 and b"tiered_store_lookups_total" in scraped.read()
    finally:
        for sock in idle:
            sock.close()
    try:
        deadline = time.monotonic() + 10
        while get_json(server.url + "/healthz")[0] != 200:  # the server saw them close
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as scraped:
            counted = [
                (s.labels["handler"], s.value)
                for family in text_string_to_metric_families(scraped.read().decode())
                for s in family.samples
                if s.name == "tiered_store_http_requests_total" and s.labels["code"] == "503"
            ]
        assert ("/stats", 1.0) in counted  # uvicorn's own 503 was never counted
    finally:
        server.stop()


def test_a_server_takes_as_many_connections_as_max_connections(tmp_path):
    """A request was refused once max_connections were open, its own counted (uvicorn's test):
    max_connections 1, a valid value, answered every request 503 "1 connections open, the limit
    is 1", and N took N - 1 clients. The limit's own connection is served now; one past it 503."""
    server = start_server(make_checkpoint(tmp_path, server={"max_connections": 1}))
    try:
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def _kept_get(conn: http.client.HTTPConnection, path: str = "/healthz") -> int:
    """The status of a GET on a kept connection (its answer read whole)."""
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


def _until_accepted(server: InferenceServer, count: int) -> None:
    """Wait until the server holds ``count`` open connections (both listeners together)."""
    deadline = time.monotonic() + 10
    while len(server._uvicorn.server_state.connections) < count:
        assert time.monotonic() < deadline, "the server did not accept the connections"
        time.sleep(0.01)


def test_a_connection_to_the_metrics_listener_takes_no_place_of_the_endpoints(tmp_path):
    """The metrics listener's connections counted towards server.max_connections: with a
    scraper's keep-alive connection open, max_connections 2 served one client, the second
    refused 503 "3 connections open"."""
    server = start_server(make_checkpoint(tmp_path, server={"max_connections": 2}), metrics=True)
    host, port = server.url.removeprefix("http://").split(":")
    metrics_port = int(server.metrics_url.split(":")[-1].split("/")[0])
    scraper = http.client.HTTPConnection(host, metrics_port, timeout=10)
    clients = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(2)]
    try:
        assert _kept_get(scraper, "/metrics") == 200  # a scraper keeps its connection
        for conn in clients:
            conn.connect()
        _until_accepted(server, 3)
        assert [_kept_get(conn) for conn in clients] == [200, 200]
    finally:
        for conn in (scraper, *clients):
            conn.close()
        server.stop()


def test_a_scrape_in_flight_takes_no_place_of_the_endpoints_requests(tmp_path):
    """The metrics listener's requests in flight counted towards server.max_connections (its
    connections did not): with a scrape whose answer waits for a scraper that reads slowly,
    max_connections 1 refused the endpoint's only client 503."""
    server = start_server(make_checkpoint(tmp_path, server={"max_connections": 1}), metrics=True)
    host, port = server.url.removeprefix("http://").split(":")
    metrics_port = int(server.metrics_url.split(":")[-1].split("/")[0])
    scraper = socket.socket()
    scraper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing meanwhile
    client = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        scraper.connect((host, metrics_port))
        scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)  # pipelined
        deadline = time.monotonic() + 60
        while not any(c.flow.write_paused for c in server._uvicorn.server_state.connections):
            assert time.monotonic() < deadline, "the scrapes' answers never filled the buffers"
            time.sleep(0.01)  # now a scrape waits in its answer's write: in flight for good
        assert _kept_get(client) == 200
    finally:
        scraper.close()
        client.close()
        server.stop()


def test_the_connection_past_max_connections_is_refused_not_an_older_one(tmp_path):
    """With one connection past server.max_connections open, whichever connection asked first
    was refused 503 and closed: a client kept alive for long lost its connection to one that
    had just opened (and maybe sent nothing). The connections opened first are served; the one
    past the limit is refused, and served once an older one closed."""
    server = start_server(make_checkpoint(tmp_path, server={"max_connections": 2}))
    host, port = server.url.removeprefix("http://").split(":")
    older = [http.client.HTTPConnection(host, int(port), timeout=10) for _ in range(2)]
    newer = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        assert [_kept_get(conn) for conn in older] == [200, 200]
        newer.connect()
        _until_accepted(server, 3)
        assert [_kept_get(conn) for conn in older] == [200, 200]  # refused 503 before
        assert _kept_get(newer) == 503
        older[0].close()
        deadline = time.monotonic() + 10
        while _kept_get(newer) != 200:  # closed by its 503: opened anew once the server saw
            assert time.monotonic() < deadline  # the older one go
            newer.close()
            time.sleep(0.05)
        assert _kept_get(older[1]) == 200
    finally:
        for conn in (*older, newer):
            conn.close()
        server.stop()


def test_a_websocket_upgrade_is_answered_as_plain_http(tmp_path):
    """With a WebSocket library installed (websockets or wsproto: uvicorn's ws="auto"), an
    upgrade request was handed to uvicorn's WebSocket protocol, outside this server's (no head
    deadline, not counted, not marked busy), and the app, which has no WebSocket endpoint,
    left its handshake undone: a plain-text 500 and an ERROR in the log. The server takes no
    upgrade now: such a request is served as the HTTP request it is. (Without such a library
    installed this passes either way.)"""
    server = start_server(make_checkpoint(tmp_path))
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    try:
        status, _, body = raw_exchange(server.url, upgrade, timeout=10)
        assert (status, json.loads(body)) == (200, {"status": "ok"}), body
    finally:
        server.stop()


def test_a_request_that_gets_no_compute_turn_in_time_is_told_when_to_retry(tmp_path):
    """The compute-busy 503 (no free turn within request_timeout_s) had no Retry-After, unlike
    the connection-limit 503: a client could not tell when to come back."""
    import threading

    limits = {"max_concurrent": 1, "request_timeout_s": 1.0}
    server = start_server(make_checkpoint(tmp_path, server=limits))
    computing, go_on = threading.Event(), threading.Event()
    answer = server.model.answer

    def held_answer(*args, **kwargs):
        computing.set()
        go_on.wait(30)  # the first request holds the only compute turn
        return answer(*args, **kwargs)

    server.model.answer = held_answer
    first = threading.Thread(
        target=lambda: post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})
    )
    try:
        first.start()
        assert computing.wait(30)
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/engram", json.dumps({"input_ids": [[4, 5, 6]]}))
        response = conn.getresponse()
        answer_doc = json.loads(response.read())
        conn.close()
        assert response.status == 503, answer_doc
        assert answer_doc == {"error": "server busy: no free compute slot in time; retry later"}
        assert response.getheader("Retry-After") == "1"
    finally:
        go_on.set()
        first.join(30)
        server.stop()


def _duration_bounds(url: str) -> list[float]:
    """The finite bucket bounds of the request-duration histogram ``url`` exports."""
    with urllib.request.urlopen(url, timeout=30) as scraped:
        families = text_string_to_metric_families(scraped.read().decode())
        bounds = {
            float(s.labels["le"])
            for family in families
            for s in family.samples
            if s.name == "tiered_store_http_request_duration_seconds_bucket"
        }
    return sorted(bounds - {float("inf")})


def test_request_duration_buckets_cover_a_long_request_timeout(tmp_path, server):
    """The request-duration buckets stopped at 60 s whatever server.request_timeout_s was: at
    300 s a request may wait 300 s for its body and 300 s for a turn, and every request slower
    than 60 s landed in +Inf. The buckets now reach 2 x request_timeout_s; a config whose
    requests fit in 60 s (the default) keeps the buckets dashboards were made for."""
    from tiered_store.latency import DEFAULT_BUCKETS

    assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    assert _duration_bounds(server.url + "/metrics") == list(DEFAULT_BUCKETS)
    slow = start_server(make_checkpoint(tmp_path, server={"request_timeout_s": 300.0}))
    try:
        assert post_json(slow.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        bounds = _duration_bounds(slow.url + "/metrics")
    finally:
        slow.stop()
    assert bounds == [*DEFAULT_BUCKETS, 120.0, 300.0, 600.0]


def test_metrics_on_the_same_port_of_another_address_leave_the_endpoint_alone(tmp_path):
    """A public endpoint with metrics on a private interface, same port: each listener serves
    its own paths (the metrics one was told apart by its port alone: every request a 404)."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path)).with_overrides(
        address=f"127.0.0.1:{port}", metrics_address=f"127.0.0.2:{port}"
    )
    server = InferenceServer(config)
    server.start()
    try:
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        assert get_json(server.url + "/healthz")[0] == 200
        assert server.metrics_url == f"http://127.0.0.2:{port}/metrics"
        with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
            assert b"tiered_store_lookups_total" in response.read()
        status, answer = get_json(f"http://127.0.0.2:{port}/healthz")
        assert status == 404 and "on the metrics listener" in answer["error"]
    finally:
        server.stop()


# -- the process: SIGTERM drains ----------------------------------------------------------------------


def test_a_killed_recording_server_leaves_its_requests_ids_to_recover(tmp_path):
    """A lightly loaded server recording a trace held its requests' ids in its 4Mi-id chunk, so
    SIGKILL lost them all (the temporary lacked even its header). A request ends the chunk once
    the last one is server.record_flush_s old (0 here: every request, so no timing decides what
    the kill leaves; the idle flush has its own test): it is in the file, recoverable."""
    from tiered_store.cli import main
    from tiered_store.engram.hashing import NgramHasher

    config_path = make_checkpoint(tmp_path, server={"record_flush_s": 0})
    trace = tmp_path / "killed.trace"
    requests = [[[5, 6, 7, 8]], [[9, 10, 11]], [[7, 8, 9, 10]], [[1, 2], [3, 4]]]
    with ServeProcess(config_path, "--record-trace", str(trace), metrics=False) as proc:
        for input_ids in requests:
            assert post_json(proc.url + "/v1/engram", {"input_ids": input_ids})[0] == 200
        proc.proc.kill()  # SIGKILL: no drain, no close
        assert proc.proc.wait(30) == -9
    (leftover,) = tmp_path.glob(".killed.trace.*.tmp")
    assert not trace.exists()
    assert main(["recover-trace", str(leftover), "--quiet"]) == 0
    hasher = NgramHasher(ServeConfig.from_yaml(config_path).model.engram)
    recorded = {}
    with TraceReader(trace) as reader:
        assert reader.tables == TABLES and reader.n_batches == 2 * len(requests)
        for layer, name in zip((1, 3), TABLES, strict=True):
            want = [hasher.row_ids(np.array(ids))[layer].reshape(-1) for ids in requests]
            got = np.concatenate(list(reader.ids(name)))
            np.testing.assert_array_equal(got, np.concatenate(want))
            recorded[name] = got.size
    # the store configs replay needs were written when the recording started, not at close
    store_yaml = tmp_path / "killed.trace.engram_layer1.store.yaml"
    out = tmp_path / "replay-out"
    args = ["replay", str(store_yaml), str(trace), "--table", "engram_layer1", "--no-bounds"]
    assert main([*args, "--sweep", "", "--out", str(out)]) == 0
    hot = json.loads((out / "replay.json").read_text())["results"][0]["tiers"]["hot"]
    assert hot["lookups"] == recorded["engram_layer1"] > 0  # the hot tier sees every id


def test_a_killed_recording_server_idle_since_its_last_request_leaves_its_ids(tmp_path):
    """Only a request ended an old chunk, so the requests before an idle spell stayed in the
    server's buffer however long it idled, and a kill then lost them. A thread ends the chunk
    once it is server.record_flush_s old, requests or not."""
    from tiered_store.trace_recovery import recover_trace

    config_path = make_checkpoint(tmp_path, server={"record_flush_s": 0.2})
    trace = tmp_path / "idle.trace"
    requests = [[[5, 6, 7, 8]], [[9, 10, 11]]]
    with ServeProcess(config_path, "--record-trace", str(trace), metrics=False) as proc:
        time.sleep(0.3)  # the first request's chunk ends on its arrival; the second's does not
        for input_ids in requests:
            assert post_json(proc.url + "/v1/engram", {"input_ids": input_ids})[0] == 200
        time.sleep(1.5)  # idle, several record_flush_s long
        proc.proc.kill()
        assert proc.proc.wait(30) == -9
    (leftover,) = tmp_path.glob(".idle.trace.*.tmp")
    recover_trace(leftover)
    with TraceReader(trace) as reader:
        assert reader.n_batches == 2 * len(requests)


def test_the_idle_flush_thread_writes_a_chunk_once_it_is_record_flush_s_old(tmp_path):
    """The idle flush woke every server.record_flush_s whatever the chunk's age: requests
    buffered just after a request ended a chunk waited for the second wake-up, and a kill before
    it lost up to twice record_flush_s of them. It now wakes when the chunk is due."""
    import shutil
    import threading

    from tiered_store.trace_recovery import recover_trace

    flush_s = 3.0
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"record_flush_s": flush_s}))
    served = ServedModel(config, trace=tmp_path / "t.trace")
    stop = threading.Event()
    try:
        time.sleep(flush_s + 0.2)  # the next request ends a chunk itself
        start = time.monotonic()
        served.watch_trace(stop)  # wakes at start + flush_s, then 2 x flush_s
        body = json.dumps({"input_ids": [[7, 8, 9]]}).encode()
        for at in (0.5, 0.6):  # the first ends its chunk; the second waits in the buffer
            time.sleep(max(0.0, start + at - time.monotonic()))
            served.answer(parse_request(body, config.server, served))
        time.sleep(max(0.0, start + flush_s + 1.6 - time.monotonic()))  # its chunk is due
        (leftover,) = tmp_path.glob(".t.trace.*.tmp")
        copy = tmp_path / "copy" / leftover.name  # what a kill now would leave
        copy.parent.mkdir()
        shutil.copy(leftover, copy)
    finally:
        stop.set()
        served.close()
    recover_trace(copy)
    with TraceReader(copy.parent / "t.trace") as reader:
        assert reader.n_batches == 2 * len(TABLES)


_UNWRITABLE_CHUNK = """
import json, logging, resource, sys, threading, time
from pathlib import Path
from tiered_store.serve import ServeConfig, ServedModel, parse_request

config = ServeConfig.from_yaml(sys.argv[1])
served = ServedModel(config, trace=sys.argv[2])
failures = []
handler = logging.Handler()
handler.emit = lambda record: failures.append(record.getMessage())
logging.getLogger("tiered_store.serve").addHandler(handler)
(temporary,) = Path(sys.argv[2]).parent.glob(".t.trace.*.tmp")
size = temporary.stat().st_size  # its header: no chunk can be written (as on a full disk)
resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
served.answer(parse_request(b'{"input_ids": [[7, 8, 9]]}', config.server, served))
# its chunk failed (the request answered all the same): the thread tries again every 50 ms
stop = threading.Event()
served.watch_trace(stop)
time.sleep(1.0)
stop.set()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
served.close()
print(json.dumps([m for m in failures if "trace" in m]))
"""


def test_a_trace_chunk_that_cannot_be_written_is_logged_once_by_the_idle_flush(tmp_path):
    """A chunk the disk refused (full: here a file size limit) was logged with a traceback at
    every wake-up of the idle flush thread until it could be written: 20 a second at
    server.record_flush_s 0, a log filling the disk that was full. It is logged once now (by
    the request that failed first: one spell, shared with the thread)."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    config_path = make_checkpoint(tmp_path, server={"record_flush_s": 0})
    done = subprocess.run(
        [sys.executable, "-c", _UNWRITABLE_CHUNK, str(config_path), str(tmp_path / "t.trace")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (logged,) = json.loads(done.stdout.splitlines()[-1])
    assert logged.startswith(f"recording into trace {tmp_path / 't.trace'} failed: "), logged


def test_a_recording_server_that_fails_its_start_leaves_no_trace_temporary(tmp_path, config_path):
    """The trace opens before a server's last start checks; one failing left the trace's
    temporary (a killed recording's look, with nothing recorded) beside the store configs."""
    trace = tmp_path / "failed.trace"

    def refuse(model):
        assert (tmp_path / "failed.trace.engram_layer3.store.yaml").is_file()
        raise ConfigError("a rank's check failed")

    with pytest.raises(ConfigError, match="a rank's check failed"):
        ServedModel(ServeConfig.from_yaml(config_path), trace=trace, before_start=refuse)
    assert not list(tmp_path.glob(".failed.trace.*")) and not trace.exists()


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path, config_path):
    trace = tmp_path / "sigterm.trace"
    with ServeProcess(config_path, "--record-trace", str(trace), metrics=False) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        body = json.dumps({"input_ids": [[7, 8, 9, 10]]}).encode()
        sock = socket.create_connection((host, int(port)), timeout=30)
        head = (
            f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        sock.sendall(head + body[:10])  # the request is in flight: the server waits for the rest
        deadline = time.monotonic() + 20
        while get_json(proc.url + "/stats")[1]["server"]["in_flight"] < 2:  # it, and this /stats
            assert time.monotonic() < deadline, "the in-flight request never started"
            time.sleep(0.05)
        proc.proc.terminate()  # SIGTERM
        deadline = time.monotonic() + 20
        while True:  # it stops accepting new connections
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                break
            assert time.monotonic() < deadline, "still accepting after SIGTERM"
            time.sleep(0.05)
        assert proc.proc.poll() is None  # still draining
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["shape"] == [1, 4]
        assert proc.proc.wait(30) == 0, proc.log()
        assert "SIGTERM: draining" in proc.log() and "Traceback" not in proc.log()
    with TraceReader(trace) as reader:  # closed properly: the in-flight request is in it
        assert reader.n_batches == 2 and reader.tables == TABLES


@pytest.mark.slow
def test_a_serve_process_lets_the_server_drain_before_it_kills_it(tmp_path):
    """ServeProcess.stop() killed the server 30 s after its SIGTERM, while the server's own
    drain may take 2 x server.request_timeout_s (60 s by default), and its close more: a request
    in flight was cut off, the trace unclosed, the exit status -9. It now waits as long as the
    server said its stop may take (its 'listening' line's stop_within_s)."""
    config_path = make_checkpoint(tmp_path, server={"request_timeout_s": 32.0})
    with ServeProcess(config_path, metrics=False) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=120)
        sock.sendall(b"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        deadline = time.monotonic() + 20
        while get_json(proc.url + "/stats")[1]["server"]["in_flight"] < 2:  # it, and this /stats
            assert time.monotonic() < deadline, "the in-flight request never started"
            time.sleep(0.05)
        answers: list[bytes] = []

        def read_then_close() -> None:
            """The stalled request's answer (its 408, 32 s in), then the connection closed."""
            with sock:
                answers.append(sock.recv(65536))

        reader = threading.Thread(target=read_then_close)
        reader.start()
        assert proc.stop() == 0, proc.log()  # killed (-9) at 30 s before
        reader.join(30)
        assert answers and answers[0].startswith(b"HTTP/1.1 408"), answers


def test_a_request_outlasting_the_drain_gets_a_json_503_and_its_lookups_finish_first(
    tmp_path, caplog
):
    """A request still computing when the drain (2 x request_timeout_s) ends: uvicorn cancelled
    it, logged a CancelledError traceback and sent a plain-text 500; and the tables were closed
    under its worker, whose next lookup was logged and counted as a failed one (/healthz, metrics).
    It now gets a JSON 503, and the tables close once its worker is done (within
    request_timeout_s more: a read that outlasts the drain by less)."""
    import threading

    server = start_server(make_checkpoint(tmp_path, server={"request_timeout_s": 1.0}))
    store = server.model.stores["engram_layer3"]
    lookup, reading, done = store.lookup, threading.Event(), threading.Event()

    def slow_read(*args, **kwargs):  # a cold read outlasting the drain (2 s), not the close (3 s)
        reading.set()
        time.sleep(2.5)
        try:
            return lookup(*args, **kwargs)
        finally:
            done.set()

    store.lookup = slow_read
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [[7, 8, 9]]}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        _send_infer(sock, body)
        assert reading.wait(30)
        server.stop()
        assert done.is_set()  # the tables closed after its lookups, not under them
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, answer[:300]
    assert "drain" in json.loads(payload)["error"]
    assert store.closed and [h.lookup_failures for h in server.model.health.values()] == [0, 0]
    assert "Traceback" not in caplog.text and "lookup failed" not in caplog.text, caplog.text


def _send_infer(sock: socket.socket, body: bytes) -> None:
    """An inference request on a raw socket (its answer is read as the test needs)."""
    head = f"POST /v1/engram HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)


_HUNG_READ_HOOK = """
import os, time
from tiered_store.store import TieredStore

_lookup = TieredStore.lookup
_held = []


def _hung_read(self, *args, **kwargs):  # the first cold read of engram_layer3 hangs until released
    if "engram_layer3" in str(self.config.table.path) and not _held:
        _held.append(1)
        open(os.environ["STUCK_MARK"], "w").close()
        while not os.path.exists(os.environ["STUCK_RELEASE"]):  # never made: a dead disk
            time.sleep(0.05)
    return _lookup(self, *args, **kwargs)


TieredStore.lookup = _hung_read
"""


def _hung_read_env(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """A server environment whose first lookup of engram_layer3 hangs until the release file is
    made (for good without it): the environment, the file the lookup makes as it hangs, the
    release file."""
    hook, mark, release = tmp_path / "hook", tmp_path / "stuck", tmp_path / "release"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HUNG_READ_HOOK)  # imported by the server at start
    env = {"PYTHONPATH": str(hook), "STUCK_MARK": str(mark), "STUCK_RELEASE": str(release)}
    return env, mark, release


def _send_until_hung(sock: socket.socket, mark: Path) -> None:
    """An inference request on ``sock``, once its lookup hangs (``mark`` made)."""
    _send_infer(sock, json.dumps({"input_ids": [[7, 8, 9]]}).encode())
    deadline = time.monotonic() + 30
    while not mark.exists():
        assert time.monotonic() < deadline, "the lookup never started"
        time.sleep(0.05)


def test_sigterm_exits_while_a_lookup_hangs_for_good(tmp_path):
    """A worker hung in a lookup for good (a cold read on a dead disk or NFS): SIGTERM never
    ended the process, close() waiting for that answer without end. It now waits
    request_timeout_s after the drain, logs how many answers still ran, closes and exits 0."""
    env, mark, _ = _hung_read_env(tmp_path)
    config = make_checkpoint(tmp_path, server={"request_timeout_s": 0.5})
    with ServeProcess(config, metrics=False, env=env) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            _send_until_hung(sock, mark)
            proc.proc.terminate()  # SIGTERM: drain 1 s, then at most 0.5 s for the hung worker
            try:
                status = proc.proc.wait(60)  # 1.5 s of drain and close, then the exit (slow
            except Exception:  # on a busy machine); the hung lookup held it for good before
                proc.proc.kill()
                pytest.fail(f"still running 60 s after SIGTERM; its log:\n{proc.log()[-2000:]}")
            answer = sock.recv(65536)
        assert status == 0, proc.log()
        assert answer.startswith(b"HTTP/1.1 503") and b"drain" in answer, answer[:300]
        log = proc.log()
        assert "closing the tables with 1 answer(s) still running" in log, log
        assert "Traceback" not in log, log


_HUNG_COLD_READ_HOOK = """
import os, time
from tiered_store.cold_table import ColdTable

_read_sorted = ColdTable._read_sorted
_held = []


def _hung_read(self, *args, **kwargs):  # inside the read's call: the store's close waits for it
    if "engram_layer3" in str(self.path) and not _held:
        _held.append(1)
        open(os.environ["STUCK_MARK"], "w").close()
        while not os.path.exists(os.environ["STUCK_RELEASE"]):  # never made: a dead disk
            time.sleep(0.05)
    return _read_sorted(self, *args, **kwargs)


ColdTable._read_sorted = _hung_read
"""


def test_sigterm_stops_within_stop_within_s_while_a_cold_read_hangs_for_good(tmp_path):
    """A cold read hung for good inside the store (a dead disk; the store's close waits for the
    reads under way): the stop's close of that store waited without end, past the 'listening'
    line's stop_within_s, and ServeProcess.stop() killed the server (-9: no warm-restart save
    of the other tables, the trace not closed). The stop passes what is left of that bound down
    to the stores' close: the hung store is left to close under its read, the others close,
    and the server exits 0."""
    env, mark, _ = _hung_read_env(tmp_path)
    (Path(env["PYTHONPATH"]) / "sitecustomize.py").write_text(_HUNG_COLD_READ_HOOK)
    config = make_checkpoint(tmp_path, server={"request_timeout_s": 0.5})
    trace = tmp_path / "served.trace"
    with ServeProcess(config, "--record-trace", str(trace), metrics=False, env=env) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            _send_until_hung(sock, mark)
            status = proc.stop()  # kills once stop_within_s (11.5 s here) and 10 s more passed
        log = proc.log()
        assert status == 0, log[-3000:]
        assert "still under way after" in log and "engram_layer3.npy" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    with TraceReader(trace) as reader:  # closed
        assert reader.tables == TABLES


def test_a_damaged_version_pointer_keeps_the_served_version_and_healthz_says_so(tmp_path):
    """A version pointer that is not JSON: every version check raised, the watch thread logged a
    traceback every second, a request that made the check got a 503, and /healthz said ok. A
    pointer naming a missing file was logged, /healthz said nothing. Both now keep the version
    open now served (200), are logged once and listed in /healthz's warnings, and a later good
    version is opened (the warning gone)."""
    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table
    from tiered_store.delta.table_versions import pointer_path, publish_version

    config = make_checkpoint(tmp_path)
    table = ServeConfig.from_yaml(config).table_path(3)

    def new_version(value: float) -> int:
        with TieredStore.open({"table": {"path": str(table)}}) as writer:
            writer.write([0], torch.full((1, writer.dim), value))
            writer.commit()
        return compact_table(table, progress=False).new_generation

    with ServeProcess(config, metrics=False) as proc:

        def served_file() -> str:
            return get_json(proc.url + "/stats")[1]["geometry"]["engram_layer3"]["file"]

        def wait_for(generation: int) -> None:
            deadline = time.monotonic() + 30
            while served_file() != f"engram_layer3.g{generation}.npy":
                assert time.monotonic() < deadline, f"generation {generation} never served"
                time.sleep(0.1)

        served = new_version(1.0)
        wait_for(served)
        damages = {
            "is unreadable": lambda: pointer_path(table).write_text("{not json"),
            "names generation 9, engram_layer3.g9.npy, which does not exist": lambda: (
                publish_version(table, 9)
            ),
        }
        for said, damage in damages.items():
            damage()
            end = time.monotonic() + 3  # three version checks, by requests and by the watch
            while time.monotonic() < end:
                status, doc = post_json(proc.url + "/v1/engram", {"input_ids": [[7, 8, 9]]})
                assert status == 200, doc
            status, health = get_json(proc.url + "/healthz")
            assert status == 200 and health["status"] == "ok", health
            [warning] = health["warnings"]
            assert (
                warning.startswith("not reopened on a new version: engram_layer3 (")
                and said in warning
            )
            assert str(tmp_path) not in warning
            assert served_file() == f"engram_layer3.g{served}.npy"
            assert proc.log().count(said) == 1, proc.log()  # logged once, not at every check
            publish_version(table, served)  # repaired; then a new version comes
            served = new_version(2.0)
            wait_for(served)
            assert get_json(proc.url + "/healthz") == (200, {"status": "ok"})
        log = proc.log()
        assert proc.stop() == 0, log
        assert "Traceback" not in log and log.count("could not reopen engram_layer3") == 2, log


def test_a_reload_gives_up_on_a_hung_answer_and_requests_go_on(tmp_path):
    """A new table version while a worker hung in a lookup: the reload waited for that answer
    without end, holding every new request back (the server stopped answering) and close()
    (SIGTERM) behind it. It now waits request_timeout_s, logs it, requests go on over the
    version open now, and the new version is opened once the hung answer ends."""
    from tiered_store import TieredStore
    from tiered_store.delta.compaction import compact_table

    env, mark, release = _hung_read_env(tmp_path)
    config = make_checkpoint(tmp_path, server={"request_timeout_s": 1.0})
    table = ServeConfig.from_yaml(config).table_path(1)
    with ServeProcess(config, metrics=False, env=env) as proc:
        files = lambda: get_json(proc.url + "/stats")[1]["geometry"]["engram_layer1"]["file"]  # noqa: E731
        host, port = proc.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            _send_until_hung(sock, mark)
            with TieredStore.open({"table": {"path": str(table)}}) as writer:
                writer.write([0], torch.full((1, writer.dim), 2.0))
                writer.commit()
            assert compact_table(table, progress=False).new_generation == 1
            deadline = time.monotonic() + 30
            while "postponed reopening engram_layer1" not in proc.log():
                assert time.monotonic() < deadline, f"no reload gave up: {proc.log()[-2000:]}"
                time.sleep(0.1)
            for _ in range(3):  # answered at once, over the version open now
                started = time.monotonic()
                status, _ = post_json(proc.url + "/v1/engram", {"input_ids": [[1, 2, 3]]}, 10)
                assert status == 200 and time.monotonic() - started < 1.0
            assert files() == "engram_layer1.npy"
            release.touch()
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 30
        while files() != "engram_layer1.g1.npy":  # tried again once the hung answer ended
            assert time.monotonic() < deadline, "the new version was never opened"
            time.sleep(0.1)
        log = proc.log()
        assert proc.stop() == 0, log
        assert "Traceback" not in log, log


def test_init_model_writes_a_checkpoint_that_serve_opens(tmp_path, capsys):
    from tiered_store.cli import main

    config = write_config(tmp_path)
    assert main(["init-model", str(config)]) == 0
    assert "dense weights and model config" in capsys.readouterr().out
    assert main(["init-model", str(config)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    served = ServedModel(ServeConfig.from_yaml(config))
    try:
        assert list(served.stores) == TABLES
    finally:
        served.close()


def test_init_model_refuses_a_model_too_large_for_the_memory(tmp_path, capsys):
    """It was the allocator's traceback (DefaultCPUAllocator: can't allocate memory)."""
    from tiered_store.cli import main

    engram = {**CONFIG["model"]["engram"], "engram_vocab_size": [50_000_000_000, 3001]}
    config = write_config(tmp_path, model={"engram": engram})
    assert main(["init-model", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "tiered-store init-model: error: engram.engram_vocab_size [50000000000, 3001]: the model "
        "needs 11.6 TiB of host RAM (Engram tables 11.6 TiB, dense weights "
    )
    assert "is available; expected a smaller model" in err
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.gpu
def test_a_cuda_hot_tier_gives_the_cpu_answer(config_path, tmp_path):
    """The model moves to the hot tier's device; answers equal the CPU server's up to float
    rounding (the next-token ids exactly)."""
    body = json.dumps({"input_ids": [[5, 17, 900, 17, 5, 12]], "top_k": 5}).encode()
    answers = []
    for device in ("cpu", "cuda"):
        path = write_config(
            tmp_path / device,
            checkpoint={"path": str(config_path.parent / "checkpoint")},
            store={
                "tiers": {**CONFIG["store"]["tiers"], "hot": {"capacity": "3%", "device": device}}
            },
        )
        served = ServedModel(ServeConfig.from_yaml(path))
        try:
            assert served.device.type == device
            answers.append(served.answer(parse_request(body, served.config.server, served)))
        finally:
            served.close()
    cpu, cuda = answers
    assert cuda["next_token_ids"] == cpu["next_token_ids"]
    np.testing.assert_allclose(cuda["next_token_logprobs"], cpu["next_token_logprobs"], rtol=1e-4)


def test_the_answers_logit_summary_does_not_depend_on_the_thread_count():
    from tiered_store.serve.served_model import tensor_summary

    logits = torch.randn(12, 129_280, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        summaries = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            summaries.append(tensor_summary(logits))
    finally:
        torch.set_num_threads(threads)
    assert summaries[0] == summaries[1] == summaries[2]
    assert summaries[0]["mean"] == pytest.approx(float(logits.double().mean()), abs=1e-12)
    assert summaries[0]["rms"] == pytest.approx(float(logits.double().square().mean().sqrt()))


def test_an_idle_server_opens_a_new_table_version_without_a_request(tmp_path):
    """A trainer commits while no request comes (only scrapes): the server reopens the table on
    the new commit by itself (it checked only when a request came, and its pinned commit kept
    every page the trainer freed: the delta grew with each commit)."""
    from tiered_store import TieredStore

    config = make_checkpoint(tmp_path)
    table = ServeConfig.from_yaml(config).table_path(3)
    server = start_server(config)
    try:
        before = server.model.stores["engram_layer3"]
        with TieredStore.open({"table": {"path": str(table)}}) as writer:
            writer.write([0], torch.full((1, writer.dim), 2.0))
            writer.commit()
        deadline = time.monotonic() + 30
        model = server.model  # the swap serves the new store, then closes the old and counts it
        while model.stores["engram_layer3"] is before or not before.closed or model.reloads < 1:
            assert time.monotonic() < deadline, "the idle server never reopened the table"
            assert get_json(server.url + "/healthz")[0] == 200
            time.sleep(0.1)
        assert server.model.stores["engram_layer3"].lookup([0])[0].tolist() == [2.0] * before.dim
        assert before.closed and server.model.reloads == 1
    finally:
        server.stop()


def test_a_closed_model_never_reopens_and_a_closed_store_answers_503(tmp_path):
    """A version check after ServedModel.close() reopened every table (a closed model served
    again, its new stores left open); a table whose store is closed answered 500 with /healthz
    ok: it is now a counted 503 ("closed")."""
    from tiered_store import TieredStore
    from tiered_store.serve.guarded_table import GuardedTable, TableUnavailableError
    from tiered_store.serve.served_model import ServedModel

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    store = served.stores["engram_layer3"]
    with TieredStore(store.config) as writer:  # a new commit: the table is stale
        writer.write([0], torch.ones(1, writer.dim))
        writer.commit()
    served.close()
    assert served.reload_if_stale(force_check=True) == [] and store.closed
    guarded = GuardedTable(store, "engram_layer3", served.health["engram_layer3"])
    with pytest.raises(TableUnavailableError, match="store is closed until a reload") as caught:
        guarded.lookup(torch.tensor([1, 2]))
    assert caught.value.reason == "closed"
    assert served.health["engram_layer3"].lookup_failures == 1


def test_a_closed_tables_reopen_failure_is_logged_when_the_dense_file_changed(
    tmp_path, monkeypatch, caplog
):
    """A refused reload whose dense file changed (a conversion rerun) logged that a restart
    serves the new checkpoint, but not why a table it left closed failed to reopen alone (a
    read error, say: what a restart would meet too), which no later check logs (none reopens a
    table once the dense file changed). That failure is logged too, naming the table."""
    import errno
    import shutil

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(1))  # layer 1 stale too
        copy = tmp_path / "dense.copy"
        shutil.copy2(config.dense_path, copy)
        os.replace(copy, config.dense_path)  # the same bytes, another file: converted anew
        real = served._open_checked

        def failing_open(name, old):  # layer 3's reopen fails (a read error)
            if name == "engram_layer3":
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", failing_open)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        assert served.converted_anew is not None
        logged = [
            r.getMessage() for r in caplog.records if "injected open failure" in r.getMessage()
        ]
        assert len(logged) == 1 and "engram_layer3" in logged[0], caplog.text
    finally:
        served.close()


def test_metrics_say_which_tables_are_closed_until_a_reload(config_path):
    """A table whose store a reload closed (its new version refused, it answers 503) kept
    exporting the closed store's gauges as if it served: nothing in /metrics told it apart from
    an open one. tiered_store_table_open is 0 for it, and 1 again once it is reopened."""

    def table_open() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as scraped:
            text = scraped.read().decode()
        return {
            s.labels["table"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "tiered_store_table_open"
        }

    server = start_server(config_path)
    try:
        server.model.reload_check_seconds = 3600.0  # the test reopens it, not the watch
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 1}
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        server.model.stores["engram_layer3"].close()  # what a refused reload may leave
        # its rows just read (held by its tiers) too: a closed store serves none
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 503
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 0}
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert table_open() == {"engram_layer1": 1, "engram_layer3": 1}
    finally:
        server.stop()


def test_a_table_closed_until_a_reload_answers_503_saying_when_to_retry(config_path):
    """A table whose store a reload closed (its new version not open yet) answered 503 with no
    Retry-After, though the version watch tries again every second and the next request may be
    served: now Retry-After: 1, as the other passing 503s (busy, no compute turn)."""
    server = start_server(config_path)
    try:
        server.model.reload_check_seconds = 3600.0  # the test reopens it, not the watch
        server.model.stores["engram_layer3"].close()  # what a reload leaves while it retries
        conn = http.client.HTTPConnection(*server.url.removeprefix("http://").split(":"))
        conn.request("POST", "/v1/engram", json.dumps({"input_ids": [[1, 2, 3]]}))
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 503 and "closed until a reload" in answer["error"], answer
        assert response.getheader("Retry-After") == "1"
        assert server.model.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
    finally:
        server.stop()


def test_a_closed_table_whose_new_version_is_refused_is_opened_once_per_check(
    tmp_path, monkeypatch
):
    """A table whose store a reload left closed, its new version refused again, was opened
    twice in one check: once ahead of the gate, then again by _reopen_closed under it (every
    request held back meanwhile), both failing alike. It is opened once a check."""
    import errno

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        opens: list[str] = []

        def refused_open(name, old):  # its new version does not open (a read error)
            opens.append(name)
            raise TierIOError(errno.EIO, f"{name}: injected open failure")

        monkeypatch.setattr(served, "_open_checked", refused_open)
        assert served.reload_if_stale(force_check=True) == []
        assert opens == ["engram_layer3"]
        assert served.health["engram_layer3"].reload_failures == 1
        assert "injected open failure" in served.reload_refused
    finally:
        served.close()


def test_a_closed_table_whose_reopen_keeps_failing_is_tried_again_less_often(
    tmp_path, monkeypatch, caplog
):
    """A table whose store a reload left closed, its reopen failing (a read error): it was
    opened again at every check, every second for good (its tiers allocated, its warm restart
    read, each time). It is tried again after a wait that doubles while it fails, logged once,
    at once when its files change (a repair) or when a check is forced."""
    import errno

    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        opens: list[str] = []
        real = served._open_checked

        def failing_open(name, old):  # its reopen fails (a read error)
            opens.append(name)
            raise TierIOError(errno.EIO, f"{name}: injected open failure")

        monkeypatch.setattr(served, "_open_checked", failing_open)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            for _ in range(5):
                assert served.reload_if_stale() == []
        assert opens == ["engram_layer3"]  # not again at each check meanwhile
        assert served.health["engram_layer3"].reload_failures == 5  # each check counted
        assert "injected open failure" in served.reload_refused
        logged = [r.getMessage() for r in caplog.records if "could not reopen" in r.getMessage()]
        assert len(logged) == 1 and "less often while it fails" in logged[0], logged
        assert served.reload_if_stale(force_check=True) == []  # forced: tried now
        assert opens == ["engram_layer3"] * 2
        monkeypatch.setattr(served, "_open_checked", real)
        with TieredStore.open({"table": {"path": str(config.table_path(3))}}) as writer:
            writer.write([1], torch.zeros(1, writer.dim))  # its files change: tried at once
            writer.commit()
        assert served.reload_if_stale() == ["engram_layer3"]
        assert not served.stores["engram_layer3"].closed
        assert served.reload_refused is None
    finally:
        served.close()


def test_a_closed_table_whose_files_change_is_tried_though_another_waits(tmp_path, monkeypatch):
    """Two tables a reload left closed, the reopen of each failing: once one's files changed (a
    repair), it was not tried while the other still waited to be tried again (up to
    CLOSED_RETRY_MOST_S), though a table left closed is tried at once when its files change. It
    is reopened at the next check; the other, still failing, stays closed."""
    import errno

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        for name in TABLES:  # what a refused reload may leave
            served.stores[name].close()
        real, broken = served._open_checked, set(TABLES)

        def failing_open(name, old):  # the reopen of each fails (a read error) until repaired
            if name in broken:
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            return real(name, old)

        monkeypatch.setattr(served, "_open_checked", failing_open)
        assert served.reload_if_stale() == []
        assert all(served.stores[name].closed for name in TABLES)
        broken.discard("engram_layer1")
        _commit_a_new_version(config.table_path(1))  # its files change: a repair
        served.reload_if_stale()
        assert not served.stores["engram_layer1"].closed
        assert served.model.tables[1].table is served.stores["engram_layer1"]
        assert served.stores["engram_layer3"].closed
    finally:
        served.close()


def test_a_refused_reload_of_a_closed_table_says_it_answers_503(tmp_path, monkeypatch, caplog):
    """A table whose store a reload left closed, its reopen refused: the log and /healthz's
    warning said "serving the version open now", though no version of it is open and each of
    its lookups answers 503. They name the table closed and say so."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer3"].close()  # what a refused reload may leave

        # its new version does not open (a read error)
        _recorded_opens(served, monkeypatch, refused=TABLES)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        logged = [r.getMessage() for r in caplog.records if "could not reopen" in r.getMessage()]
        assert len(logged) == 1, logged
        assert "serving the version open now" not in logged[0], logged[0]
        assert "engram_layer3 closed" in logged[0] and "answer 503" in logged[0], logged[0]
        server = InferenceServer(config)
        server.model = served
        [warning] = server.warnings()
        assert "serving the version open now" not in warning, warning
        assert "engram_layer3 closed" in warning and "answer 503" in warning, warning
    finally:
        served.close()


def test_a_refused_reload_of_two_closed_tables_logs_them_as_several(tmp_path, monkeypatch, caplog):
    """Two tables a reload left closed, their reopens refused: the log said "could not reopen
    engram_layer1, engram_layer3 (...) on its new version", "less often while it fails" and
    "once its files change", of two tables. It says a new version, and "they", "their"; and
    engram_layer3's failure, reopened alone, was logged twice (by itself, then in that line):
    once."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for name in TABLES:  # what a refused reload may leave
            served.stores[name].close()

        # no new version opens (a read error)
        _recorded_opens(served, monkeypatch, refused=TABLES)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == []
        [logged] = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert logged.startswith(  # each with its own error (engram_layer3's reopened alone)
            "could not reopen engram_layer1 (engram_layer1: injected open failure); "
            "engram_layer3 (engram_layer3: injected open failure) on a new version"
        ), logged
        for singular in ("its new version", "while it fails", "its files"):
            assert singular not in logged, logged
        assert "while they fail" in logged and "their files change" in logged, logged
        said = [r.getMessage() for r in caplog.records]
        assert sum("engram_layer3: injected open failure" in m for m in said) == 1, said
    finally:
        served.close()


def test_a_refused_reload_returns_and_logs_a_closed_table_it_reopened_alone(
    tmp_path, monkeypatch, caplog
):
    """A refused reload reopens a table it left closed on its new version alone: reload_if_stale
    returned [] though it did (its docstring: the tables reopened), the log and /healthz named
    that table among those refused, and neither 'reopened' nor the trace's warning (its counters
    started anew) was logged. It is returned, logged as reopened and named with the refused no
    more."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config, trace=tmp_path / "served.trace")
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(3))  # layer 3 stale, its new version refused
        # layer 3's new version does not open (a read error)
        _recorded_opens(served, monkeypatch, refused={"engram_layer3"})
        with caplog.at_level(logging.INFO, logger="tiered_store.serve"):
            assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
        assert served.model.tables[1].table is served.stores["engram_layer1"]
        assert "engram_layer3" in served.reload_refused
        assert "engram_layer1" not in served.reload_refused, served.reload_refused
        logged = [r.getMessage() for r in caplog.records]
        assert any(m.startswith("reopened") and "engram_layer1" in m for m in logged), logged
        assert any("no longer replays" in m and "engram_layer1" in m for m in logged), logged
        [refusal] = [m for m in logged if m.startswith("could not reopen")]
        assert "engram_layer1" not in refusal, refusal
    finally:
        served.close()


def test_a_closed_table_reopened_alone_is_counted_as_a_reload_only(tmp_path, monkeypatch):
    """A refused reload reopens a table it left closed on its new version alone: that table was
    counted as a reload (its store swapped) and as a reload failure (with every table stale in
    the refused swap), both for one reopen. It is counted once, as a reload; the refused table
    as a failure."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(3))  # layer 3 stale, its new version refused
        # layer 3's new version does not open (a read error)
        _recorded_opens(served, monkeypatch, refused={"engram_layer3"})
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        counts = {n: (h.reloads, h.reload_failures) for n, h in served.health.items()}
        assert counts == {"engram_layer1": (1, 0), "engram_layer3": (0, 1)}, counts
    finally:
        served.close()


def test_a_closed_table_opened_ahead_of_a_refused_swap_is_served_not_opened_again(
    tmp_path, monkeypatch
):
    """A table a reload left closed, opened ahead of the gate with another table stale whose new
    version is refused: its new store was closed with the refused swap's, then the table opened
    again alone under the gate (every request held back meanwhile), two opens in one check. The
    store opened ahead is served."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(3))  # layer 3 stale, its new version refused
        # layer 3's new version does not open (a read error)
        _recorded_opens(served, monkeypatch, refused={"engram_layer3"})
        opened = _counted_opens(monkeypatch)
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert opened == ["engram_layer1.npy"], opened
        assert served.model.tables[1].table is served.stores["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
    finally:
        served.close()


def test_healthz_is_503_while_a_table_is_closed(tmp_path, monkeypatch):
    """A table whose store a reload left closed, its reopen refused: every request answers 503,
    yet /healthz answered 200 (a warning only) until a request failed, so a load balancer kept
    sending it requests. /healthz is 503 naming the table closed until a check reopens it."""
    server = start_server(make_checkpoint(tmp_path))
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        refused = set(TABLES)  # its new version does not open (a read error)
        _recorded_opens(served, monkeypatch, refused=refused)
        assert served.reload_if_stale(force_check=True) == []
        status, doc = get_json(server.url + "/healthz")
        assert status == 503, doc
        assert any(p.startswith("table engram_layer3: closed") for p in doc["problems"]), doc
        assert not any("engram_layer1" in p for p in doc["problems"]), doc
        refused.clear()
        assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert get_json(server.url + "/healthz") == (200, {"status": "ok"})
    finally:
        server.stop()


def test_the_reload_failures_help_says_what_a_closed_table_waiting_is_counted_for(
    tmp_path, monkeypatch
):
    """A table left closed, waiting for its retry, is counted in
    tiered_store_reload_failures_total at every check (every second), though not tried, with no
    version served; the metric's help said each count was a check whose open failed, retried at
    every check, with the version open now served meanwhile. The help says what is counted."""
    import errno

    from tiered_store.metrics import build_registry

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    registry = build_registry(served.stores, served.health, process=False)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        opens = []

        def failing_open(name, old):  # its reopen fails (a read error)
            opens.append(name)
            raise TierIOError(errno.EIO, f"{name}: injected open failure")

        monkeypatch.setattr(served, "_open_checked", failing_open)
        for _ in range(3):
            assert served.reload_if_stale() == []
        [family] = [
            f
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            if f.name == "tiered_store_reload_failures"
        ]
        counted = {s.labels["table"]: s.value for s in family.samples if s.name.endswith("_total")}
        assert (opens, counted) == (["engram_layer3"], {"engram_layer1": 0, "engram_layer3": 3})
        said = family.documentation
        assert "every check" in said and "retried at every check" not in said, said
        assert "left closed waiting for its retry" in said, said  # counted, not tried
        assert "none for a table left closed" in said, said  # no version served meanwhile
    finally:
        served.close()


def test_a_closed_table_that_cannot_reopen_holds_back_no_other_table_s_reload(
    tmp_path, monkeypatch
):
    """A table a reload left closed whose reopen keeps failing held back every other table's
    reload for as long as it failed (all or nothing: the stale tables waited for its retry),
    though no request is served meanwhile that could mix their versions. Once it waits for its
    retry, the other tables reload without it; it stays closed, named in /healthz's warning."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        # layer 1's reopen fails (a read error)
        _recorded_opens(served, monkeypatch, refused={"engram_layer1"})
        assert served.reload_if_stale() == []
        old = served.stores["engram_layer3"]
        _commit_a_new_version(config.table_path(3))  # layer 3 stale
        assert served.reload_if_stale() == ["engram_layer3"]
        assert served.stores["engram_layer3"] is not old and old.closed
        assert served.model.tables[3].table is served.stores["engram_layer3"]
        assert served.stores["engram_layer1"].closed
        assert served.reload_refused.startswith("engram_layer1 ("), served.reload_refused
        assert "engram_layer3" not in served.reload_refused, served.reload_refused
        counts = {n: (h.reloads, h.reload_failures) for n, h in served.health.items()}
        assert counts == {"engram_layer1": (0, 2), "engram_layer3": (1, 0)}, counts
    finally:
        served.close()


def test_a_closed_table_is_reopened_though_another_table_s_refusal_is_remembered(
    tmp_path, monkeypatch
):
    """A table left closed, waiting for its retry, is left out of the others' reload: one of
    them refused for what its files hold was then remembered (no table closed among those
    tried), and every check after it held back the closed table with it, which stayed closed
    (every request 503) until the refused table's files changed. A table left closed is
    reopened alone while another's refusal holds."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    table = config.table_path(3)
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        refused = {"engram_layer1"}  # layer 1's reopen fails (a read error)
        _recorded_opens(served, monkeypatch, refused=refused)
        assert served.reload_if_stale() == []  # layer 1 waits for its retry
        _make_for_another_seed(served, table)
        _settle(table)  # written a while ago: a refusal of them is remembered
        assert served.reload_if_stale() == []  # layer 3 refused without layer 1
        assert "expects seed=0" in (served.reload_refused or "")
        refused.clear()  # layer 1 would open now
        assert served.reload_if_stale(force_check=True) == ["engram_layer1"]
        assert not served.stores["engram_layer1"].closed
        assert served.model.tables[1].table is served.stores["engram_layer1"]
        assert served.closed_tables() == []
        assert "expects seed=0" in (served.reload_refused or ""), served.reload_refused
        assert "engram_layer1" not in served.reload_refused, served.reload_refused
    finally:
        served.close()


def test_a_closed_table_waiting_for_its_retry_is_named_with_its_own_error(tmp_path, monkeypatch):
    """A table left closed whose reopen failed (its own error) in a swap refused for another
    table waited for its retry under the refused table's error: /healthz's warning then named
    it with the other table's failure ("engram_layer3 (engram_layer1: ...)"). It is named with
    its own reopen's error."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 0.0  # every call checks, as if a second had passed
        served.stores["engram_layer3"].close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(1))  # layer 1 stale, its new version refused

        # both fail, each with its own error
        _recorded_opens(served, monkeypatch, refused=TABLES)
        assert served.reload_if_stale(force_check=True) == []
        reasons = [served.reload_refused or ""]  # as refused
        assert served.reload_if_stale() == []  # layer 3 waits for its retry, layer 1 refused
        reasons.append(served.reload_refused or "")
        for refused in reasons:
            assert "engram_layer3 (engram_layer3: injected open failure" in refused, refused
            assert "engram_layer3 (engram_layer1" not in refused, refused
            assert "engram_layer1 (engram_layer1: injected open failure" in refused, refused
    finally:
        served.close()


def test_a_ctrl_c_as_a_reload_looks_for_a_close_under_way_leaves_no_new_store_open(
    tmp_path, monkeypatch
):
    """A Ctrl-C (a real SIGINT) once the new stores opened ahead of the swap, as the reload
    looked whether a close had begun meanwhile (before it waited for the gate), left them open
    for good: neither served nor closed (their descriptors, tiers and version locks held). None
    is left open; the Ctrl-C is raised then."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        _commit_a_new_version(config.table_path(3))  # layer 3 stale, its new version opens
        opened = _recorded_opens(served, monkeypatch)
        _reload_interrupted_at(served, _called_by("is_set", "_reload_stale"))
        [new] = opened
        assert new.closed and served.stores["engram_layer3"] is not new, new
        assert served.model.tables[3].table is served.stores["engram_layer3"]
    finally:
        served.close()


@pytest.mark.parametrize(
    ("event", "at", "closed"),
    [
        ("call", "_undo_swap", False),  # as the undo begins: a new store of a table open
        ("call", "_reopen_closed", True),  # as the reopen alone begins: one opened ahead
        ("c_return", "_reopen_closed.get", True),  # as it takes the store opened ahead
    ],
)
def test_a_ctrl_c_as_a_refused_swap_is_undone_leaves_no_new_store_open(
    tmp_path, monkeypatch, event, at, closed
):
    """A Ctrl-C (a real SIGINT) in a swap refused for another table, as its undo or the reopen
    of a table left closed began, or as that reopen took the store opened ahead for it, left the
    new store opened for the other table open for good: neither served nor closed (its
    descriptors, tiers and version lock held). Each is served once the model reads it, else
    closed; the Ctrl-C is raised then."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        if closed:
            served.stores["engram_layer1"].close()  # what a refused reload may leave
        else:
            _commit_a_new_version(config.table_path(1))  # layer 1 stale, its new version opens
        _commit_a_new_version(config.table_path(3))  # layer 3 stale, its new version refused
        opened = _recorded_opens(served, monkeypatch, refused={"engram_layer3"})

        def interrupt_at(frame, event_, arg) -> bool:
            name = frame.f_code.co_name
            if event_ == "c_return":  # a builtin returning in that frame
                name = f"{name}.{getattr(arg, '__name__', '')}"
            return event_ == event and name == at

        _reload_interrupted_at(served, interrupt_at)
        [new] = opened
        assert new.closed or served.stores["engram_layer1"] is new, new
        assert served.model.tables[1].table is served.stores["engram_layer1"]
    finally:
        served.close()


def test_a_refused_reload_with_every_table_closed_names_no_other_table(tmp_path, monkeypatch):
    """Every table's store left closed, the reopens refused: /healthz's warning (and the log)
    said the other tables were on the version open now, though there were none, and "its
    lookups" of two tables. It names both closed, their lookups answering 503, and no other."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for name in TABLES:  # what a refused reload may leave
            served.stores[name].close()

        # no new version opens (a read error)
        _recorded_opens(served, monkeypatch, refused=TABLES)
        assert served.reload_if_stale(force_check=True) == []
        server = InferenceServer(config)
        server.model = served
        [warning] = server.warnings()
        assert "engram_layer1, engram_layer3 closed" in warning, warning
        assert "their lookups answer 503" in warning, warning
        assert "other tables" not in warning, warning
    finally:
        served.close()


def test_a_ctrl_c_as_a_reload_carries_an_old_store_s_counts_closes_every_one(tmp_path, monkeypatch):
    """A Ctrl-C as the reload carried an old store's last counts to its table's metrics (after
    its close) left the old stores after it open for good and their reloads uncounted. Every
    old store closes and is counted; the Ctrl-C is raised then."""
    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            with TieredStore.open({"table": {"path": str(config.table_path(layer))}}) as writer:
                writer.write([1], torch.zeros(1, writer.dim))
                writer.commit()
        old, real = dict(served.stores), served._carry_rest

        def interrupted_carry(name, store, carried):  # Ctrl-C as the first one's carry ends
            real(name, store, carried)
            if name == "engram_layer1":
                raise KeyboardInterrupt

        monkeypatch.setattr(served, "_carry_rest", interrupted_carry)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        assert all(store.closed for store in old.values())
        assert [served.health[name].reloads for name in TABLES] == [1, 1] and served.reloads == 2
    finally:
        served.close()


@pytest.mark.parametrize("where", ["an old store's count", "its carry"])
def test_a_ctrl_c_as_a_swap_moves_the_counts_leaves_stores_naming_what_is_served(
    tmp_path, monkeypatch, where
):
    """A Ctrl-C once the model took the new stores, as their tables' counts moved over (under
    the counting locks, before ``stores`` named the new stores): ``stores`` kept the old ones,
    open for good, and the new ones, which the model read, were in no list (the next check
    reopened them, the first new stores never closed). ``stores`` names what the model reads,
    and the old stores close."""
    from tiered_store.serve import served_model

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        old, calls = dict(served.stores), []

        def interrupt_once(real):
            def call(*args, **kwargs):
                calls.append(args)
                if len(calls) == 1:
                    raise KeyboardInterrupt
                return real(*args, **kwargs)

            return call

        if where == "its carry":
            health = served.health["engram_layer1"]
            monkeypatch.setattr(health, "carry", interrupt_once(health.carry))
        else:
            monkeypatch.setattr(
                served_model, "store_counts", interrupt_once(served_model.store_counts)
            )
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        for layer in (1, 3):
            name = config.table_name(layer)
            assert served.model.tables[layer].table is served.stores[name], layer
            assert not served.stores[name].closed, layer
            assert served.stores[name] is not old[name] and old[name].closed, layer
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
        assert served.reload_if_stale(force_check=True) == []  # on the version now
    finally:
        served.close()


def test_a_ctrl_c_as_an_undone_swap_closes_a_new_store_closes_every_one(tmp_path, monkeypatch):
    """A swap interrupted inside set_tables is undone: the model back on the stores served,
    then each new store closed in turn. A second Ctrl-C as the first of them closed left the
    others open for good (their memory, files and version holds), in no list. Every new store
    not served is closed, and the interrupt goes on."""
    from tiered_store.engram.module import MultiHeadEmbedding

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real_set, real_open, opened = MultiHeadEmbedding.set_backend, served._open_checked, []
        swaps = []

        def interrupted_at_layer3(embedding, backend):  # layers swap in order: 1, then 3
            swaps.append(backend)
            if len(swaps) == 2:
                raise KeyboardInterrupt
            real_set(embedding, backend)

        def watched_open(name, old):  # the first new store's close is interrupted as it ends
            new = real_open(name, old)
            if not opened:
                real_close = new.close

                def interrupted_close(**kwargs):
                    real_close(**kwargs)
                    raise KeyboardInterrupt

                new.close = interrupted_close
            opened.append(new)
            return new

        monkeypatch.setattr(MultiHeadEmbedding, "set_backend", interrupted_at_layer3)
        monkeypatch.setattr(served, "_open_checked", watched_open)
        old = dict(served.stores)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        assert served.stores == old
        assert len(opened) == 2 and all(store.closed for store in opened)
        for layer in (1, 3):
            table = served.model.tables[layer]
            assert table.table is served.stores[config.table_name(layer)], layer
            assert not table.table.closed, layer
        assert served.reload_if_stale(force_check=True) == TABLES
    finally:
        served.close()


@pytest.mark.parametrize("after", ["a Ctrl-C", "a refused open"])
def test_a_reload_whose_discarded_new_store_fails_to_close_logs_it(
    tmp_path, monkeypatch, caplog, after
):
    """A reload that discards the new stores it opened (a Ctrl-C as it waits for the answers, or
    another table's new version refused) closes each, though one close raised (a device error
    at its stream's sync); that error was then raised, in place of the Ctrl-C (lost), or out of
    the check (a request's error, the refusal neither noted nor counted). It is logged, naming
    the table; the interrupt goes on, the refusal is noted."""
    import errno

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real_open, opened = served._open_checked, []

        def open_failing_close(name, old):  # the first new store's close fails as it ends
            if after == "a refused open" and name == "engram_layer3":
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            new = real_open(name, old)
            if not opened:
                real_close = new.close

                def failing_close(**kwargs):
                    real_close(**kwargs)
                    raise RuntimeError("injected device error")

                new.close = failing_close
            opened.append(new)
            return new

        def interrupted(timeout=None):  # a Ctrl-C as the swap waits for the answers
            raise KeyboardInterrupt

        monkeypatch.setattr(served, "_open_checked", open_failing_close)
        if after == "a Ctrl-C":
            monkeypatch.setattr(served._gate, "exclusive", interrupted)
        old = dict(served.stores)
        with caplog.at_level(logging.ERROR, logger="tiered_store.serve"):
            if after == "a Ctrl-C":
                with pytest.raises(KeyboardInterrupt):
                    served.reload_if_stale(force_check=True)
            else:
                assert served.reload_if_stale(force_check=True) == []
                assert "injected open failure" in served.reload_refused
                assert served.health["engram_layer1"].reload_failures == 1
        monkeypatch.undo()
        assert served.stores == old
        assert opened and all(store.closed for store in opened)
        logged = [r.getMessage() for r in caplog.records if "injected device" in r.getMessage()]
        assert len(logged) == 1, logged
        assert logged[0].startswith("closing engram_layer1's new store (not served) failed: ")
        assert served.reload_if_stale(force_check=True) == TABLES
    finally:
        monkeypatch.undo()  # the gate's own passage: the close takes it
        served.close()


def test_a_ctrl_c_as_a_reload_opens_ahead_closes_each_store_once(tmp_path, monkeypatch, caplog):
    """A Ctrl-C as a reload opened layer 3's new store ahead of the swap, once layer 1's had
    opened: the open ahead closed layer 1's, then the reload closed it again (the dict is the
    reload's), so that a close failing (a device error) was logged twice. It is closed, and
    logged, once; the Ctrl-C goes on."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        for layer in (1, 3):  # both tables stale
            _commit_a_new_version(config.table_path(layer))
        real_open, opened = served._open_checked, []

        def open_interrupted(name, old):  # layer 1's new store opens, its close failing
            if name == "engram_layer3":
                raise KeyboardInterrupt
            new = real_open(name, old)
            real_close = new.close

            def failing_close(**kwargs):
                real_close(**kwargs)
                raise RuntimeError("injected device error")

            new.close = failing_close
            opened.append(new)
            return new

        monkeypatch.setattr(served, "_open_checked", open_interrupted)
        with (
            caplog.at_level(logging.ERROR, logger="tiered_store.serve"),
            pytest.raises(KeyboardInterrupt),
        ):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        [new] = opened
        assert new.closed and served.stores["engram_layer1"] is not new
        logged = [r.getMessage() for r in caplog.records if "injected device" in r.getMessage()]
        assert len(logged) == 1, logged
    finally:
        served.close()


def test_a_ctrl_c_as_a_closed_table_s_reopen_is_taken_serves_it(tmp_path, monkeypatch):
    """After a refused swap, a table its store left closed is reopened alone; a Ctrl-C once the
    model took the store it opened (before ``stores`` named it) closed that store under the
    model, which read it closed, ``stores`` naming the old one (and one between the two steps
    left it open in no list: the next reopen never closed it). The model reads the store
    ``stores`` names, open, and the interrupt goes on."""
    import errno

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        old = served.stores["engram_layer3"]
        old.close()  # what a refused reload may leave
        _commit_a_new_version(config.table_path(1))
        real_open, real_set = served._open_checked, served.model.set_tables

        def refused_open(name, old):  # layer 1's new version is refused (a read error)
            if name == "engram_layer1":
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            return real_open(name, old)

        def interrupted_set(tables):  # a Ctrl-C as the model took layer 3's reopened store
            real_set(tables)
            if 3 in tables:
                raise KeyboardInterrupt

        monkeypatch.setattr(served, "_open_checked", refused_open)
        monkeypatch.setattr(served.model, "set_tables", interrupted_set)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        reopened = served.stores["engram_layer3"]
        assert reopened is not old and not reopened.closed
        assert served.model.tables[3].table is reopened
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
    finally:
        served.close()


def test_left_closing_names_each_table_once_and_only_while_its_calls_hang(tmp_path, monkeypatch):
    """left_closing (what the serve command's exit warns of, exiting past it) listed a table
    once per store left to close under a hung call: twice once a reload's old store and the
    stop's store of one table hung, and still after those calls ended (the warning then said
    calls were under way that were not). It names each table once, while its calls hang."""
    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    served = ServedModel(config)
    release, handles = threading.Event(), []

    def hang(store) -> None:  # a prefetch whose cold read hangs (a dead disk) until released
        entered, read_rows = threading.Event(), store.cold.read_rows

        def hung_read(ids):
            entered.set()
            release.wait(60)
            return read_rows(ids)

        monkeypatch.setattr(store.cold, "read_rows", hung_read)
        handles.append(store.prefetch([1, 2, 3]))
        assert entered.wait(10)

    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        hang(served.stores["engram_layer3"])
        with TieredStore.open({"table": {"path": str(config.table_path(3))}}) as writer:
            writer.write([1], torch.zeros(1, writer.dim))
            writer.commit()
        with pytest.warns(RuntimeWarning, match="still under way after"):
            assert served.reload_if_stale(force_check=True) == ["engram_layer3"]
        assert served.left_closing == ["engram_layer3"]
        hang(served.stores["engram_layer3"])  # the new store's read hangs too
        with pytest.warns(RuntimeWarning, match="still under way after"):
            served.close(wait_s=1.0)
        assert served.left_closing == ["engram_layer3"]
    finally:
        release.set()
        served.close()
    for handle in handles:
        assert handle.future.result(10) is not None  # the reads ended: nothing left to wait for
    assert served.left_closing == []


def test_a_server_s_requests_leave_reloads_to_its_version_watch(tmp_path, monkeypatch):
    """A request whose check came due ran the reload itself, before its own answer: that one
    request waited for the new versions' open, the swap and the old stores' close (a
    warm-restart save, up to server.request_timeout_s for a hung one), though a server's
    version watch checks every second anyway. A server's requests leave it to the watch."""
    from tiered_store import TieredStore

    server = start_server(make_checkpoint(tmp_path))
    try:
        served = server.model
        served.reload_check_seconds = 3600.0  # the watch's next wait is long; checks are due
        with TieredStore.open({"table": {"path": str(served.config.table_path(3))}}) as writer:
            writer.write([1], torch.zeros(1, writer.dim))
            writer.commit()
        checked_by, real = [], served._reload_stale

        def watched_reload():
            checked_by.append(threading.current_thread().name)
            return real()

        monkeypatch.setattr(served, "_reload_stale", watched_reload)
        served._last_version_check = time.monotonic() - 7200.0
        for _ in range(3):
            assert post_json(server.url + "/v1/engram", {"input_ids": [[1, 2, 3]]})[0] == 200
        assert set(checked_by) <= {"tiered-store-version-watch"}, checked_by
    finally:
        server.stop()


def test_a_store_hung_for_good_leaves_the_others_their_close(tmp_path, monkeypatch):
    """The stores closed in turn under one deadline: one whose cold read hung for good (a dead
    disk) waited all of it, and those after it got none, so a call of theirs that ends as its
    store closes (a warm restore's chunk, a re-pin's read) left them to close under it too:
    no warm-restart save, and named among the hung at exit. Each store has a moment of its own
    (CLOSE_GRACE_S) past the deadline for its calls."""
    config = ServeConfig.from_yaml(make_checkpoint(tmp_path, server={"request_timeout_s": 0.5}))
    served = ServedModel(config)
    release, handles = threading.Event(), []
    try:
        hung, healthy = served.stores["engram_layer1"], served.stores["engram_layer3"]
        closing, real_close = threading.Event(), healthy.close

        def close_healthy(**kwargs):
            closing.set()
            return real_close(**kwargs)

        monkeypatch.setattr(healthy, "close", close_healthy)
        for store, until in ((hung, release), (healthy, closing)):
            entered, read_rows = threading.Event(), store.cold.read_rows

            def read(ids, entered=entered, until=until, read_rows=read_rows):
                entered.set()
                until.wait(60)  # layer 1: until the test ends; layer 3: until its close
                return read_rows(ids)

            monkeypatch.setattr(store.cold, "read_rows", read)
            handles.append(store.prefetch([1, 2, 3]))
            assert entered.wait(10)
        with pytest.warns(RuntimeWarning, match="engram_layer1.npy still under way after"):
            served.close(wait_s=0.5)
        assert served.left_closing == ["engram_layer1"]
        assert healthy.closed and not healthy.calls_left
    finally:
        release.set()
        served.close()
    for handle in handles:
        assert handle.future.result(10) is not None


def test_a_stop_that_raises_still_exits_past_a_cold_read_hung_for_good(tmp_path):
    """The serve command exited past the calls a stop left hung (a cold read on a dead disk)
    only when the stop returned: one that raised too (the recorded trace's close failed, its
    folder removed) went on to the interpreter's exit, which waited for the hung read's worker
    without end, past stop_within_s (killed -9). It exits past them all the same, with the
    stop's error logged and status 2."""
    import shutil

    env, mark, _ = _hung_read_env(tmp_path)
    (Path(env["PYTHONPATH"]) / "sitecustomize.py").write_text(_HUNG_COLD_READ_HOOK)
    config = make_checkpoint(tmp_path, server={"request_timeout_s": 0.5})
    traces = tmp_path / "traces"
    traces.mkdir()
    with ServeProcess(
        config, "--record-trace", str(traces / "t.trace"), metrics=False, env=env
    ) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            _send_until_hung(sock, mark)
            shutil.rmtree(traces)  # the trace's close fails
            status = proc.stop()  # kills once stop_within_s (11.5 s here) and 10 s more passed
        log = proc.log()
        assert status == 2, log[-3000:]
        assert "exiting with calls to engram_layer3 still under way" in log, log[-3000:]
        assert "t.trace" in log, log[-3000:]


_STOP_INTERRUPTED_HOOK = """
from tiered_store.serve.server import InferenceServer

_stop = InferenceServer.stop


def _stop_then_interrupted(self, *args, **kwargs):  # a second Ctrl-C as the stop ends
    _stop(self, *args, **kwargs)
    raise KeyboardInterrupt


InferenceServer.stop = _stop_then_interrupted
"""


def test_a_stop_interrupted_with_a_cold_read_hung_for_good_exits_130(tmp_path):
    """A Ctrl-C raised out of the stop exited 130 ('interrupted', as every command) when no
    call hung, but 1 when the stop left a store to close under a hung cold read (the serve
    command exiting past it): 130 either way."""
    env, mark, _ = _hung_read_env(tmp_path)
    hook = _HUNG_COLD_READ_HOOK + _STOP_INTERRUPTED_HOOK
    (Path(env["PYTHONPATH"]) / "sitecustomize.py").write_text(hook)
    config = make_checkpoint(tmp_path, server={"request_timeout_s": 0.5})
    with ServeProcess(config, metrics=False, env=env) as proc:
        host, port = proc.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            _send_until_hung(sock, mark)
            status = proc.stop()  # kills once stop_within_s (11.5 s here) and 10 s more passed
        log = proc.log()
        assert status == 130, log[-3000:]
        assert "stopping interrupted" in log, log[-3000:]
        assert "exiting with calls to engram_layer3 still under way" in log, log[-3000:]


@pytest.mark.parametrize("where", ["the lookup hold's end", "the refusal's clearing"])
def test_a_ctrl_c_between_the_swap_and_the_old_stores_close_closes_them(
    tmp_path, monkeypatch, where
):
    """A Ctrl-C once the model took the new stores but before the old stores' close was set to
    run after the gate (as _swap_in ended each table's lookup hold, or as the reload cleared
    its refusal) left the old stores open for good, and, at the refusal, ``stores`` naming
    them while the model read the new ones. The old stores close and ``stores`` names what
    the model reads."""
    from tiered_store import TieredStore

    config = ServeConfig.from_yaml(make_checkpoint(tmp_path))
    served = ServedModel(config)
    try:
        served.reload_check_seconds = 3600.0  # checks only when the test asks
        with TieredStore.open({"table": {"path": str(config.table_path(3))}}) as writer:
            writer.write([1], torch.zeros(1, writer.dim))
            writer.commit()
        old = served.stores["engram_layer3"]

        def interrupt(*args, **kwargs):
            raise KeyboardInterrupt

        if where == "the lookup hold's end":
            monkeypatch.setattr(served.health["engram_layer3"], "end_lookup_hold", interrupt)
        else:
            monkeypatch.setattr(served, "_refused", interrupt)
        with pytest.raises(KeyboardInterrupt):
            served.reload_if_stale(force_check=True)
        monkeypatch.undo()
        assert old.closed
        assert served.model.tables[3].table is served.stores["engram_layer3"] is not old
        request = parse_request(b'{"input_ids": [[1, 2, 3]]}', config.server, served)
        assert served.answer(request)["shape"] == [1, 3]
    finally:
        served.close()


def test_a_close_as_a_postponed_reload_waits_opens_no_table_left_closed_after_it(tmp_path):
    """A close (a server's stop) that began while a reload waited for an answer in flight, a
    table left closed whose open ahead failed: once the wait gave up, the reload opened that
    table alone all the same (a big table's tiers, its warm restore), which the close waited
    for. No open begins once the close began; the close goes on."""
    import errno

    def closing_answer(served, done) -> None:  # a close begins as the reload waits for it
        while not served._gate._exclusive and not done.is_set():
            time.sleep(0.01)
        threading.Thread(target=served.close).start()
        while not served._closing.is_set() and not done.is_set():
            time.sleep(0.01)
        done.wait(60)

    with _an_answer_in_flight_over_a_commit(tmp_path, 2.0, closing_answer) as (served, *_, end):
        served.stores["engram_layer1"].close()  # what a refused reload may leave
        real, opens = served._open_checked, []

        def recorded_open(name, old):
            opens.append((name, served._closing.is_set()))
            if len(opens) == 1:  # its open ahead fails: not opened before the wait
                raise TierIOError(errno.EIO, f"{name}: injected open failure")
            return real(name, old)

        served._open_checked = recorded_open
        assert served.reload_if_stale(force_check=True) == []
        assert opens == [("engram_layer1", False)], opens  # none once the close began
        end()


_A_LATER_LAYER_UNWRITABLE = """
import json, resource, sys
from pathlib import Path
from tiered_store.serve import ServeConfig, ServedModel, parse_request
from tiered_store.trace import TraceReader

config = ServeConfig.from_yaml(sys.argv[1])
served = ServedModel(config, trace=sys.argv[2])
request = parse_request(b'{"input_ids": [[7, 8, 9]]}', config.server, served)
per_layer = served.answer(request)["rows_looked_up"]["engram_layer1"]
served._trace.end_chunk()
served._trace._chunk_ids = 2 * per_layer  # the last layer's write ends the chunk
(temporary,) = Path(sys.argv[2]).parent.glob(".t.trace.*.tmp")
resource.setrlimit(resource.RLIMIT_FSIZE, (temporary.stat().st_size, resource.RLIM_INFINITY))
print(served.answer(request)["rows_looked_up"]["engram_layer1"] == per_layer)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
served.answer(request)
served.close()
with TraceReader(sys.argv[2]) as reader:
    print(json.dumps([[b.batch, b.table] for b in reader.batches()]))
"""


def test_a_batch_whose_later_layer_cannot_be_recorded_leaves_none_of_its_layers(tmp_path):
    """_record wrote one layer after another: a full disk (a file size limit here) failing the
    last layer's chunk left the batch in the trace for the layers before it only, though its
    docstring says whole. The batch's records are all or nothing: the request whose recording
    failed (answered all the same) leaves none, the next one both layers."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    config_path = make_checkpoint(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _A_LATER_LAYER_UNWRITABLE,
            str(config_path),
            str(tmp_path / "t.trace"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True",
        json.dumps([[0, TABLES[0]], [1, TABLES[1]], [2, TABLES[0]], [3, TABLES[1]]]),
    ], done.stdout + done.stderr


_RECORDING_ON_A_FULL_DISK = """
import json, logging, resource, sys
from pathlib import Path
from prometheus_client import generate_latest
from tiered_store.metrics import RequestCounters, build_registry
from tiered_store.serve import ServeConfig, ServedModel, parse_request
from tiered_store.trace import TraceReader

config = ServeConfig.from_yaml(sys.argv[1])
counters = RequestCounters()
served = ServedModel(config, trace=sys.argv[2], counters=counters)
logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("tiered_store.serve").addHandler(handler)
request = parse_request(b'{"input_ids": [[7, 8, 9]]}', config.server, served)
answer = served.answer(request)
served._trace.end_chunk()
served._trace._chunk_ids = len(served.layer_ids) * answer["rows_looked_up"]["engram_layer1"]
(temporary,) = Path(sys.argv[2]).parent.glob(".t.trace.*.tmp")
resource.setrlimit(resource.RLIMIT_FSIZE, (temporary.stat().st_size, resource.RLIM_INFINITY))
during = [served.answer(request) == answer for _ in range(3)]
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
after = served.answer(request) == answer
metrics = generate_latest(build_registry(served.stores, served.health, counters)).decode()
served.close()
with TraceReader(sys.argv[2]) as reader:
    batches = [[b.batch, b.table] for b in reader.batches()]
failures = [line for line in metrics.splitlines() if line.startswith("tiered_store_trace_write")]
print(json.dumps([during, after, failures, batches, logged]))
"""


def test_a_recording_that_fails_on_a_full_disk_leaves_the_answer_as_it_is(tmp_path):
    """A trace write that failed (a full disk; a file size limit here) failed the request: a 503
    "table data unavailable" logged as a table fault, for every request until there was room.
    Recording is observation: the answers stand, the failure is logged once naming the trace
    and the error and counted, the batches it could not write are left out, and recording goes
    on once writes succeed, the trace closing whole."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    config_path = make_checkpoint(tmp_path)
    trace = tmp_path / "t.trace"
    done = subprocess.run(
        [sys.executable, "-c", _RECORDING_ON_A_FULL_DISK, str(config_path), str(trace)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    during, after, failures, batches, logged = json.loads(done.stdout.splitlines()[-1])
    assert during == [True] * 3 and after, done.stdout
    assert failures == ["tiered_store_trace_write_failures_total 3.0"], failures
    assert batches == [[0, TABLES[0]], [1, TABLES[1]], [2, TABLES[0]], [3, TABLES[1]]], batches
    failed, again = (m for m in logged if "trace" in m)  # one each: not one a request
    assert str(trace) in failed and "File too large" in failed and "left out" in failed, failed
    assert str(trace) in again and "3 request(s)" in again and "left out" in again, again


_SERVING_ON_A_FULL_DISK = """
import json, resource, sys, urllib.request
from pathlib import Path
from tiered_store.serve import InferenceServer, ServeConfig
from tiered_store.serve.client import post_json
from tiered_store.trace import TraceReader

config = ServeConfig.from_yaml(sys.argv[1]).with_overrides(
    address="127.0.0.1:0", metrics_address="127.0.0.1:0"
)
server = InferenceServer(config, trace=sys.argv[2])
server.start()
body = {"input_ids": [[7, 8, 9]]}


def answered():
    code, doc = post_json(server.url + "/v1/engram", body)
    doc.pop("elapsed_ms")
    return code, doc


first = answered()
(temporary,) = Path(sys.argv[2]).parent.glob(".t.trace.*.tmp")
resource.setrlimit(resource.RLIMIT_FSIZE, (temporary.stat().st_size, resource.RLIM_INFINITY))
during = [answered() == first for _ in range(3)]
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
after = answered() == first
url = f"http://127.0.0.1:{server.metrics_port}/metrics"
metrics = urllib.request.urlopen(url, timeout=30).read().decode()
server.stop()
with TraceReader(sys.argv[2]) as reader:
    n_batches = reader.n_batches
failures = [line for line in metrics.splitlines() if line.startswith("tiered_store_trace_write")]
print(json.dumps([first[0], during, after, failures, n_batches]))
"""


def test_a_server_whose_trace_chunks_cannot_be_written_answers_200_and_keeps_the_batches(tmp_path):
    """Over HTTP, at server.record_flush_s 0 (each request ends its chunk): the chunks a full
    disk (a file size limit here) refused made each request a 503 "table data unavailable".
    They are answered 200 as before, counted on /metrics, and their batches, buffered, reach
    the trace with the first chunk written once there is room."""
    import subprocess
    import sys

    from tiered_store.serve.client import subprocess_env

    config_path = make_checkpoint(tmp_path, server={"record_flush_s": 0})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVING_ON_A_FULL_DISK,
            str(config_path),
            str(tmp_path / "t.trace"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    code, during, after, failures, n_batches = json.loads(done.stdout.splitlines()[-1])
    assert code == 200 and during == [True] * 3 and after, done.stdout + done.stderr
    assert failures == ["tiered_store_trace_write_failures_total 3.0"], failures
    assert n_batches == 5 * len(TABLES), n_batches  # none left out: each kept for the next chunk
