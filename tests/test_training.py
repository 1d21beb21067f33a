"""Training through the store equals training in memory: every parameter compared after N steps."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import store_config
from tiered_store import TieredStore
from tiered_store.delta.row_optimizers import make_row_optimizer
from tiered_store.delta.trainable import TrainableTable, create_trainable_table
from tiered_store.engram.backend import InMemoryTable
from tiered_store.engram.config import ModelConfig
from tiered_store.engram.model import EngramLM
from tiered_store.errors import ConfigError, RowDataError, TableFormatError

ROWS, DIM = 300, 8
SMALL_TIERS = {"hot": {"capacity": 12}, "warm": {"capacity": 24}}  # 12% of the table: evictions


def _dense_step(table: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, opt, step: int):
    """The in-memory reference: the same row-wise arithmetic on the rows the step looked up."""
    touched = torch.unique(ids)
    table[touched] = opt.update(table[touched], grad[touched], step)


def _batch(rng, steps):
    """Zipf-skewed id batches (a few hot rows, a long tail) and regression targets."""
    for _ in range(steps):
        ids = torch.from_numpy(np.minimum(rng.zipf(1.3, (6, 5)) - 1, ROWS - 1))
        yield ids, torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32))


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adam"])
def test_store_training_equals_in_memory_training(tmp_path, name):
    opt = make_row_optimizer(name, lr=0.05)
    rng = np.random.default_rng(0)
    init = torch.from_numpy(rng.standard_normal((ROWS, DIM)).astype(np.float32))
    path = tmp_path / "t.npy"
    create_trainable_table(path, init, opt)
    head = torch.nn.Linear(DIM, 3)
    ref_head = copy.deepcopy(head)
    reference = torch.cat([init, torch.zeros(ROWS, opt.state_width(DIM))], 1)
    table = TrainableTable(TieredStore(store_config(path, **SMALL_TIERS)), opt)
    sgd, ref_sgd = (torch.optim.SGD(h.parameters(), lr=0.05) for h in (head, ref_head))
    committed = None
    for step, (ids, target) in enumerate(_batch(np.random.default_rng(1), 40), start=1):
        loss = (head(table.lookup(ids).sum(1)) - target).pow(2).mean()
        sgd.zero_grad()
        loss.backward()
        table.step(step)
        sgd.step()
        weights = reference[:, :DIM].clone().requires_grad_(True)
        ref_loss = (ref_head(weights[ids].sum(1)) - target).pow(2).mean()
        ref_sgd.zero_grad()
        ref_loss.backward()
        _dense_step(reference, weights.grad, ids, opt, step)
        ref_sgd.step()
        assert torch.equal(loss, ref_loss), step
        if step % 9 == 0:
            table.commit(step)
            committed = reference.clone()
    assert table.store.stats()["writes"]["spilled_rows"] > 0  # write-back on eviction happened
    assert torch.equal(table.store.lookup(torch.arange(ROWS)), reference)  # weights and state
    for p, q in zip(head.parameters(), ref_head.parameters(), strict=True):
        assert torch.equal(p, q)
    table.close()
    with TieredStore(store_config(path, **SMALL_TIERS)) as store:  # durable: the last commit
        assert store.committed_step == 36
        assert torch.equal(store.lookup(torch.arange(ROWS)), committed)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_row_optimizers_match_torch_optimizers(name):
    """SGD and Adam's row-wise arithmetic against torch.optim.SGD / SparseAdam (the touched rows)."""
    opt = make_row_optimizer(name, lr=0.01)
    rng = np.random.default_rng(2)
    weight = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((50, 4)).astype(np.float32)))
    torch_opt = (
        torch.optim.SGD([weight], lr=0.01)
        if name == "sgd"
        else torch.optim.SparseAdam([weight], lr=0.01)
    )
    rows = torch.cat([weight.detach().clone(), torch.zeros(50, opt.state_width(4))], 1)
    for step in range(1, 30):
        ids = torch.from_numpy(rng.integers(0, 50, 12))
        grad_rows = torch.from_numpy(rng.standard_normal((12, 4)).astype(np.float32))
        dense = torch.zeros(50, 4).index_add_(0, ids, grad_rows)
        weight.grad = dense if name == "sgd" else _rows_only(dense, ids)
        torch_opt.step()
        touched = torch.unique(ids)
        rows[touched] = opt.update(rows[touched], dense[touched], step)
    torch.testing.assert_close(rows[:, :4], weight.detach(), rtol=1e-6, atol=1e-7)


