"""Training a table through the store: a lookup whose output carries gradients, and the row-wise
optimizer step that writes the updated rows (and their state) back through the tiers.

Forward: ``TrainableTable.lookup`` returns the weights part of the stored rows, attached to the
autograd graph. Backward: the row gradients are kept with their ids. ``step()``: unique ids and
summed gradients (``index_add_``), the current stored rows (weights + optimizer state) through the
store, the optimizer's new rows, ``store.write``. ``commit()`` makes the step durable. Over a
``ShardedStore`` the gradients travel to the ranks owning their rows, which apply the optimizer.
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from typing import Any

import numpy as np
import torch

from ..errors import (
    ConfigError,
    RowDataError,
    RowIdError,
    TableFormatError,
    TierIOError,
    UpdateRefusedError,
)
from ..id_ops import unique_inverse_counts
from ..integers import as_integer
from ..store import as_id_tensor
from ..table_format import TableManifest, create_table
from ..table_sources import check_tensor_holds_rows, describe_tensor
from .row_optimizers import RowOptimizer, first_non_finite_row, stored_row_fault

__all__ = ["TableSlice", "TrainableTable", "create_trainable_table"]


def create_trainable_table(
    path: str | os.PathLike[str],
    weights: Any,
    optimizer: RowOptimizer,
    *,
    progress: bool = False,
    overwrite: bool = False,
    run_id: str | None = None,
) -> TableManifest:
    """A table file for training: each row is ``[weights | zero optimizer state]`` (float32);
    the manifest's metadata records the weight width, the optimizer and ``run_id`` (the training
    run the table belongs to, when given).

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store.delta.row_optimizers import make_row_optimizer
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> create_trainable_table(path, np.ones((5, 4)), make_row_optimizer("adam", lr=0.1)).dim
    12
    """
    _check_optimizer(optimizer)
    if isinstance(weights, torch.Tensor):  # a model's parameter (grad), bf16, on a GPU: as is
        dtype = str(weights.dtype).removeprefix("torch.")
        desc = f"weights (torch.Tensor {describe_tensor(weights)})"
        check_tensor_holds_rows(weights, desc)
        real = not (weights.is_complex() or weights.is_quantized)
    else:
        weights = np.asarray(weights)
        dtype = str(weights.dtype)
        desc = f"weights (ndarray {dtype} {weights.shape})"
        real = weights.dtype.kind in "biuf"
    if not real:  # converted, a complex one lost its imaginary parts with only a warning
        raise TableFormatError(
            f"source {desc} has dtype {dtype}; expected real numbers (floating-point or integer)"
        )
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().to("cpu", torch.float32)
    else:
        weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.ndim != 2:
        raise ConfigError(f"weights: shape {tuple(weights.shape)}; expected [rows, dim]")
    rows, dim = weights.shape
    if rows < 1 or dim < 1:  # (create_table would name the rows with their state: 3 x dim)
        raise TableFormatError(
            f"weights: shape {tuple(weights.shape)}; expected [rows, dim] with rows >= 1 and "
            "dim >= 1"
        )
    state = torch.zeros(rows, optimizer.state_width(dim), dtype=torch.float32)
    meta = {"trainable": {"dim": int(dim), "optimizer": optimizer.name}}
    if run_id is not None:
        meta["trainable"]["run_id"] = run_id
    rows = torch.cat([weights, state], 1)
    return create_table(path, rows, metadata=meta, progress=progress, overwrite=overwrite)


def _check_optimizer(optimizer: Any) -> None:
    """``ConfigError`` unless ``optimizer`` is a ``RowOptimizer`` (an optimizer's name is not)."""
    if not isinstance(optimizer, RowOptimizer):
        raise ConfigError(
            f"optimizer: {type(optimizer).__name__} {optimizer!r}; expected a RowOptimizer "
            "(make_row_optimizer(name, lr))"
        )


_KEPT = "no row changed; the gradients are kept, zero_grad() drops them"  # a refused step's


class _ScalerInfCheck(torch.optim.Optimizer):
    """One inf check (a finite value or an inf) as one parameter's gradient, never stepped: what
    ``GradScaler.unscale_`` takes, so that it records the check (an inf makes its ``update()``
    lower the scale)."""

    def __init__(self, grads: torch.Tensor) -> None:
        holder = grads.detach()
        super().__init__([holder], {})
        holder.grad = grads

    def step(self, closure: Any = None) -> None:  # noqa: ARG002 (torch's signature)
        """Never called: the table applies its own update."""
        raise RuntimeError("the table's row gradients are stepped by TrainableTable.step")

    def let_go(self) -> None:
        """Drop the check once recorded: the object lives on only for its ``id()``."""
        self.param_groups.clear()


class _RowsWithGrad(torch.autograd.Function):
    """Identity on looked-up rows whose backward hands the row gradients to the table."""

    @staticmethod
    def forward(ctx, anchor, rows, row_ids, table):  # noqa: ARG004 (anchor: graph membership)
        ctx.table = table
        ctx.save_for_backward(row_ids)  # ids changed in place since: an error, as nn.Embedding's
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        (row_ids,) = ctx.saved_tensors
        # a copy: the caller may refill its id buffer before step() (gradient accumulation)
        ctx.table._gradients.append((row_ids.clone(), grad))
        return None, None, None, None


class TrainableTable:
    """A ``TieredStore`` over a trainable table as an Engram ``TableBackend`` that learns.

    Parameters
    ----------
    store : TieredStore
        Over a table from ``create_trainable_table`` (float rows ``[weights | state]``).
    optimizer : RowOptimizer
        Must match the table's state width (and its recorded optimizer, when recorded).

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store import TieredStore
    >>> from tiered_store.delta.row_optimizers import make_row_optimizer
    >>> sgd = make_row_optimizer("sgd", lr=0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> _ = create_trainable_table(path, np.zeros((10, 2)), sgd)
    >>> table = TrainableTable(TieredStore.open({"table": {"path": path}}), sgd)
    >>> table.lookup(torch.tensor([3, 3, 4])).sum(1).mul(torch.tensor([1.0, 1, 2])).sum().backward()
    >>> table.step(1), table.lookup(torch.tensor([3, 4])).tolist()
    (2, [[-1.0, -1.0], [-1.0, -1.0]])
    >>> table.commit(1), table.close()
    (1, None)

    Mixed precision: pass the ``GradScaler`` that scaled the loss to :meth:`step`, which unscales
    the row gradients and skips a step whose gradients overflowed, as ``scaler.step`` does:

    >>> table = TrainableTable(TieredStore.open({"table": {"path": path}}), sgd)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    >>> scaler.scale(table.lookup(torch.tensor([3])).sum() * 2.0**110).backward()  # overflows
    >>> table.step(2, scaler), table.skipped_steps, table.last_step
    (0, 1, 1)
    >>> scaler.update(); scaler.get_scale()  # halved: the next step is scaled less
    524288.0
    >>> table.close()
    """

    keeps_stats = True

    def __init__(self, store: Any, optimizer: RowOptimizer) -> None:
        _check_optimizer(optimizer)
        if store.cold.manifest.quantization is not None:  # its step() could never write
            raise ConfigError(
                f"table: {store.cold.path.name} holds packed quantised rows (fp8 codes and "
                "scales), which are read-only; expected a table of float rows to train (made by "
                "create_trainable_table)"
            )
        meta = (store.cold.manifest.metadata or {}).get("trainable", {})
        if not meta and optimizer.state_width(store.dim) > 0:  # its state would be weights
            per = optimizer.state_width(1)
            width = str(per) if optimizer.state_width(2) == per else f"{per} x dim"
            raise ConfigError(
                f"optimizer: {optimizer.name!r} keeps {width} state values per row, but "
                f"{store.cold.path.name} records no optimizer state (no 'trainable' metadata); "
                "expected a table made by create_trainable_table (or sgd, which keeps none)"
            )
        if meta.get("optimizer") not in (None, optimizer.name):
            raise ConfigError(
                f"optimizer: {optimizer.name!r} but {store.cold.path.name} holds the state of "
                f"{meta['optimizer']!r}; expected the same optimizer"
            )
        self.dim = int(meta.get("dim", store.dim - optimizer.state_width(store.dim)))
        if store.dim != self.dim + optimizer.state_width(self.dim) or self.dim <= 0:
            raise ConfigError(
                f"optimizer: {optimizer.name!r} needs rows of {self.dim} weights + "
                f"{optimizer.state_width(self.dim)} state values; {store.cold.path.name} has "
                f"{store.dim} values per row (make the table with create_trainable_table)"
            )
        self.store, self.optimizer = store, optimizer
        self.rows = store.rows
        self._anchor = torch.zeros((), requires_grad=True)  # puts lookups on the autograd graph
        self._gradients: list[tuple[torch.Tensor, torch.Tensor]] = []
        # the last optimizer step applied: a reopened table goes on from its last commit, which
        # carries the step its rows' optimizer state was made at (Adam's bias correction); so
        # does this one after a commit at a later step
        self._last_step = store.committed_step
        self.skipped_steps = 0  # steps a GradScaler's overflow skipped (see step())
        # the throwaway optimizer objects a scaler keys by id() until its update(): those of the
        # last step that ended and of any refused since (a freed one's id is soon another's)
        self._scaler_holders: list[_ScalerInfCheck] = []
        self._scaled_step_ended = False

    @property
    def last_step(self) -> int:
        """The last optimizer step applied (a reopened table: its last commit's step)."""
        return self._last_step

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """The Engram layout the store's table records (None: none)."""
        return getattr(self.store, "engram_layout", None)

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """Weights ``[..., dim]`` of ``row_ids``; with grad enabled, on the autograd graph."""
        rows = self.store.lookup(row_ids, handle)[..., : self.dim]
        if not torch.is_grad_enabled():
            return rows
        ids = as_id_tensor(row_ids)
        if not isinstance(row_ids, torch.Tensor):  # a view of a NumPy buffer has no version
            ids = ids.clone()  # counter to refuse a refill before backward: the ids as read now
        return _RowsWithGrad.apply(self._anchor, rows, ids, self)

    def prefetch(self, row_ids: torch.Tensor) -> object:
        """Start fetching ``row_ids`` (weights and state come together)."""
        return self.store.prefetch(row_ids)

    def step(
        self,
        step: int,
        scaler: torch.amp.GradScaler | None = None,
        *,
        optimizer_step: int | None = None,
    ) -> int:
        """Apply the optimizer to every row with a gradient since the last step; returns how many
        rows it updated. ``step`` counts optimizer steps from 1 (Adam's bias correction), each
        higher than the last (else ``ConfigError``, the gradients kept); a reopened table's last
        step is its last commit's (see :meth:`commit`).

        ``optimizer_step``: the step Adam's bias correction uses, where it is not ``step`` (an
        integer >= 1, else ``ConfigError``): a loop that numbers its steps (and commits) by
        iteration under a ``GradScaler`` passes the count of steps applied, as torch's Adam
        counts them, and keeps that count durable with its commits itself (sharded: every rank
        passes the same, else the step is refused on every rank as for different steps).

        A store write that raises part way (out of memory) may have applied whole: the step is
        then made (its gradients dropped, :attr:`last_step` is ``step``) and the error raised.

        ``scaler``: the ``torch.amp.GradScaler`` whose ``scale(loss)`` made these gradients (mixed
        precision); call this before ``scaler.update()``. The summed row gradients are unscaled
        first; when they hold an inf or a NaN the step is skipped, as ``scaler.step`` skips a torch
        optimizer's: no row changes, the gradients are dropped, it returns 0, ``skipped_steps``
        grows by one and :attr:`last_step` stays, so the same number can be passed again (to count
        only applied steps in Adam's bias correction, as torch's Adam does, pass
        ``last_step + 1``); the scaler records the overflow, so its ``update()`` lowers the scale.
        A row they touch that is not finite as stored is no overflow (looked up, its NaN makes
        every gradient NaN, at every step): ``RowDataError`` names it, as without a scaler.
        A scaler that never scaled a loss is refused (``ConfigError``, the gradients kept); one
        that scaled none since its last ``update()`` cannot be told from one that did (torch keeps
        no such record): its scale divides the gradients all the same.

        Over a ``ShardedStore`` it is a collective (every rank calls it, with gradients or not):
        the gradients go to the ranks owning their rows, which sum them and apply the optimizer
        (``ShardedStore.update_rows``); it returns the rows this rank updated. A step refused on
        one rank is refused on every rank (the others get ``StepMismatchError``), as are ranks
        passing different steps; no row changes and every rank keeps its gradients. A shard that
        cannot read or update its rows fails the step on every rank before any shard writes
        (``UpdateRefusedError``, the gradients kept), as does one whose write failed on every
        shard that wrote none of it; when some shards wrote their rows and others did not, the
        gradients are dropped and the store refuses every call until reopened on every rank
        (``ShardedStore.update_rows``). A step one rank's ``scaler`` finds
        overflowed is skipped on every rank, and every rank's scaler records the overflow once
        the ranks agree; a step refused on any rank records none, so ranks that abandon it keep
        equal scales."""
        number = as_integer(step)  # True is not step 1
        if number is None or number < 1:
            self._refuse(step, f"step: {step!r}; expected an integer >= 1 (steps count from 1)")
        if number <= self._last_step:
            why = (
                "the step of the table's last commit: a reopened table goes on from it"
                if self._last_step == self.store.committed_step
                else "each optimizer step is applied once"
            )
            self._refuse(
                step, f"step: {number}; expected more than the last step, {self._last_step} ({why})"
            )
        adam_step = number if optimizer_step is None else as_integer(optimizer_step)
        if adam_step is None or adam_step < 1:
            self._refuse(
                step, f"optimizer_step: {optimizer_step!r}; expected an integer >= 1 or None"
            )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            self._refuse(
                step, f"scaler: {type(scaler).__name__}; expected a torch.amp.GradScaler or None"
            )
        unique, summed = self._summed_gradients()
        scaled = scaler is not None and scaler.is_enabled()
        skip = scaled and self._unscale(scaler, summed, number)
        update_rows = getattr(self.store, "update_rows", None)
        if update_rows is not None:  # sharded: the owners apply it
            try:
                updated = update_rows(
                    unique,
                    summed,
                    partial(self.optimizer.update, step=adam_step),
                    step=number,
                    skip=skip,
                    optimizer_step=adam_step,
                )
            except UpdateRefusedError:  # failed before any shard wrote: kept for a retry
                raise
            except TierIOError:  # a shard failed its update, the others made theirs: not twice
                self._gradients.clear()
                raise
            skip = updated is None  # this rank's or another's gradients overflowed
        elif skip or not unique.numel():
            if skip:  # a stored NaN makes every gradient NaN, every step: no overflow to skip
                self._check_looked_up(unique, number)
            updated = 0
        else:  # the write is the last thing done: when anything fails before, no row changed
            current = self.store.lookup(unique)
            new_rows = self.optimizer.update(current, summed.to(current), adam_step)
            self._check_finite(unique, summed, current, new_rows, number)
            try:
                self.store.write(unique, new_rows)
            except BaseException:  # applied whole or not at all (TieredStore.write): applied,
                with contextlib.suppress(Exception):  # the step is made (unread: kept)
                    if torch.equal(self.store.lookup(unique), new_rows):
                        self._gradients.clear()
                        self._scaled_step_ended = True
                        self._last_step = number
                raise
            updated = unique.numel()
        self._gradients.clear()
        self._scaled_step_ended = True  # its scaler's update() comes before the next step's
        if skip:
            if scaled:  # recorded once every rank agrees: a refused round leaves the scales equal
                self._record_check(scaler, summed.device, overflowed=True)
            self.skipped_steps += 1
            return 0
        self._last_step = number
        return updated

    def _unscale(self, scaler: torch.amp.GradScaler, summed: torch.Tensor, step: int) -> bool:
        """Divide ``summed`` by ``scaler``'s scale in place, as ``unscale_`` does; whether it holds
        an inf or a NaN. The scaler records a finite check now (its ``update()`` needs one); an
        overflow only once the step is skipped (see :meth:`step`)."""
        try:
            self._record_check(scaler, summed.device, overflowed=False)
        except (AssertionError, RuntimeError) as exc:  # torch's: no scale(loss) this iteration
            self._refuse(
                step,
                f"scaler: {exc}; expected the GradScaler whose scale(loss) made this step's "
                "gradients, before its update() (the gradients are kept)",
            )
        if self._scaled_step_ended:  # the last step's scaler was updated since: ids unused
            del self._scaler_holders[:-1]  # all but the check just recorded
        self._scaled_step_ended = False
        inverse = torch.tensor(1.0 / scaler.get_scale(), dtype=torch.float32)  # unscale_'s
        summed.mul_(inverse.item())
        return first_non_finite_row(summed) is not None

    def _record_check(
        self, scaler: torch.amp.GradScaler, device: torch.device, *, overflowed: bool
    ) -> None:
        """Have ``scaler`` record an inf check of this step (an inf when ``overflowed``), which
        its ``update()`` reads: an overflow lowers the scale."""
        holder = _ScalerInfCheck(torch.full((1,), math.inf if overflowed else 0.0, device=device))
        scaler.unscale_(holder)
        holder.let_go()
        self._scaler_holders.append(holder)  # alive until update(): the scaler keys them by id()

    def _check_finite(  # noqa: PLR0913 (the step's rows, before and after)
        self,
        ids: torch.Tensor,
        summed: torch.Tensor,
        current: torch.Tensor,
        new_rows: torch.Tensor,
        step: int,
    ) -> None:
        """``RowDataError`` when an updated row is not finite, naming why: a row as stored
        (``current``; looked up, its NaN makes a model's every gradient NaN), else the first
        such row's gradient, or the update itself."""
        first = first_non_finite_row(new_rows)
        if first is None:
            return
        self._check_stored(ids, current, step)
        row, grad = int(ids[first]), summed[first]
        if not bool(torch.isfinite(grad).all()):
            value = grad[~torch.isfinite(grad)][0].item()
            raise RowDataError(
                f"step {step}: the gradient of row {row} holds a non-finite value ({value}); "
                f"expected finite gradients ({_KEPT})"
            )
        weights = not bool(torch.isfinite(new_rows[first, : self.dim]).all())
        part = "weights overflow" if weights else "state overflows"
        raise RowDataError(
            f"step {step}: the {self.optimizer.name} update of row {row} is not finite (its "
            f"{part} {str(new_rows.dtype).removeprefix('torch.')}: a gradient too large); "
            f"expected finite rows ({_KEPT})"
        )

    def _check_stored(self, ids: torch.Tensor, current: torch.Tensor, step: int) -> None:
        """``RowDataError`` naming the first row of ``ids`` whose values as stored (``current``)
        are not finite: written past the store's checks, or damaged."""
        fault = stored_row_fault(ids, current, self.dim)
        if fault is not None:
            raise RowDataError(
                f"step {step}: {fault} (restore the table, or write the row anew; {_KEPT})"
            )

    def _check_looked_up(self, ids: torch.Tensor, step: int) -> None:
        """``_check_stored`` of ``ids`` as the store holds them now (no ids: nothing read)."""
        if ids.numel():
            self._check_stored(ids, self.store.lookup(ids), step)

    def _refuse(self, step: Any, message: str) -> None:
        """Raise ``ConfigError(message)``; over a sharded store after joining the update round
        with no gradients and a step no other rank passes, so every rank refuses it."""
        refuse_update = getattr(self.store, "refuse_update", None)
        if refuse_update is not None:  # the others' StepMismatchError names this rank
            refuse_update(step)
        raise ConfigError(message)

    def _summed_gradients(self, sums: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unique ids in the table and their summed gradients since the last step (kept); the
        sums ``None`` unless ``sums``."""
        gradients = self._gradients or [
            (torch.empty(0, dtype=torch.int64), torch.empty((0, self.dim), dtype=torch.float32))
        ]
        id_device, grad_device = gradients[0][0].device, gradients[0][1].device  # ids may mix
        ids = torch.cat([i.reshape(-1).to(id_device) for i, _ in gradients])
        inside = None
        if getattr(self.store, "zero_out_of_range", False):  # read as zeros: no row to update
            inside = (ids >= 0) & (ids < self.rows)
            ids = ids[inside]
        if not sums:
            return unique_inverse_counts(ids)[0], None
        grads = torch.cat([g.reshape(-1, self.dim).to(grad_device) for _, g in gradients])
        if inside is not None:
            grads = grads[inside.to(grads.device)]
        unique, inverse, _ = unique_inverse_counts(ids)
        dtype = torch.promote_types(grads.dtype, torch.float32)  # half gradients sum in float32
        summed = torch.zeros((unique.numel(), self.dim), dtype=dtype, device=grads.device)
        summed.index_add_(0, inverse.to(grads.device), grads.to(dtype))
        return unique, summed

    def zero_grad(self) -> None:
        """Drop row gradients not yet applied."""
        self._gradients.clear()

    def skip(self, step: int, *, optimizer_step: int | None = None) -> None:
        """Drop the row gradients of ``step``, which a loop skips for an overflow it found in
        other gradients (a model's dense ones, under a ``GradScaler``): no row changes, as in a
        step :meth:`step` skips. ``RowDataError`` naming the row (the gradients kept) where a
        row they touch is not finite as stored: looked up, its NaN overflows every step. Over a
        ``ShardedStore`` it is a collective, as :meth:`step` is, with the same ``step`` (and
        ``optimizer_step``) as the other ranks pass: the owners read the rows as stored (a NaN
        there is named on every rank), and a rank that steps meanwhile has its step skipped
        (``ShardedStore.update_rows``' ``skip``), not left waiting for this rank."""
        update_rows = getattr(self.store, "update_rows", None)
        if update_rows is None:
            self._check_looked_up(self._summed_gradients(sums=False)[0], step)
        else:
            unique, summed = self._summed_gradients()
            update_rows(
                unique,
                summed,
                self.optimizer.update,  # never applied: a skipped round only reads the rows
                step=step,
                skip=True,
                optimizer_step=optimizer_step,
            )
        self._gradients.clear()

    def commit(self, step: int | None = None) -> int:
        """``store.commit(step)``: every updated row and its state durable, at the last optimizer
        step applied (default), or a later ``step`` (the next ``step()`` goes on after it, as a
        reopened table's would); returns the step. The commit carries the optimizer step its
        rows' state was made at, so a reopened table's ``step()`` goes on after it: a ``step``
        below the last applied is refused (``ConfigError``), since a reopened table would apply
        those steps twice (Adam's bias correction). A sharded commit that raises ``CommitError``
        once its step is decided (its second phase failed on a shard) moves the step all the
        same."""
        if step is None:
            step = max(self._last_step, self.store.committed_step)
        elif (number := as_integer(step)) is not None and number < self._last_step:  # np.int64 too
            raise ConfigError(
                f"step: {step}; expected at least the last optimizer step applied, "
                f"{self._last_step} (a reopened table goes on from its commit's step)"
            )
        try:
            return self.store.commit(step)
        finally:
            # a later step's commit says the state was made at it: the next step goes on after
            # it, here as after a reopen; so does a sharded commit whose second phase failed on
            # a shard (CommitError), decided at its step on every rank (committed_step says it)
            self._last_step = max(self._last_step, self.store.committed_step)

    def stats(self) -> dict[str, dict[str, Any]]:
        """The store's statistics."""
        return self.store.stats()

    def close(self) -> None:
        """Close the store (uncommitted updates are dropped)."""
        self.store.close()


class TableSlice:
    """Rows ``[offset, offset + rows)`` of a ``TrainableTable`` as a table of their own: several
    Engram layers share one store, so one ``commit`` makes a training step durable for all.

    Examples
    --------
    >>> import tempfile, os
    >>> from tiered_store import TieredStore
    >>> from tiered_store.delta.row_optimizers import make_row_optimizer
    >>> sgd = make_row_optimizer("sgd", lr=1.0)
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> _ = create_trainable_table(path, np.arange(12.0).reshape(6, 2), sgd)
    >>> shared = TrainableTable(TieredStore.open({"table": {"path": path}}), sgd)
    >>> second = TableSlice(shared, offset=3, rows=3)
    >>> second.lookup(torch.tensor([0, 2])).tolist()
    [[6.0, 7.0], [10.0, 11.0]]
    >>> shared.close()
    """

    keeps_stats = True

    def __init__(self, table: TrainableTable, offset: int, rows: int) -> None:
        for name, value in (("offset", offset), ("rows", rows)):
            if as_integer(value) is None:  # 1.5 made float ids, "1" a TypeError
                raise ConfigError(f"slice: {name} {value!r}; expected an integer")
        offset, rows = as_integer(offset), as_integer(rows)
        if offset < 0 or rows < 1 or offset + rows > table.rows:
            raise ConfigError(
                f"slice: rows [{offset}, {offset + rows}) outside the table's {table.rows} rows; "
                "expected offset >= 0, rows >= 1 and offset + rows <= the table's rows"
            )
        self.table, self.offset, self.rows, self.dim = table, offset, rows, table.dim

    @property
    def stats_owner(self) -> TrainableTable:
        """The table whose counters ``stats()`` reports, every slice of it alike (a sum over
        Engram layers counts it once)."""
        return self.table

    @property
    def engram_layout(self) -> dict[str, Any] | None:
        """The shared table's Engram layout when this slice is the whole of it; None for a part
        (the layout is the whole table's) or a table that records none."""
        if self.offset == 0 and self.rows == self.table.rows:
            return self.table.engram_layout
        return None

    def lookup(self, row_ids: torch.Tensor, handle: object | None = None) -> torch.Tensor:
        """The shared table's rows ``row_ids + offset`` (``row_ids`` in ``[0, rows)``, else
        ``RowIdError``: never another slice's rows)."""
        return self.table.lookup(self._shifted(row_ids), handle)

    def prefetch(self, row_ids: torch.Tensor) -> object:
        """Prefetch ``row_ids + offset``: pass the same ``row_ids`` to ``lookup``."""
        return self.table.prefetch(self._shifted(row_ids))

    def _shifted(self, row_ids: Any) -> torch.Tensor:
        """``row_ids + offset``, each id checked to lie in this slice; in int64 where the ids'
        own dtype (int32, int16, uint8, ...) would wrap past its largest value."""
        ids = as_id_tensor(row_ids)
        if ids.numel():
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= self.rows:
                flat = ids.reshape(-1)
                bad = int(flat[(flat < 0) | (flat >= self.rows)][0])
                raise RowIdError(
                    f"slice: id {bad} is outside this slice (rows [{self.offset}, "
                    f"{self.offset + self.rows}) of the table); expected 0 <= id < {self.rows}"
                )
            if self.offset + int(hi) > torch.iinfo(ids.dtype).max:
                ids = ids.to(torch.int64)
        return ids + self.offset

    def stats(self) -> dict[str, dict[str, Any]]:
        """The shared store's statistics."""
        return self.table.stats()

    def close(self) -> None:
        """Nothing: the shared table is closed by its owner."""
