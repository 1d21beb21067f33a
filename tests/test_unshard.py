"""`tiered-store unshard` (``join_shards``): a table's trained shards folded back into one table."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.distributed_support import HEADS, head_metadata, make_plain_table
from tiered_store.cli import main as cli_main
from tiered_store.delta.compaction import compact_table
from tiered_store.delta.table_versions import current_version
from tiered_store.distributed import join_shards, read_shard, write_shards
from tiered_store.errors import (
    ConfigError,
    ShardMismatchError,
    TableFormatError,
    TierIOError,
)
from tiered_store.page_checksums import ChecksumError
from tiered_store.store import TieredStore, UncommittedWritesWarning
from tiered_store.table_format import (
    TableExistsError,
    create_table,
    read_manifest,
    replace_metadata,
    replace_table,
    verify_table,
)
from tiered_store.table_sources import TableNotFoundError


def _commit(shard: Path, writes: dict[int, float], step: int | None = None) -> int:
    """Write ``writes`` (local row -> value in every column) to a shard and commit them."""
    with TieredStore.open({"table": {"path": str(shard)}}) as store:
        for row, value in writes.items():
            store.write([row], torch.full((1, store.row_width), value))
        return store.commit(step)


def _bf16_bits(value: float) -> int:
    """The bfloat16 bits a written ``value`` is stored as (the plain table's dtype)."""
    return int(torch.tensor(value).bfloat16().view(torch.int16).item()) & 0xFFFF


def test_unshard_folds_trained_compacted_shards_back_and_a_recut_carries_on(tmp_path, capsys):
    """Shards trained for three steps (every shard commits each step, as ShardedStore's commit
    does; one of them wrote nothing at some) and compacted fold back into the table: every
    shard's current rows in row order, the Engram layout kept, the shard metadata dropped,
    the common step kept; cut again for 2 ranks, the shards go on from that step."""
    table = make_plain_table(tmp_path)  # 463 bfloat16 rows of 7 hash heads
    want = np.load(table)
    shards = write_shards(table, 3, "heads", progress=False)
    source = {"table_version": shards[0].shard_map.table_version, "run": shards[0].run}
    steps = ({0: {3: 1.0}, 1: {0: 2.0}, 2: {5: 3.0}}, {0: {4: 4.0}, 1: {0: 5.0}, 2: {}})
    for step, writes in enumerate(steps, 1):
        for shard in shards:
            assert _commit(shard.path, writes[shard.rank], step) == step
            start = shard.shard_map.bounds[shard.rank]
            for row, value in writes[shard.rank].items():
                want[start + row] = _bf16_bits(value)
    for shard in shards:
        assert compact_table(shard.path, progress=False).new_generation == 1
        assert _commit(shard.path, {}, 3) == 3  # a step after compaction with no row written
    argv = ["unshard", str(table), "--ranks", "3", "--quiet"]
    assert cli_main(argv) == 2  # the table they were cut from is there
    assert f"table file {table} already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite"]) == 0
    assert capsys.readouterr().out == (
        f"wrote {table}: 463 x 8 bfloat16 from 3 shards, committed step 3\n"
    )
    assert np.array_equal(np.load(table), want)
    assert read_manifest(table).metadata == {
        **head_metadata(HEADS),
        "committed_step": 3,
        "joined_from": source,  # what it was joined from: an unshard again may overwrite it
    }
    assert verify_table(table, progress=False).pages_checked > 0
    with TieredStore.open({"table": {"path": str(table)}}) as store:
        assert store.committed_step == 3 and store.generation == 0
    # another world size: cut again, written at the next step, joined from a list of files
    again = write_shards(table, 2, "rows", progress=False)
    assert [read_shard(s.path).manifest.metadata["committed_step"] for s in again] == [3, 3]
    for shard in again:
        assert _commit(shard.path, {7: 6.0 + shard.rank}) == 4
        want[shard.shard_map.bounds[shard.rank] + 7] = _bf16_bits(6.0 + shard.rank)
        compact_table(shard.path, progress=False)
    whole = tmp_path / "whole.npy"
    manifest = join_shards([s.path for s in again[::-1]], whole, progress=False)
    source = {"table_version": again[0].shard_map.table_version, "run": again[0].run}
    assert manifest.metadata == {**head_metadata(HEADS), "committed_step": 4, "joined_from": source}
    assert np.array_equal(np.load(whole), want)