def _rows_only(dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A sparse gradient with an entry for every touched row (as nn.Embedding(sparse=True))."""
    touched = torch.unique(ids)
    return torch.sparse_coo_tensor(
        touched[None], dense[touched], dense.shape, check_invariants=True
    ).coalesce()


ENGRAM = {
    "engram": {
        "engram_vocab_size": [2003, 3001],
        "n_embed_per_ngram": 64,
        "n_head_per_ngram": 4,
        "layer_ids": [1],
    },
    "backbone": {"hidden_size": 32, "hc_mult": 2, "num_layers": 2},
}


def test_engram_lm_trains_through_the_store_as_in_memory(tmp_path):
    """EngramLM: the Engram table in a small-tiered store vs an in-memory table, row-wise Adagrad
    on the table and SGD on the dense weights: every parameter equal after the steps."""
    cfg = ModelConfig.from_dict(ENGRAM)
    torch.manual_seed(0)
    reference = EngramLM(cfg)
    model = copy.deepcopy(reference)
    opt = make_row_optimizer("rowwise_adagrad", lr=0.1)
    init = reference.tables[1].weight.detach()
    path = tmp_path / "layer1.npy"
    create_trainable_table(path, init, opt)
    rows = init.shape[0]
    tiers = {"hot": {"capacity": rows // 100}, "warm": {"capacity": rows // 50}}
    table = TrainableTable(TieredStore(store_config(path, **tiers)), opt)
    model.set_tables({1: table})
    ref_rows = torch.cat([init, torch.zeros(rows, 1)], 1)
    text = Path(torch.__file__).read_text()[:4000]
    tokens = torch.from_numpy(model.hasher.tokenizer.encode(text)[: 4 * 65].reshape(4, 65))
    ref_table = reference.tables[1]
    ref_dense = [p for p in reference.parameters() if p is not ref_table.weight]
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)  # the store's table is no parameter
    ref_sgd = torch.optim.SGD(ref_dense, lr=0.01)
    for step in range(1, 5):
        batch = tokens[:, (step - 1) * 16 : (step - 1) * 16 + 17]
        sgd.zero_grad()
        model.loss(batch).backward()
        sgd.step()
        table.step(step)
        hashed = reference.hash(batch)
        ref_sgd.zero_grad()
        ref_table.weight.grad = None
        reference.loss(batch).backward()
        ref_sgd.step()
        _dense_step(ref_rows, ref_table.weight.grad, hashed.row_ids[1], opt, step)
        with torch.no_grad():
            ref_table.weight.copy_(ref_rows[:, :-1])
    got = dict(model.named_parameters())
    assert len(got) == len(ref_dense)
    for name, p in reference.named_parameters():
        if p is not ref_table.weight:
            assert torch.equal(got[name], p), name
    assert table.store.stats()["writes"]["spilled_rows"] > 0
    assert torch.equal(table.store.lookup(torch.arange(rows)), ref_rows)
    assert isinstance(reference.tables[1], InMemoryTable)
    table.close()


@pytest.mark.gpu
def test_training_with_a_cuda_hot_tier(tmp_path):
    """Rows updated where they are cached on the GPU, written back to host RAM and the delta:
    the same rows as the CPU in-memory reference (float rounding of the GPU's arithmetic), with
    a step's ids given on both devices."""
    opt = make_row_optimizer("adam", lr=0.05)
    init = torch.from_numpy(
        np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    )
    path = tmp_path / "t.npy"
    create_trainable_table(path, init, opt)
    tiers = {"hot": {"capacity": 12, "device": "cuda"}, "warm": {"capacity": 24}}
    table = TrainableTable(TieredStore(store_config(path, **tiers)), opt)
    reference = torch.cat([init, torch.zeros(ROWS, opt.state_width(DIM))], 1)
    for step, (ids, _) in enumerate(_batch(np.random.default_rng(1), 20), start=1):
        # half the batch's ids on the GPU, half on the CPU (as a hasher gives them): one step
        on_gpu, on_cpu = table.lookup(ids[:3].cuda()), table.lookup(ids[3:])
        (on_gpu.pow(2).sum() + on_cpu.pow(2).sum()).backward()
        table.step(step)
        weights = reference[:, :DIM].clone().requires_grad_(True)
        weights[ids].pow(2).sum().backward()
        _dense_step(reference, weights.grad, ids, opt, step)
        if step % 7 == 0:
            table.commit(step)
    assert table.store.stats()["writes"]["spilled_rows"] > 0
    got = table.store.lookup(torch.arange(ROWS)).cpu()
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    table.close()


@pytest.mark.gpu
def test_a_cuda_grad_scaler_under_float16_autocast_with_a_cuda_hot_tier(tmp_path):
    """float16 autocast on the GPU, a CUDA GradScaler and rows cached on the GPU: the steps the
    scaler does not skip move the rows as an unscaled float32 run does (to float16's rounding),
    and an overflowed step changes nothing and halves the scale."""
    plain, scaled = _two_tables(tmp_path, "sgd")  # a missed unscale moves rows 2**16 too far
    tiers = {"hot": {"capacity": 12, "device": "cuda"}, "warm": {"capacity": 24}}
    scaled.close()
    scaled = TrainableTable(
        TieredStore.open(store_config(tmp_path / "scaled.npy", **tiers)), scaled.optimizer
    )
    head = torch.nn.Linear(DIM, 3).cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    for step, (ids, target) in enumerate(_batch(np.random.default_rng(7), 8), start=1):
        target = target.cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = (head(scaled.lookup(ids.cuda()).sum(1)) - target).pow(2).mean()
        scaler.scale(loss * (float("inf") if step == 3 else 1.0)).backward()
        applied = scaled.step(scaled.last_step + 1, scaler)
        scaler.update()
        if step == 3:
            assert applied == 0 and scaled.skipped_steps == 1
            continue
        (head(plain.lookup(ids).cuda().sum(1)) - target).pow(2).mean().backward()
        assert plain.step(plain.last_step + 1) == applied
        head.zero_grad()
    assert scaled.last_step == plain.last_step == 7
    got, want = (t.store.lookup(torch.arange(ROWS)).cpu() for t in (scaled, plain))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    _commit_and_close(plain, scaled)


def test_bad_optimizer_arguments_are_config_errors():
    from tiered_store.errors import ConfigError

    for kwargs, why in [
        ({"lr": "0.1"}, r"optimizer\.lr: '0\.1'; expected a positive finite"),
        ({"lr": None}, r"optimizer\.lr: None; expected a positive finite"),
        ({"lr": 0.1, "betaX": 0.3}, r"optimizer\.betaX: unknown option; expected one of"),
        ({"lr": 0.1, "beta1": 1.0}, r"optimizer\.beta1: 1\.0; expected 0 <= beta1 < 1"),
        ({"lr": 0.1, "eps": -1.0}, r"optimizer\.eps: -1\.0; expected a finite eps > 0"),
        # a flag passed for a number: True was a learning rate (or eps) of 1, False a beta of 0
        ({"lr": True}, r"optimizer\.lr: True; expected a positive finite"),
        ({"lr": 0.1, "eps": True}, r"optimizer\.eps: True; expected a finite eps > 0"),
        ({"lr": 0.1, "beta1": False}, r"optimizer\.beta1: False; expected 0 <= beta1 < 1"),
    ]:
        with pytest.raises(ConfigError, match=why):
            make_row_optimizer("adam", **kwargs)


def test_numpy_and_torch_bools_are_refused_as_numbers_as_pythons_are():
    """make_row_optimizer refused True for a learning rate but took NumPy's (np.True_: a learning
    rate of 1) and a torch bool tensor, and np.False_ for a beta (0): a flag from an array passed
    for a number trained silently; every bool is refused by name."""
    for kwargs, why in [
        ({"lr": np.True_}, r"optimizer\.lr: np\.True_; expected a positive finite"),
        ({"lr": 0.1, "beta1": np.False_}, r"optimizer\.beta1: np\.False_; expected 0 <= beta1"),
        ({"lr": 0.1, "eps": torch.tensor(True)}, r"optimizer\.eps: tensor\(True\); expected a"),
    ]:
        with pytest.raises(ConfigError, match=why):
            make_row_optimizer("adam", **kwargs)
    assert make_row_optimizer("adam", lr=np.float32(0.5), beta1=np.float64(0.5)).lr == 0.5


def test_an_array_of_numbers_for_a_number_is_refused_by_name():
    """make_row_optimizer given an array of several numbers for a learning rate or a beta failed
    with NumPy's or torch's bare 'truth value ... is ambiguous' (ValueError, RuntimeError),
    naming neither the option nor the value; it is refused as any value that is not a number."""
    for kwargs, why in [
        ({"lr": np.array([0.1, 0.2])}, r"optimizer\.lr: array\(\[0\.1, 0\.2\]\); expected a"),
        ({"lr": torch.tensor([0.1, 0.2])}, r"optimizer\.lr: tensor\(\[0\.1000, 0\.2000\]\); exp"),
        ({"lr": 0.1, "beta1": np.array([0.1, 0.2])}, r"optimizer\.beta1: array\(.*expected 0 <="),
        ({"lr": 0.1, "eps": np.array([1e-8, 1e-9])}, r"optimizer\.eps: array\(.*expected a finite"),
    ]:
        with pytest.raises(ConfigError, match=why):
            make_row_optimizer("adam", **kwargs)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adam"])
def test_eps_zero_is_refused_as_it_makes_a_touched_row_nan(name):
    """eps=0 was accepted: a touched row with a zero gradient and zero state became NaN
    (0 / (sqrt(0) + 0)), and was committed; torch.optim.SparseAdam refuses it too."""
    from tiered_store.errors import ConfigError

    for eps in (0.0, 1e-46, 5e-324):  # and those that are 0 in float32, as the rows are
        with pytest.raises(ConfigError, match=rf"optimizer\.eps: {eps}; expected a finite eps > 0"):
            make_row_optimizer(name, lr=0.1, eps=eps)
    opt = make_row_optimizer(name, lr=0.1, eps=1e-12)  # the smallest eps still gives numbers
    rows = torch.cat([torch.ones(1, 4), torch.zeros(1, opt.state_width(4))], 1)
    assert torch.equal(opt.update(rows, torch.zeros(1, 4), step=1), rows)


def test_a_table_without_optimizer_state_is_refused_by_a_stateful_optimizer(tmp_path):
    from tests.conftest import make_table
    from tiered_store.errors import ConfigError

    path, _ = make_table(tmp_path, rows=50, dim=12)
    for name in ("rowwise_adagrad", "adam"):  # adagrad took the last weight as its accumulator
        why = rf"{name!r} keeps .* state values per row.*no optimizer state.*create_trainable_table"
        with TieredStore(store_config(path)) as store, pytest.raises(ConfigError, match=why):
            TrainableTable(store, make_row_optimizer(name, lr=0.1))
    with TieredStore(store_config(path)) as store:  # sgd keeps none: the rows are the weights
        assert TrainableTable(store, make_row_optimizer("sgd", lr=0.1)).dim == 12


def test_empty_weights_are_refused_naming_their_own_shape(tmp_path):
    """create_trainable_table of weights [0, 4] for Adam said 'source tensor has shape (0, 12)':
    the rows with their state, a shape the caller never gave. It names the weights' shape."""
    adam = make_row_optimizer("adam", lr=0.1)
    for shape in ((0, 4), (4, 0)):
        why = rf"^weights: shape \({shape[0]}, {shape[1]}\); expected \[rows, dim\] with rows >= 1"
        with pytest.raises(TableFormatError, match=why):
            create_trainable_table(tmp_path / "t.npy", np.zeros(shape, np.float32), adam)
    assert list(tmp_path.iterdir()) == []


def test_a_table_of_packed_quantised_rows_is_refused_before_any_step(tmp_path):
    """fp8 rows (packed codes and scales) are read-only: a TrainableTable over them (sgd, which
    keeps no state) was made, and a whole forward and backward ran before step() failed on the
    store's write; it is refused when made, naming the table."""
    from tiered_store.quantization import RowQuantization
    from tiered_store.table_format import create_table

    q = RowQuantization(values=256, block=32)
    path = tmp_path / "fp8.npy"
    create_table(path, np.zeros((4, q.packed_bytes), np.uint8), quantization=q, progress=False)
    why = r"^table: fp8\.npy holds packed quantised rows .* read-only; expected a table of float"
    for name in ("sgd", "adam"):
        with TieredStore(store_config(path)) as store, pytest.raises(ConfigError, match=why):
            TrainableTable(store, make_row_optimizer(name, lr=0.1))


def test_another_optimizers_table_is_refused_naming_the_optimizer_it_holds(tmp_path):
    """A table create_trainable_table made for rowwise_adagrad, opened with adam or sgd, was
    refused for its row width ('make the table with create_trainable_table', which made it);
    the refusal names the optimizer whose state it holds."""
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.zeros((5, 4)), make_row_optimizer("rowwise_adagrad", lr=0.1))
    for name in ("adam", "sgd"):
        why = rf"^optimizer: {name!r} but t\.npy holds the state of 'rowwise_adagrad'; expected"
        with TieredStore(store_config(path)) as store, pytest.raises(ConfigError, match=why):
            TrainableTable(store, make_row_optimizer(name, lr=0.1))


def test_an_optimizer_that_is_not_a_row_optimizer_is_refused_by_name(tmp_path):
    """An optimizer's name ("adam", as train's settings take it) or None for the RowOptimizer
    failed with a bare AttributeError ("'str' object has no attribute 'state_width'"), in
    create_trainable_table as in TrainableTable; a ConfigError names it and what is expected."""
    path = tmp_path / "t.npy"
    for bad in ("adam", None):
        why = rf"^optimizer: {type(bad).__name__} {bad!r}; expected a RowOptimizer \(make_row_optimizer"
        with pytest.raises(ConfigError, match=why):
            create_trainable_table(path, np.zeros((5, 2)), bad)
        assert not path.exists()
    create_trainable_table(path, np.zeros((5, 2)), make_row_optimizer("sgd", lr=0.1))
    for bad in ("adam", None):
        why = rf"^optimizer: {type(bad).__name__} {bad!r}; expected a RowOptimizer \(make_row_optimizer"
        with TieredStore(store_config(path)) as store, pytest.raises(ConfigError, match=why):
            TrainableTable(store, bad)


def test_step_numbers_are_checked_before_the_gradients_are_used(tmp_path):
    from tiered_store.errors import ConfigError

    adam = make_row_optimizer("adam", lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((20, 2)), adam)
    table = TrainableTable(TieredStore(store_config(path)), adam)
    table.lookup([3, 4]).sum().backward()  # a list of ids, as store.lookup takes
    # True was taken as step 1 (operator.index), where the store's commit refuses a bool step
    for bad, why in [(0, "expected an integer >= 1"), (1.5, "expected an integer >= 1"),
                     (True, "expected an integer >= 1")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"step: {bad}; {why}"):
            table.step(bad)
    assert table.step(1) == 2  # the refused steps kept the gradients
    table.lookup(torch.tensor([3])).sum().backward()
    with pytest.raises(ConfigError, match="step: 1; expected more than the last step, 1"):
        table.step(1)
    assert table.step(2) == 1
    table.close()


def test_a_step_whose_write_is_refused_keeps_its_gradients(tmp_path):
    """Infinite gradients make rows the store refuses to write: no row changes, and the step's
    gradients stay for the next (they were dropped first: the next step updated no row)."""
    from tiered_store.errors import RowDataError

    sgd = make_row_optimizer("sgd", lr=0.5)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((20, 2)), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    table.lookup([3, 4]).sum().mul(float("inf")).backward()
    for step in (1, 2):
        with pytest.raises(RowDataError, match="finite"):
            table.step(step)
    assert table.store.lookup([3, 4]).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    table.zero_grad()
    assert table.step(1) == 0
    table.close()


def test_a_step_whose_write_raised_once_it_applied_is_not_applied_again(tmp_path):
    """A store write that raises part way (out of memory copying the rows to the hot tier)
    applies whole: the step kept its gradients and its step number as if no row had changed,
    and the next step applied them a second time. A step whose rows were written is made."""
    sgd = make_row_optimizer("sgd", lr=0.5)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((20, 2)), sgd)
    store = TieredStore(store_config(path, hot={"capacity": 4}, warm={"capacity": 8}))
    table = TrainableTable(store, sgd)
    table.lookup([3, 4]).sum().backward()  # the rows cached in both tiers
    store.write([19], torch.ones(1, 2))  # the write-back exists

    def out_of_memory(slots, rows):
        del store.hot_pool.write  # once
        raise MemoryError("out of memory copying the rows to the hot tier")

    store.hot_pool.write = out_of_memory
    with pytest.raises(MemoryError):
        table.step(1)
    assert store.lookup([3, 4]).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert table.step(2) == 0  # no gradients left
    assert store.lookup([3, 4]).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    table.commit(2)
    table.close()