@pytest.fixture
def cut(tmp_path):
    """A 30 x 4 float32 table (row r holds 4r..4r+3) cut into 3 shards of 10 rows."""
    table = tmp_path / "t.npy"
    create_table(table, np.arange(120, dtype=np.float32).reshape(30, 4), progress=False)
    return table, [s.path for s in write_shards(table, 3, "rows", progress=False)]


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".writer.lock"))


def test_unshard_refuses_a_missing_mixed_or_doubled_shard_set_before_writing(cut, tmp_path):
    """Each refusal names the files, what they hold and what was expected; nothing is written."""
    table, (s0, s1, s2) = cut
    out = tmp_path / "w.npy"
    shutil.move(s1, tmp_path / "away.npy")
    with pytest.raises(TableNotFoundError, match=rf"rank 1's shard {s1} \(of 3\) does not exist"):
        join_shards(table, out, ranks=3, progress=False)
    shutil.move(tmp_path / "away.npy", s1)
    with pytest.raises(ShardMismatchError, match=r"no shard of rank\(s\) 1 among 2 shard\(s\)"):
        join_shards([s0, s2], out, progress=False)
    others = [
        s.path
        for s in write_shards(table, 3, "rows", template=str(tmp_path / "b{rank}"), progress=False)
    ]
    with pytest.raises(ShardMismatchError, match=rf"{s1} and {others[1]} are both rank 1's shard"):
        join_shards([s0, s1, others[1], s2], out, progress=False)
    with pytest.raises(ConfigError, match=rf"shards: {s1} is given twice"):
        join_shards([s0, s1, s1, s2], out, progress=False)
    two = write_shards(table, 2, "rows", template=str(tmp_path / "c{rank}"), progress=False)[0].path
    with pytest.raises(ShardMismatchError, match=r"shard map \(by rows over 2 ranks, bounds \[0, 15, 30\]\) differs"):  # fmt: skip
        join_shards([s0, s1, two], out, progress=False)
    with pytest.raises(ShardMismatchError, match=rf"rank 0's shard {s0} is rank 0's shard of 3; expected rank 0's of 2"):  # fmt: skip
        join_shards(table, out, ranks=2, template=str(tmp_path / "t.shard-{rank}-of-3"))
    create_table(tmp_path / "u.npy", np.ones((30, 4), np.float32), progress=False)
    alien = write_shards(tmp_path / "u.npy", 3, "rows", progress=False)[2].path
    with pytest.raises(ShardMismatchError, match=rf"{alien} is a shard of table version \w+ and {s0} of version"):  # fmt: skip
        join_shards([s0, s1, alien], out, progress=False)
    with pytest.raises(TableFormatError, match="no shard metadata"):
        join_shards([s0, s1, tmp_path / "u.npy"], out, progress=False)
    with pytest.raises(TableFormatError, match=rf"out {s1} is rank 1's shard {s1}; expected another path"):  # fmt: skip
        join_shards(table, s1, ranks=3, overwrite=True, progress=False)
    with pytest.raises(TableExistsError, match=rf"{table} already exists; pass overwrite=True"):
        join_shards(table, ranks=3, progress=False)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("w.", ".w."))]
    assert not out.exists() and read_manifest(table).metadata == {}  # the table untouched