def test_ids_outside_a_table_read_as_zeros_get_no_update(tmp_path):
    """Over a store with ``out_of_range: zero``, lookups of ids outside the table (zero rows) kept
    gradients that step() wrote: RowIdError, on that step and every later one."""
    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.zeros((10, 2)), sgd)
    config = {"table": {"path": str(path), "out_of_range": "zero"}}
    table = TrainableTable(TieredStore.open(config), sgd)
    for step in (1, 2):
        table.lookup(torch.tensor([1, 12, -1])).sum().backward()
        assert table.step(step) == 1
    with torch.no_grad():
        assert table.lookup(torch.tensor([1, 12])).tolist() == [[-2.0, -2.0], [0.0, 0.0]]
    table.commit(2)
    table.close()


def test_a_slice_refuses_ids_outside_itself(tmp_path):
    from tiered_store.delta.trainable import TableSlice
    from tiered_store.errors import ConfigError, RowIdError

    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.arange(12.0).reshape(6, 2), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    with pytest.raises(ConfigError, match=r"slice: rows \[2, -1\)"):
        TableSlice(table, offset=2, rows=-3)
    first = TableSlice(table, offset=0, rows=3)
    assert first.lookup([0, 2]).tolist() == [[0.0, 1.0], [4.0, 5.0]]
    for bad in ([3], [-1]):  # the next layer's rows (or the previous one's) are not this slice's
        with pytest.raises(RowIdError, match=rf"slice: id {bad[0]} .* expected 0 <= id < 3"):
            first.lookup(torch.tensor(bad))
        with pytest.raises(RowIdError, match=rf"slice: id {bad[0]}"):
            first.prefetch(torch.tensor(bad))
    table.close()