def test_unshard_refuses_uncompacted_torn_or_busy_shards_and_a_corrupt_one_leaves_no_table(
    cut, tmp_path, capsys
):
    """A shard's uncompacted rows, shards at two steps (a torn commit) and a shard being
    written are refused; once compacted and redone, the shards join (files given in any
    order); a corrupt page fails the join and leaves the table it was to replace as it was."""
    table, (s0, s1, s2) = cut
    out = tmp_path / "w.npy"
    assert _commit(s1, {2: -1.0}) == 1  # rank 1 alone: a torn commit, and not compacted
    with pytest.raises(TableFormatError, match=rf"written rows not yet compacted: rank 1's shard {s1} has 1 in its delta \(t.shard-1-of-3.npy.delta\); expected none: run `tiered-store compact SHARD` on it first"):  # fmt: skip
        join_shards(table, out, ranks=3, progress=False)
    compact_table(s1, progress=False)
    with pytest.raises(ShardMismatchError, match=rf"committed at different steps \(rank 0 \({s0}\): 0; rank 1 \({s1}\): 1; rank 2 \({s2}\): 0\).*resume from step 0 and commit up to step 1 again"):  # fmt: skip
        join_shards(table, out, ranks=3, progress=False)
    compacted = current_version(s1)[0]  # t.shard-1-of-3.g1.npy: the shard's rows now
    with pytest.raises(TableFormatError, match=rf"out {compacted} is rank 1's shard"):
        join_shards([s0, s1, s2], compacted, overwrite=True, progress=False)
    for shard in (s0, s2):
        assert _commit(shard, {}, 1) == 1  # the step redone on the other ranks
    with (
        pytest.warns(UncommittedWritesWarning),
        TieredStore.open({"table": {"path": str(s0)}}) as writer,
    ):
        writer.write([0], torch.zeros(1, 4))  # a store writing a shard meanwhile
        with pytest.raises(TierIOError, match="being written"):
            join_shards(table, out, ranks=3, progress=False)
    assert not out.exists()
    assert cli_main(["unshard", str(out), str(s2), str(s0), str(s1), "--quiet"]) == 0
    assert "from 3 shards, committed step 1" in capsys.readouterr().out
    want = np.arange(120, dtype=np.float32).reshape(30, 4)
    want[12] = -1.0
    assert np.array_equal(np.load(out), want)
    # a page of rank 2's shard flipped: refused, never given fresh checksums; the table that
    # was to be replaced stays as it was, and nothing is left of the new one
    with open(s2, "r+b") as f:
        f.seek(4096 + 5 * 16)
        f.write(b"\x7f")
    before = _listing(tmp_path)
    with pytest.raises(ChecksumError, match="its page checksum"):
        join_shards([s0, s1, s2], out, overwrite=True, progress=False)
    assert _listing(tmp_path) == before
    assert np.array_equal(np.load(out), want) and verify_table(out, progress=False)


def test_unshard_names_a_set_two_shard_runs_left_mixed_not_a_torn_commit(cut, tmp_path):
    """A `shard --overwrite` killed after its first rename (rank 0's shard new at step 0, the
    others old, trained to step 2) read as a torn commit: "resume from step 0 and commit up to
    step 2 again", which trains the old shards' rows twice. It is named a mixed set now."""
    table, (s0, s1, s2) = cut
    for shard in (s1, s2):
        for step in (1, 2):
            _commit(shard, {0: float(step)}, step)
        compact_table(shard, progress=False)
    new = write_shards(table, 3, "rows", template=str(tmp_path / ".new{rank}"), progress=False)
    replace_table(new[0].path, s0, True)  # the run's first rename, then it was killed
    with pytest.raises(ShardMismatchError, match=rf"{s1} was written by `tiered-store shard` run \w+, but {s0} by `tiered-store shard` run \w+: a mixed set .*not a torn commit"):  # fmt: skip
        join_shards(table, tmp_path / "w.npy", ranks=3, progress=False)
    assert not (tmp_path / "w.npy").exists()


def test_unshard_names_a_mixed_set_of_shards_from_a_release_before_run_ids_without_none(
    cut, tmp_path
):
    """Shards an older release cut (no run id), then a `shard --overwrite` killed after its first
    rename: the mixed set was named as "written by `tiered-store shard` run None"; the old
    shards' run is named as what it is."""
    table, (s0, s1, s2) = cut
    for shard in (s0, s1, s2):  # their metadata.shard as an older release wrote it: no run
        manifest = read_manifest(shard)
        doc = {k: v for k, v in manifest.metadata["shard"].items() if k != "run"}
        replace_metadata(shard, {**manifest.metadata, "shard": doc}, expected=manifest)
    new = write_shards(table, 3, "rows", template=str(tmp_path / ".new{rank}"), progress=False)
    replace_table(new[0].path, s0, True)  # the run's first rename, then it was killed
    with pytest.raises(ShardMismatchError) as raised:
        join_shards(table, tmp_path / "w.npy", ranks=3, progress=False)
    assert f"{s1} was written by a `tiered-store shard` run of a release before run ids, but {s0} by `tiered-store shard` run {new[0].run}: a mixed set" in str(raised.value)  # fmt: skip
    assert "None" not in str(raised.value)