def test_a_slice_refuses_an_offset_or_row_count_that_is_not_an_integer(tmp_path):
    """TableSlice(table, 1.5, 2) was made, and its lookups then failed on float row ids
    ('ids: dtype torch.float32'), naming neither the slice nor its offset; an offset of "1" was a
    bare TypeError. Both are refused when the slice is made, naming the value; NumPy integers
    are integers."""
    from tiered_store.delta.trainable import TableSlice
    from tiered_store.errors import ConfigError

    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.arange(12.0).reshape(6, 2), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    for offset, rows, why in (
        (1.5, 2, "offset 1.5"),
        ("1", 2, "offset '1'"),
        (0, True, "rows True"),
    ):
        with pytest.raises(ConfigError, match=rf"^slice: {why}; expected an integer$"):
            TableSlice(table, offset, rows)
    second = TableSlice(table, np.int64(3), np.int32(3))
    assert second.lookup([0]).tolist() == [[6.0, 7.0]]
    table.close()


def test_a_slice_adds_its_offset_without_wrapping_narrow_ids(tmp_path):
    """TableSlice added its offset in the ids' own dtype: int8 ids 99 at offset 200 became -57
    (refused as out of range), uint8 ones read row 43, as int32 ids would past 2**31 rows."""
    from tiered_store.delta.trainable import TableSlice

    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    data = np.arange(600.0).reshape(300, 2)
    create_trainable_table(path, data, sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    last = TableSlice(table, offset=200, rows=100)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        ids = torch.tensor([0, 99], dtype=dtype)
        assert last.lookup(ids).tolist() == data[[200, 299]].tolist(), dtype
        assert last.lookup(ids, last.prefetch(ids)).tolist() == data[[200, 299]].tolist()
    table.close()


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "adam"])
def test_a_step_with_non_finite_rows_names_the_row_id_and_the_cause(tmp_path, name):
    """A NaN gradient of row 7, or one whose square overflows float32, was refused as "rows: row 1
    holds a non-finite value": the row's place among the step's rows, read as another row's id."""
    from tiered_store.errors import RowDataError

    opt = make_row_optimizer(name, lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((10, 2)), opt)
    table = TrainableTable(TieredStore(store_config(path)), opt)
    before = table.store.lookup(torch.arange(10)).clone()
    grads = torch.tensor([[1.0, 1.0], [1.0, float("nan")]])
    (table.lookup(torch.tensor([3, 7])) * grads).sum().backward()
    with pytest.raises(RowDataError, match=r"step 1: the gradient of row 7 holds a non-finite"):
        table.step(1)
    table.zero_grad()
    if name != "sgd":  # finite, but its square is not: the optimizer state overflows
        (table.lookup(torch.tensor([3, 7])) * grads.nan_to_num(1e30)).sum().backward()
        with pytest.raises(RowDataError, match=rf"step 1: the {name} update of row 7 .* state"):
            table.step(1)
    assert torch.equal(table.store.lookup(torch.arange(10)), before)
    table.close()


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_step_over_a_stored_row_that_is_not_finite_names_the_row_not_the_gradient(tmp_path, name):
    """A stored row holding a NaN (a delta an older version wrote, whose writes were never
    checked) made step() blame its finite gradient: "its weights overflow float32: a gradient
    too large". It names the stored row, where its NaN is, and changes no row."""
    from tiered_store.delta.row_delta import RowDelta, delta_path

    opt = make_row_optimizer(name, lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((10, 2)), opt)
    width = 2 + opt.state_width(2)
    stored = np.ones((1, width), np.float32)
    stored[0, width - 1] = np.nan  # the last value: the weights when sgd, the state when adam
    delta = RowDelta(delta_path(path), 4 * width, create=True)
    delta.commit(np.array([7]), stored.view(np.uint8), 1)  # as an unchecked writer left it
    delta.close()
    table = TrainableTable(TieredStore(store_config(path)), opt)
    before = table.store.lookup(torch.arange(10)).clone()
    table.lookup(torch.tensor([3, 7])).sum().backward()
    part = "weights" if name == "sgd" else "optimizer state"
    with pytest.raises(RowDataError) as refused:
        table.step(2)
    assert str(refused.value).startswith(
        f"step 2: row 7 as stored holds a non-finite value (nan) in its {part}; expected finite "
        "stored rows"
    ), refused.value
    assert torch.equal(table.store.lookup(torch.arange(10)).nan_to_num(), before.nan_to_num())
    table.close()


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_stored_row_that_is_not_finite_is_named_though_it_made_every_gradient_nan(tmp_path, name):
    """A stored row's NaN weight, looked up, makes a model's loss NaN and with it every row's
    gradient, as in a training run: the step blamed the NaN gradient of the step's first row
    (row 3, whose stored values are finite), never the stored row behind it. It names row 7 as
    stored."""
    from tiered_store.delta.row_delta import RowDelta, delta_path

    opt = make_row_optimizer(name, lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((10, 2)), opt)
    width = 2 + opt.state_width(2)
    stored = np.ones((1, width), np.float32)
    stored[0, 1] = np.nan  # a weight
    delta = RowDelta(delta_path(path), 4 * width, create=True)
    delta.commit(np.array([7]), stored.view(np.uint8), 1)  # as an unchecked writer left it
    delta.close()
    table = TrainableTable(TieredStore(store_config(path)), opt)
    (table.lookup(torch.tensor([3, 7])).sum() ** 2).backward()  # every gradient NaN
    with pytest.raises(RowDataError) as refused:
        table.step(2)
    assert str(refused.value).startswith(
        "step 2: row 7 as stored holds a non-finite value (nan) in its weights; expected finite "
        "stored rows"
    ), refused.value
    table.close()


def test_an_fp16_step_over_a_stored_row_that_is_not_finite_names_it_rather_than_skipping(tmp_path):
    """fp16 autocast with a GradScaler: a stored row's NaN weight, looked up, makes every
    gradient NaN, which the step took for an overflow and skipped, as it did the next step and
    every one after (silently: the scale halved each time). A stored row that is not finite is
    no overflow: the step names it, as an fp32 step does, changes no row and keeps the
    gradients."""
    from tiered_store.delta.row_delta import RowDelta, delta_path

    sgd = make_row_optimizer("sgd", lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((10, 2)), sgd)
    stored = np.ones((1, 2), np.float32)
    stored[0, 1] = np.nan
    delta = RowDelta(delta_path(path), 8, create=True)
    delta.commit(np.array([7]), stored.view(np.uint8), 1)  # as an unchecked writer left it
    delta.close()
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    before = table.store.lookup(torch.arange(10)).clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    head = torch.nn.Linear(2, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = head(table.lookup(torch.tensor([3, 7]))).float().pow(2).mean()
    scaler.scale(loss).backward()
    with pytest.raises(RowDataError) as refused:
        table.step(2, scaler)
    assert str(refused.value).startswith(
        "step 2: row 7 as stored holds a non-finite value (nan) in its weights; expected finite "
        "stored rows"
    ), refused.value
    assert (table.skipped_steps, table.last_step) == (0, 1)
    assert torch.equal(table.store.lookup(torch.arange(10)).nan_to_num(), before.nan_to_num())
    with pytest.raises(RowDataError, match="^step 2: row 7 as stored"):  # the gradients kept
        table.step(2)
    table.close()


def test_ids_changed_in_place_before_backward_are_an_error_as_in_torch(tmp_path):
    """A reused id buffer refilled between lookup and backward: nn.Embedding's backward raises;
    the table's took the ids the buffer held then and updated those rows (7, never looked up)."""
    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.zeros((10, 2)), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    embedding = torch.nn.Embedding(10, 2)
    for lookup in (embedding, table.lookup):
        ids = torch.tensor([1, 2])
        loss = lookup(ids).sum()
        ids.fill_(7)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    assert table.step(1) == 0
    assert not table.store.lookup(torch.arange(10)).any()
    table.close()


def test_gradients_accumulated_over_a_refilled_id_buffer_reach_the_rows_looked_up(tmp_path):
    """Gradient accumulation over one id buffer, refilled after each backward (legal for
    nn.Embedding, whose backward is done then): the first micro-batch's gradients went to the rows
    the buffer held at step() (5 and 6 got both, 1 and 2 none)."""
    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.zeros((10, 2)), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    ids = torch.tensor([1, 2])
    table.lookup(ids).sum().backward()
    ids.copy_(torch.tensor([5, 6]))  # the next micro-batch
    table.lookup(ids).sum().backward()
    assert table.step(1) == 4
    got = table.store.lookup(torch.arange(10)).sum(1)
    assert got.tolist() == [0, -2, -2, 0, 0, -2, -2, 0, 0, 0]
    table.close()


def test_a_numpy_id_buffer_refilled_before_backward_sends_the_gradients_to_the_rows_read(
    tmp_path,
):
    """NumPy ids are read without a copy, and an array has no version counter that autograd
    checks: a buffer refilled between lookup and backward silently sent the gradients to the
    rows it held then (5 and 6, never looked up). The lookup keeps the ids it read."""
    sgd = make_row_optimizer("sgd", lr=1.0)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.zeros((10, 2)), sgd)
    table = TrainableTable(TieredStore(store_config(path)), sgd)
    ids = np.array([1, 2])
    loss = table.lookup(ids).sum()
    ids[:] = [5, 6]
    loss.backward()
    assert table.step(1) == 2
    got = table.store.lookup(torch.arange(10)).sum(1)
    assert got.tolist() == [0, -2, -2, 0, 0, 0, 0, 0, 0, 0]
    table.close()