def test_a_shard_set_rewritten_one_shard_at_a_time_stays_one_run(cut, tmp_path):
    """Every way a shard's manifest is written again keeps its run id: compaction (each shard
    at its own time, one twice), `verify --add-page-checksums`; such a set is never named mixed,
    and joins."""
    table, (s0, s1, s2) = cut
    run = read_shard(s0).run
    assert run is not None
    for step in (1, 2):
        for shard in (s0, s1, s2):
            _commit(shard, {step: -float(step)}, step)
        compact_table((s0, s1)[step - 1], progress=False)  # s0 after step 1, s1 after step 2
    compact_table(s2, progress=False)
    assert cli_main(["verify", "--add-page-checksums", str(s2), "--quiet"]) == 0
    compact_table(s0, progress=False)  # again: its step 2
    assert [read_shard(current_version(s)[0]).run for s in (s0, s1, s2)] == [run] * 3
    join_shards(table, tmp_path / "w.npy", ranks=3, progress=False)


def _train_and_compact(shards: list[Path], step: int) -> None:
    """Every shard commits ``step`` (its row 0 written ``step`` on rank 0), then is compacted."""
    for rank, shard in enumerate(shards):
        _commit(shard, {0: float(step)} if rank == 0 else {}, step)
        compact_table(shard, progress=False)