def test_a_trainable_table_is_made_from_a_models_embedding_weight_as_it_is(tmp_path):
    """``create_trainable_table(path, embedding.weight, opt)`` raised numpy's "Can't call numpy()
    on Tensor that requires grad", and bfloat16 weights "unsupported ScalarType BFloat16"."""
    adam = make_row_optimizer("adam", lr=0.1)
    embedding = torch.nn.Embedding(10, 4)
    for name, weights in (("param", embedding.weight), ("bf16", embedding.weight.bfloat16())):
        path = tmp_path / f"{name}.npy"
        assert create_trainable_table(path, weights, adam).dim == 12
        with TieredStore(store_config(path)) as store:
            rows = store.lookup(torch.arange(10))
        assert torch.equal(rows[:, :4], weights.detach().float())
        assert not rows[:, 4:].any()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.nn.Embedding(10, 4, device="meta").weight, "is on the meta device"),
        (lambda: torch.eye(4).to_sparse(), "has layout torch.sparse_coo"),
        (  # its .shape raises: it was described with it
            lambda: torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)]),
            "is a nested tensor",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_trainable_table_refuses_a_tensor_without_rows_naming_it(tmp_path, make, expected):
    """A model's weight on the meta device (built for its shapes) or a sparse tensor failed with
    torch's bare NotImplementedError ('Cannot copy out of meta tensor') or RuntimeError, where
    create_table names the tensor and what to pass; it is refused so now, and no file is left."""
    path = tmp_path / "t.npy"
    with pytest.raises(TableFormatError, match=rf"source weights \(torch.Tensor .*\) {expected}"):
        create_trainable_table(path, make(), make_row_optimizer("adam", lr=0.1))
    assert not path.exists()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.ones(5, 4, dtype=torch.complex64), r"torch.Tensor complex64 \(5, 4\)"),
        (lambda: np.ones((5, 4), np.complex128), r"ndarray complex128 \(5, 4\)"),
        (lambda: torch.quantize_per_tensor(torch.ones(5, 4), 0.1, 0, torch.qint8), "qint8"),
        (lambda: np.array([[1.0, "a"]], dtype=object), r"ndarray object \(1, 2\)"),
    ],
)
def test_a_trainable_table_refuses_weights_that_are_not_real_numbers(tmp_path, make, expected):
    """Complex weights were written as their real parts (the imaginary ones dropped with only
    torch's ComplexWarning), where create_table refuses a complex source; a quantized tensor or an
    object array failed with torch's bare RuntimeError or TypeError. They are refused naming the
    weights' dtype, and no file is left."""
    path = tmp_path / "t.npy"
    with pytest.raises(TableFormatError, match=rf"source weights \(.*{expected}.*expected real"):
        create_trainable_table(path, make(), make_row_optimizer("adam", lr=0.1))
    assert not path.exists()


def test_a_reopened_table_goes_on_from_the_step_of_its_last_commit(tmp_path):
    """Adam's bias correction depends on the step: a reopened table restarted its step count at 0,
    so step(1) over state made at step 2 was taken (a bias correction for the wrong step). The
    commit carries the step; after a reopen the steps go on from it, and three steps with a
    reopen between equal three without."""
    adam = make_row_optimizer("adam", lr=0.1)
    ids, weights = torch.tensor([1, 3, 3]), torch.tensor([[1.0], [2.0], [-1.0]])

    def train(table, steps):
        for step in steps:
            (table.lookup(ids) * weights).sum().backward()
            table.step(step)

    paths = [tmp_path / "straight.npy", tmp_path / "reopened.npy"]
    for path in paths:
        create_trainable_table(path, np.ones((6, 2)), adam)
    straight = TrainableTable(TieredStore.open(store_config(paths[0])), adam)
    train(straight, (1, 2, 3))
    table = TrainableTable(TieredStore.open(store_config(paths[1])), adam)
    train(table, (1, 2))
    assert table.commit() == 2  # the last step applied
    table.close()
    table = TrainableTable(TieredStore.open(store_config(paths[1])), adam)
    (table.lookup(ids) * weights).sum().backward()
    with pytest.raises(
        ConfigError,
        match=r"step: 1; expected more than the last step, 2 \(the step of the table's last commit",
    ):
        table.step(1)  # the gradients are kept
    table.step(3)
    with pytest.raises(ConfigError, match=r"step: 2; expected at least the last optimizer step"):
        table.commit(2)
    assert table.commit() == 3
    with torch.no_grad():
        assert torch.equal(table.lookup(torch.arange(6)), straight.lookup(torch.arange(6)))
    table.close()
    straight.close()