def test_unshard_overwrite_refuses_a_table_neither_the_shards_source_nor_their_join(
    cut, tmp_path, capsys
):
    """`unshard --overwrite` replaced whatever table TABLE was: a 7 x 4 table went for the 30 x 4
    join of another table's shards without a word. TABLE must be the table the shards were cut
    from or an earlier join of them; another (of another shape, of the same shape, the join of
    another shard set) is refused naming both, and left as it was."""
    table, shards = cut
    info = read_shard(shards[0])
    theirs = (
        rf"the shards \(rank 0's {shards[0]}, of 3\) were cut from table version "
        rf"{info.shard_map.table_version} \(30 x 4\) by `tiered-store shard` run {info.run}; "
        "expected, to overwrite it, the table they were cut from or an earlier unshard of them: "
        "remove it first if it is to be replaced"
    )
    other = tmp_path / "other.npy"
    create_table(other, np.ones((7, 4), np.float32), progress=False)
    with pytest.raises(ShardMismatchError, match=rf"^out {other} is a 7 x 4 float32 table of version \w+, not an unshard of shards, but {theirs}$"):  # fmt: skip
        join_shards(shards, other, overwrite=True, progress=False)
    assert np.array_equal(np.load(other), np.ones((7, 4), np.float32))
    same = tmp_path / "same.npy"
    create_table(same, np.zeros((30, 4), np.float32), progress=False)
    argv = ["unshard", str(same), "--overwrite", *map(str, shards), "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"out {same} is a 30 x 4 float32 table of version " in err and "not an unshard" in err
    assert np.array_equal(np.load(same), np.zeros((30, 4), np.float32))
    plain = tmp_path / "plain.npy"  # not a table: no manifest
    np.save(plain, np.zeros((30, 4), np.float32))
    with pytest.raises(ShardMismatchError, match=rf"^out {plain} is not a table that can be read \(.*manifest.*\), but {theirs}$"):  # fmt: skip
        join_shards(shards, plain, overwrite=True, progress=False)
    _commit(same, {0: 1.0})
    compact_table(same, progress=False)  # same.g1.npy: a version's file, not a table's name
    with pytest.raises(ConfigError, match=r"same\.g1\.npy: generation 1 of table same\.npy"):
        join_shards(shards, tmp_path / "same.g1.npy", overwrite=True, progress=False)
    (tmp_path / "folder.npy").mkdir()  # as before: a folder is in the way
    with pytest.raises(TierIOError, match="a directory is in the way"):
        join_shards(shards, tmp_path / "folder.npy", overwrite=True, progress=False)
    # the join of another shard set of the table (another run, trained): not this set's
    others = [
        s.path
        for s in write_shards(table, 3, "rows", template=str(tmp_path / "b{rank}"), progress=False)
    ]
    their_run = read_shard(others[0]).run
    _train_and_compact(others, 1)
    joined = tmp_path / "joined.npy"
    join_shards(others, joined, progress=False)
    record = read_manifest(joined).metadata["joined_from"]
    assert record == {"table_version": info.shard_map.table_version, "run": their_run}
    with pytest.raises(ShardMismatchError, match=rf"^out {joined} is a 30 x 4 float32 table of version \w+, an unshard of the shards of table version {record['table_version']} cut by `tiered-store shard` run {record['run']}, but {theirs}$"):  # fmt: skip
        join_shards(shards, joined, overwrite=True, progress=False)
    assert read_manifest(joined).metadata["joined_from"] == record
    assert np.load(joined)[0, 0] == 1.0


@pytest.mark.parametrize("release", ["now", "before run ids"])
def test_unshard_overwrite_takes_the_source_table_then_its_earlier_join_as_training_goes_on(
    cut, release
):
    """The normal cycle: unshard over the table the shards were cut from, train the shards
    more, unshard again over that join (compacted meanwhile, as any table may be); shards of a
    release that recorded no run id go round it too."""
    table, shards = cut
    if release != "now":  # their metadata.shard as an older release wrote it: no run
        for shard in shards:
            manifest = read_manifest(shard)
            doc = {k: v for k, v in manifest.metadata["shard"].items() if k != "run"}
            replace_metadata(shard, {**manifest.metadata, "shard": doc}, expected=manifest)
    info = read_shard(shards[0])
    record = {"table_version": info.shard_map.table_version, "run": info.run}
    assert (info.run is None) == (release != "now")
    want = np.arange(120, dtype=np.float32).reshape(30, 4)
    _train_and_compact(shards, 1)
    join_shards(table, ranks=3, overwrite=True, progress=False)  # over the source table
    assert read_manifest(table).metadata == {"committed_step": 1, "joined_from": record}
    with TieredStore.open({"table": {"path": str(table)}}) as store:  # its writes are dropped
        store.write([20], torch.full((1, 4), -5.0))
        store.commit()
    compact_table(table, progress=False)
    _train_and_compact(shards, 2)
    join_shards(table, ranks=3, overwrite=True, progress=False)  # over the earlier join
    want[0] = 2.0
    assert np.array_equal(np.load(table), want)
    assert read_manifest(table).metadata == {"committed_step": 2, "joined_from": record}


def test_unshard_refuses_a_shard_holding_the_staged_rows_of_an_interrupted_sharded_commit(
    cut, tmp_path
):
    """A sharded commit interrupted between its two phases leaves a shard's rows staged beside
    its last commit: folding the shards then would drop a step the other shards may hold. The
    join is refused, naming the shard and what resolves it; once the staged rows are dropped,
    the shards join as they were committed."""
    table, (s0, s1, s2) = cut
    out = tmp_path / "w.npy"
    with (
        pytest.warns(UncommittedWritesWarning),
        TieredStore.open({"table": {"path": str(s1)}}) as store,
    ):
        store.write([2], torch.full((1, 4), -1.0))
        assert store.prepare_commit(1) == 1
        assert (store.staged_step, store.committed_step) == (1, 0)
    with pytest.raises(TableFormatError, match=r"t\.shard-1-of-3\.npy\.delta holds step 1 staged by a sharded commit that was interrupted between its two phases; expected none staged: open the shards with ShardedStore \(on every rank\) to finish or drop it"):  # fmt: skip
        join_shards(table, out, ranks=3, progress=False)
    assert not out.exists()
    with TieredStore.open({"table": {"path": str(s1)}}) as store:
        store.abort_commit()
        assert (store.staged_step, store.committed_step) == (None, 0)
    join_shards(table, out, ranks=3, progress=False)
    assert np.array_equal(np.load(out), np.arange(120, dtype=np.float32).reshape(30, 4))


def test_the_unshard_command_names_the_shards_it_needs(cut, tmp_path, capsys):
    table, _ = cut
    for argv, said in (
        ([], "no shards: expected --ranks N"),
        ([str(tmp_path / "x.npy"), "--ranks", "3"], "--ranks 3 with shard files"),
        (["--shards", "s{rank}"], "--shards 's{rank}' without --ranks"),
        (["--ranks", "3", "--shards", "s.npy"], "expected a path template containing {rank}"),
        (["--ranks", "0"], "--ranks: got 0"),
    ):
        assert cli_main(["unshard", str(tmp_path / "w.npy"), *argv, "--quiet"]) == 2, argv
        assert said in capsys.readouterr().err, argv
    # TABLE left out: the first shard taken as the table to write was "no shard of rank(s) 0"
    _, (s0, s1, s2) = cut
    before = _listing(tmp_path), s0.read_bytes()
    assert cli_main(["unshard", str(s0), str(s1), str(s2), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"tiered-store unshard: error: out {s0} is rank 0's shard of 3, the rank the shards given "
        "lack; expected the whole table to write as out, then every rank's shard (on the command "
        "line the table comes first: `tiered-store unshard TABLE SHARD...`)\n"
    )
    assert (_listing(tmp_path), s0.read_bytes()) == before
    assert cli_main(["unshard", str(tmp_path / "w.npy"), "--ranks", "3", "--quiet"]) == 2
    assert f"rank 0's shard {tmp_path / 'w.shard-0-of-3.npy'} (of 3) does not exist" in capsys.readouterr().err  # fmt: skip
    argv = ["unshard", str(tmp_path / "w.npy"), "--ranks", "3", "--quiet", "--shards"]
    assert cli_main([*argv, str(tmp_path / "t.shard-{rank}-of-{ranks}.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "w.npy"), np.load(table))
    info = read_shard(s0)
    assert read_manifest(tmp_path / "w.npy").metadata == {
        "joined_from": {"table_version": info.shard_map.table_version, "run": info.run}
    }


def test_the_unshard_command_takes_shard_files_after_its_options(cut, tmp_path, capsys):
    """`unshard OUT --overwrite S...` (an option between OUT and the shards, or among them) was
    refused as "unrecognized arguments: S..."; shards after --ranks were too, not as shards
    given with --ranks; with no TABLE, argparse named SHARD as required too."""
    table, (s0, s1, s2) = cut
    out = tmp_path / "w.npy"
    join_shards([s0, s1, s2], out, progress=False)  # an earlier join, to be replaced
    argv = ["unshard", str(out), "--overwrite", str(s2), "--quiet", str(s0), str(s1)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out and np.array_equal(np.load(out), np.load(table))
    assert cli_main(["unshard", str(out), "--ranks", "3", str(s0), "--quiet"]) == 2
    assert "--ranks 3 with shard files; expected one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["unshard", "--ranks", "3"])
    assert capsys.readouterr().err.endswith("the following arguments are required: table\n")


_UNSHARD_KILLED_PART_WAY = r"""
import functools, os, signal, sys
from tiered_store import table_format
from tiered_store.distributed import shard_join
# small chunks, and a kill -9 at the third: the new table part written, under hidden names
shard_join.create_table = functools.partial(table_format.create_table, chunk_bytes=4096)
read, calls = shard_join._JoinedRows.read, []
def read_then_die(self, start, stop):
    calls.append(start)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, start, stop)
shard_join._JoinedRows.read = read_then_die
shard_join.join_shards(sys.argv[1], ranks=3, overwrite=True, progress=False)
"""


def test_an_unshard_killed_part_way_leaves_no_half_table_and_a_rerun_finishes(tmp_path):
    """kill -9 while the shards are streamed over the table they were cut from: the new table
    was under hidden names alone (the old one opens as it was, never half replaced), no shard's
    writer lock is left held, and the same call run again writes the whole table."""
    from tests import forkserver

    tables = tmp_path / "tables"
    tables.mkdir()
    table = tables / "t.npy"
    create_table(table, np.arange(12_000, dtype=np.float32).reshape(3000, 4), progress=False)
    shards = [s.path for s in write_shards(table, 3, "rows", progress=False)]
    assert _commit(shards[2], {9: -1.0}, 1) == 1 and _commit(shards[0], {}, 1) == 1
    assert _commit(shards[1], {}, 1) == 1
    compact_table(shards[2], progress=False)
    script = tmp_path / "killed.py"
    script.write_text(_UNSHARD_KILLED_PART_WAY)
    killed = forkserver.run_python([script, table])
    assert killed.returncode == -9, killed.stderr[-2000:]
    want = np.arange(12_000, dtype=np.float32).reshape(3000, 4)  # the old table, as it was
    assert np.array_equal(np.load(table), want) and verify_table(table, progress=False)
    left = {p.name for p in tables.iterdir()} - {p.name for p in tables.glob("t*")}
    assert left and all(n.startswith(".t.npy.") and n.endswith(".tmp") for n in left), left
    join_shards(table, ranks=3, overwrite=True, progress=False)  # no lock left behind
    want[2009] = -1.0
    assert np.array_equal(np.load(table), want) and verify_table(table, progress=False)


def test_shards_and_their_join_keep_the_tables_checksum_block_size(tmp_path):
    """Cut into shards and joined back, a table made with 8 KiB checksum blocks was written with
    the default 1 MiB blocks (one block for a whole small shard); compaction keeps the block
    size its maker chose, and so do shards and the joined table."""
    rng = np.random.default_rng(0)
    table = tmp_path / "t.npy"
    data = rng.standard_normal((600, 16)).astype(np.float32)  # 38,400 B: 5 blocks of 8 KiB
    create_table(table, data, block_bytes=8192, progress=False)
    shards = write_shards(table, 2, "rows", progress=False)
    assert [read_manifest(s.path).block_bytes for s in shards] == [8192, 8192]
    assert [s.manifest.block_bytes for s in shards] == [8192, 8192]
    whole = join_shards([s.path for s in shards], tmp_path / "whole.npy", progress=False)
    assert whole.block_bytes == 8192 and verify_table(tmp_path / "whole.npy", progress=False)
    assert np.array_equal(np.load(tmp_path / "whole.npy"), data)


def test_a_huge_rank_count_is_refused_at_once_not_after_a_path_per_rank(cut, tmp_path):
    """``shard --ranks 99999999999`` of a 30-row table made a path per rank before checking the
    count against the rows (8.5 GB and ten minutes before it was killed), and ``unshard --ranks``
    did the same before finding rank 0's shard missing; both are refused before any path."""
    table, _ = cut
    with pytest.raises(ConfigError, match=r"ranks: got 99999999999 for a table of 30 rows"):
        write_shards(table, 99_999_999_999, "rows", progress=False)
    with pytest.raises(TableNotFoundError, match=r"rank 0's shard .*of-99999999999\.npy \(of 9"):
        join_shards(table, tmp_path / "w.npy", ranks=99_999_999_999, progress=False)
    template = str(tmp_path / "t.shard-{rank}-of-3")
    with pytest.raises(ShardMismatchError, match=r"is rank 0's shard of 3; expected rank 0's of 9"):
        join_shards(table, tmp_path / "w.npy", ranks=99_999_999_999, template=template)


def test_the_unshard_command_checks_table_as_every_output_file(cut, tmp_path, monkeypatch, capsys):
    """unshard's TABLE was a plain path: 'joined/' (no such folder) wrote joined.npy, '-' wrote
    -.npy, and a folder where nothing can be written was refused for its free space after the
    shards were checked. It is checked as init's TABLE and every output file, before any work."""
    import os

    monkeypatch.chdir(tmp_path)
    os.mkfifo("f.npy")
    before = _listing(tmp_path)
    shards = ["--ranks", "3", "--shards", "t.shard-{rank}-of-{ranks}.npy", "--quiet"]
    for out, said in (
        ("joined/", "'joined/' ends in '/', a folder's name; expected a table file to write"),
        ("-", "'-' here would be a path named '-', not standard output; expected a table file"),
        ("f", "'f.npy' is a FIFO (named pipe); expected a file to write (or nothing there)"),
        ("no/w.npy", "'no/w.npy': 'no' does not exist; expected a file in an existing folder"),
        ("/proc/w.npy", "'/proc/w.npy': cannot write in '/proc' ("),
    ):
        with pytest.raises(SystemExit) as exited:
            cli_main(["unshard", out, *shards])
        assert exited.value.code == 2, out
        assert f"unshard: error: argument table: {said}" in capsys.readouterr().err, out
    assert _listing(tmp_path) == before