def test_a_commit_at_a_later_step_is_where_the_next_step_goes_on(tmp_path):
    """commit(5) after step(1) says the rows' state was made at step 5, and a reopened table goes
    on from it; the open one took step(2) all the same (Adam's bias correction of step 2 over
    state a reopen would correct for step 6), and its next commit() raised the store's "step 5
    is the last committed step" for a step the caller never gave."""
    adam = make_row_optimizer("adam", lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((6, 2)), adam)
    table = TrainableTable(TieredStore.open(store_config(path)), adam)
    table.lookup(torch.tensor([1])).sum().backward()
    table.step(1)
    assert table.commit(5) == 5
    table.lookup(torch.tensor([1])).sum().backward()
    with pytest.raises(
        ConfigError,
        match=r"step: 2; expected more than the last step, 5 \(the step of the table's last commit",
    ):
        table.step(2)  # the gradients are kept
    assert table.step(6) == 1
    assert table.commit() == 6
    table.close()


def test_a_commit_below_the_last_step_is_refused_as_a_numpy_integer_too(tmp_path):
    """commit(np.int64(1)) after step(3) passed the check that refuses commit(1) (an isinstance
    int test): the commit said the state was made at step 1, and a reopened table applied steps
    2 and 3 again over it (Adam's bias correction of the wrong step)."""
    adam = make_row_optimizer("adam", lr=0.1)
    path = tmp_path / "t.npy"
    create_trainable_table(path, np.ones((6, 2)), adam)
    table = TrainableTable(TieredStore.open(store_config(path)), adam)
    for step in (1, 2, 3):
        table.lookup(torch.tensor([1])).sum().backward()
        table.step(step)
    for below in (np.int64(1), np.int32(2)):
        with pytest.raises(ConfigError, match=rf"step: {below}; expected at least the last"):
            table.commit(below)
    assert table.store.committed_step == 0
    assert table.commit(np.int64(3)) == 3
    table.close()


def _two_tables(tmp_path: Path, name: str = "adam") -> tuple[TrainableTable, TrainableTable]:
    """Two tables with the same random weights, trained by optimizer ``name``."""
    optimizer = make_row_optimizer(name, lr=0.05)
    init = np.random.default_rng(3).standard_normal((ROWS, DIM)).astype(np.float32)
    tables = []
    for run in ("plain", "scaled"):
        create_trainable_table(tmp_path / f"{run}.npy", init, optimizer)
        store = TieredStore.open(store_config(tmp_path / f"{run}.npy"))
        tables.append(TrainableTable(store, optimizer))
    return tables[0], tables[1]


def _commit_and_close(*tables: TrainableTable) -> None:
    """Commit each table's steps and close it."""
    for table in tables:
        table.commit()
        table.close()


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_grad_scaler_steps_the_rows_as_the_unscaled_gradients_do(tmp_path, name):
    """A GradScaler's scaled loss gave the table gradients 2**k times too large: Adam's update
    hides a constant factor but not its eps, and SGD steps 2**k times too far. step(n, scaler)
    unscales them: the rows equal an unscaled run's (a power-of-two scale is exact)."""
    plain, scaled = _two_tables(tmp_path, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for step, (ids, target) in enumerate(_batch(np.random.default_rng(4), 6), start=1):
        (plain.lookup(ids).sum(1)[:, :3] - target).pow(2).mean().backward()
        loss = (scaled.lookup(ids).sum(1)[:, :3] - target).pow(2).mean()
        scaler.scale(loss).backward()
        assert plain.step(step) == scaled.step(step, scaler) > 0
        scaler.update()
    assert scaler.get_scale() == 2.0**15  # it grew every 2 steps: no step was skipped
    assert scaled.skipped_steps == 0 and scaled.last_step == 6
    assert torch.equal(scaled.store.lookup(torch.arange(ROWS)), plain.store.lookup(torch.arange(ROWS)))  # fmt: skip
    _commit_and_close(plain, scaled)


def test_an_overflowed_step_is_skipped_and_its_number_can_be_applied_next(tmp_path):
    """Gradients that overflowed under a GradScaler (inf) were refused as non-finite, with no
    way to skip the step as scaler.step does. Now: no row changes, the gradients are dropped,
    the scaler's update() halves the scale, last_step stays, and passing last_step + 1 next
    applies Adam's step 1, as torch's Adam under a scaler counts only applied steps."""
    plain, scaled = _two_tables(tmp_path)
    before = scaled.store.lookup(torch.arange(ROWS))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(scaled.lookup(torch.tensor([1, 2])).sum() * float("inf")).backward()
    assert scaled.step(scaled.last_step + 1, scaler) == 0
    assert (scaled.skipped_steps, scaled.last_step) == (1, 0)
    assert torch.equal(scaled.store.lookup(torch.arange(ROWS)), before)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    ids = torch.tensor([[2, 5, 5]])
    plain.lookup(ids).sum().backward()
    scaler.scale(scaled.lookup(ids).sum()).backward()
    assert scaled.step(scaled.last_step + 1, scaler) == plain.step(1) == 2  # 1's gradient dropped
    assert torch.equal(scaled.store.lookup(torch.arange(ROWS)), plain.store.lookup(torch.arange(ROWS)))  # fmt: skip
    assert scaled.last_step == 1
    _commit_and_close(plain, scaled)


def test_optimizer_step_sets_adams_bias_correction_apart_from_the_step(tmp_path):
    """step(3, optimizer_step=1) (a loop numbering its steps by iteration, one skipped): Adam's
    first step, as step(1) applies it, and last_step 3; an optimizer_step below 1, or not an
    integer, is refused by name with the gradients kept."""
    plain, numbered = _two_tables(tmp_path)
    ids = torch.tensor([[2, 5, 5]])
    plain.lookup(ids).sum().backward()
    numbered.lookup(ids).sum().backward()
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match=rf"^optimizer_step: {bad!r}; expected an integer"):
            numbered.step(3, optimizer_step=bad)
    assert numbered.step(3, optimizer_step=1) == plain.step(1) == 2
    assert torch.equal(numbered.store.lookup(torch.arange(ROWS)), plain.store.lookup(torch.arange(ROWS)))  # fmt: skip
    assert numbered.last_step == 3
    _commit_and_close(plain, numbered)


def test_a_scaler_that_cannot_unscale_is_refused_and_the_gradients_kept(tmp_path):
    """Something else than a GradScaler, or one that never scaled a loss: ConfigError naming the
    scaler, before any row changes; the gradients stay for the step."""
    plain, scaled = _two_tables(tmp_path)
    scaled.lookup(torch.tensor([4])).sum().backward()
    with pytest.raises(ConfigError, match=r"scaler: str; expected a torch.amp.GradScaler or None"):
        scaled.step(1, "scaler")
    unused = torch.amp.GradScaler("cpu")
    with pytest.raises(ConfigError, match=r"scaler: Attempted unscale_ but _scale is None.*expected the GradScaler whose scale\(loss\)"):  # fmt: skip
        scaled.step(1, unused)
    disabled = torch.amp.GradScaler("cpu", enabled=False)  # as no scaler: the step is applied
    assert scaled.step(1, disabled) == 1 and scaled.last_step == 1
    plain.lookup(torch.tensor([4])).sum().backward()
    plain.step(1)
    assert torch.equal(scaled.store.lookup(torch.arange(ROWS)), plain.store.lookup(torch.arange(ROWS)))  # fmt: skip
    _commit_and_close(plain, scaled)


def test_rows_trained_under_bfloat16_autocast_get_the_gradients_a_parameter_gets(tmp_path):
    """Under torch.autocast the head computes in bfloat16; the table's rows stay float32 and its
    row gradients are those an embedding parameter gets from the same graph."""
    sgd = make_row_optimizer("sgd", lr=0.5)
    init = np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32)
    create_trainable_table(tmp_path / "t.npy", init, sgd)
    table = TrainableTable(TieredStore.open(store_config(tmp_path / "t.npy")), sgd)
    head = torch.nn.Linear(DIM, 3)
    weight = torch.from_numpy(init).requires_grad_(True)
    ids, target = next(_batch(np.random.default_rng(6), 1))
    for rows in (table.lookup(ids), weight[ids]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(rows.sum(1))
        assert out.dtype == torch.bfloat16
        (out.float() - target).pow(2).mean().backward()
    table.step(1)
    expected = weight.detach() - 0.5 * weight.grad
    assert torch.equal(table.store.lookup(torch.arange(ROWS)), expected)
    _commit_and_close(table)


def test_tables_sharing_a_scaler_step_after_one_retried_a_refused_step(tmp_path):
    """Table a's step was refused after unscaling (its update overflowed) and retried; the retry
    dropped the first throwaway optimizer object while the scaler still kept its state under its
    id(), so table b's object, often given that id, was refused as 'unscale_() has already been
    called' (1 iteration in 10). Every iteration's b step now applies."""
    sgd = make_row_optimizer("sgd", lr=1.0)
    init = np.zeros((ROWS, DIM), np.float32)
    init[0] = 3e38  # a gradient of -1e38 on row 0 overflows its SGD update
    tables = []
    for name, weights in (("a", init), ("b", np.zeros_like(init))):
        create_trainable_table(tmp_path / f"{name}.npy", weights, sgd)
        tables.append(TrainableTable(TieredStore.open(store_config(tmp_path / f"{name}.npy")), sgd))  # fmt: skip
    a, b = tables
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    for step in range(1, 101):
        scaler.scale(a.lookup(torch.tensor([0])).sum() * -1e38).backward()
        with pytest.raises(RowDataError, match=r"update of row 0 is not finite"):
            a.step(step, scaler)
        a.zero_grad()
        assert a.step(step, scaler) == 0  # retried without the gradients
        scaler.scale(b.lookup(torch.tensor([step - 1])).sum()).backward()
        assert b.step(step, scaler) == 1
        scaler.update()
    assert scaler.get_scale() == 1.0 and a.skipped_steps == b.skipped_steps == 0
    assert torch.equal(b.store.lookup(torch.arange(100))[:, :DIM], torch.full((100, DIM), -1.0))
    _commit_and_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_table_steps_with_and_without_a_scaler(tmp_path, dtype):
    """A float16 or bfloat16 table (sgd keeps no state) has half gradients: summing them in
    float32 added them to a float32 sum as they were, and index_add_ refused the mix
    ("self (Float) and source (Half) must have the same scalar type"), every step. They are summed
    in float32 and the rows step in their own dtype, under a GradScaler too."""
    from tiered_store.table_format import create_table

    sgd = make_row_optimizer("sgd", lr=0.5)
    create_table(tmp_path / "t.npy", torch.zeros((ROWS, DIM), dtype=dtype))
    table = TrainableTable(TieredStore.open(store_config(tmp_path / "t.npy")), sgd)
    table.lookup(torch.tensor([1, 1, 2])).float().sum().backward()
    assert table.step(1) == 2
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(table.lookup(torch.tensor([2, 3])).float().sum()).backward()
    assert table.step(2, scaler) == 2
    rows = table.store.lookup(torch.tensor([1, 2, 3, 4]))
    assert rows.dtype == dtype
    assert rows.float().tolist() == [[-1.0] * DIM, [-1.0] * DIM, [-0.5] * DIM, [0.0] * DIM]
    table.commit()
    table.close()
