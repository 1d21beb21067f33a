"""Row-wise optimizers for tables trained through the store: the state lives in the row.

A trained table's stored row is ``[weights (dim) | optimizer state]``, so the state moves with its
row through every tier, the write-back and the delta, and is as durable as the weights. Each
optimizer maps (current stored rows, summed gradients of those rows, step) to new stored rows,
for the rows a step touched only (as FBGEMM's and TorchRec's sparse optimizers do):

- ``sgd``: ``w -= lr * g`` (no state).
- ``rowwise_adagrad`` (FBGEMM's default for embedding tables): one accumulator per row,
  ``a += mean(g * g)``, ``w -= lr * g / (sqrt(a) + eps)``.
- ``adam``: per-row first and second moments (``2 * dim`` state), updated only where the row has a
  gradient, bias-corrected with the global step: the arithmetic of ``torch.optim.SparseAdam``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..integers import bool_among

__all__ = [
    "RowOptimizer",
    "first_non_finite_row",
    "stored_row_fault",
    "make_row_optimizer",
    "OPTIMIZERS",
]


@dataclass(frozen=True)
class RowOptimizer:
    """One row-wise optimizer and its hyper-parameters.

    Examples
    --------
    >>> opt = make_row_optimizer("rowwise_adagrad", lr=0.5)
    >>> opt.state_width(4)
    1
    >>> rows = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])          # weights | accumulator
    >>> opt.update(rows, torch.tensor([[2.0, 2.0, 2.0, 2.0]]), step=1).tolist()
    [[0.5, 0.5, 0.5, 0.5, 4.0]]
    """

    name: str
    lr: float
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999

    def state_width(self, dim: int) -> int:
        """Values of optimizer state per row of ``dim`` weights."""
        return {"sgd": 0, "rowwise_adagrad": 1, "adam": 2 * dim}[self.name]

    def update(self, rows: torch.Tensor, grads: torch.Tensor, step: int) -> torch.Tensor:
        """New stored rows ``[n, dim + state]`` from current ``rows`` and summed ``grads``
        ``[n, dim]`` at optimizer step ``step`` (1 for the first)."""
        dim = grads.shape[1]
        rows = rows.clone()
        w = rows[:, :dim]
        if self.name == "sgd":
            w.add_(grads, alpha=-self.lr)
        elif self.name == "rowwise_adagrad":
            acc = rows[:, dim]
            acc.add_(grads.pow(2).mean(dim=1))
            w.addcdiv_(grads, acc.sqrt().add_(self.eps).unsqueeze(1), value=-self.lr)
        else:  # adam, as torch.optim.SparseAdam computes it on the rows a step touches
            m, v = rows[:, dim : 2 * dim], rows[:, 2 * dim :]
            m.add_(grads.sub(m).mul_(1 - self.beta1))
            v.add_(grads.pow(2).sub_(v).mul_(1 - self.beta2))
            bias1 = 1 - self.beta1**step
            bias2 = 1 - self.beta2**step
            step_size = self.lr * math.sqrt(bias2) / bias1
            w.add_(m.div(v.sqrt().add_(self.eps)), alpha=-step_size)
        return rows


OPTIMIZERS = ("sgd", "rowwise_adagrad", "adam")
OPTIONS = ("eps", "beta1", "beta2")  # make_row_optimizer's keyword options


def make_row_optimizer(name: str, lr: float, **options: float) -> RowOptimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) with learning rate ``lr``.

    Examples
    --------
    >>> make_row_optimizer("adagrad", lr=0.1)
    Traceback (most recent call last):
    ...
    tiered_store.errors.ConfigError: optimizer: 'adagrad' is not a row-wise optimizer; expected one of sgd, rowwise_adagrad, adam
    """
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer: {name!r} is not a row-wise optimizer; expected one of {', '.join(OPTIMIZERS)}"
        )
    if not _holds(lambda: lr > 0 and math.isfinite(lr), lr):
        raise ConfigError(f"optimizer.lr: {lr!r}; expected a positive finite learning rate")
    for key, value in options.items():
        if key not in OPTIONS:
            raise ConfigError(
                f"optimizer.{key}: unknown option; expected one of {', '.join(OPTIONS)}"
            )
        if key == "eps" and not _holds(lambda v=value: v >= _EPS_MIN and math.isfinite(v), value):
            # 0 divides a touched row's zero gradient by its zero state: NaN (SparseAdam refuses it);
            # so does an eps that is 0 once in float32, as the rows are
            raise ConfigError(
                f"optimizer.eps: {value!r}; expected a finite eps > 0 (at least {_EPS_MIN:.3g}, "
                "the smallest normal float32: the rows are float32)"
            )
        if key != "eps" and not _holds(lambda v=value: 0 <= v < 1, value):
            raise ConfigError(f"optimizer.{key}: {value!r}; expected 0 <= {key} < 1")
    return RowOptimizer(name, float(lr), **{k: float(v) for k, v in options.items()})


_EPS_MIN = float(torch.finfo(torch.float32).tiny)


def _holds(check, value: object) -> bool:
    """Whether ``check()`` of ``value`` is true; False where the value is not a number (a
    TypeError; several numbers, an array's: NumPy's ValueError, torch's RuntimeError) or is a
    bool, NumPy's or torch's too (a flag passed for a number: True is not a learning rate of 1)."""
    if bool_among(value) is not None:
        return False
    try:
        return bool(check())
    except (TypeError, ValueError, RuntimeError):
        return False


def first_non_finite_row(rows: torch.Tensor) -> int | None:
    """The index of the first row of ``rows`` ``[n, width]`` (gradients, or an optimizer's
    update) holding a NaN or an inf; None where every value is finite. The sum first: one
    reduction, not finite where any value is not (nor where finite values overflow it: then the
    check row by row).

    >>> first_non_finite_row(torch.tensor([[1.0, 2.0], [3.0, float("nan")]]))
    1
    >>> first_non_finite_row(torch.full((2, 2), 3e38)) is None  # the sum overflows, no value does
    True
    """
    if bool(torch.isfinite(rows.sum())):
        return None
    bad = ~torch.isfinite(rows).all(1)
    return int(torch.nonzero(bad)[0]) if bool(bad.any()) else None


def stored_row_fault(
    ids: torch.Tensor, stored: torch.Tensor, dim: int, offset: int = 0
) -> str | None:
    """What is wrong with the first row of ``stored`` ``[n, dim + state]`` (rows ``[weights |
    optimizer state]`` as stored, ``dim`` weights) that holds a NaN or an inf: its id (its
    ``ids`` plus ``offset``, a shard's first row), where, and the value; None where all are finite.

    >>> stored_row_fault(torch.tensor([3, 7]), torch.tensor([[1.0, 2, 3], [1, 2, float("inf")]]), 2)
    'row 7 as stored holds a non-finite value (inf) in its optimizer state; expected finite stored rows'
    """
    first = first_non_finite_row(stored)
    if first is None:
        return None
    row = stored[first]
    where = int(torch.nonzero(~torch.isfinite(row))[0])
    part = "weights" if where < dim else "optimizer state"
    return (
        f"row {int(ids[first]) + offset} as stored holds a non-finite value ({row[where].item()}) "
        f"in its {part}; expected finite stored rows"
    )
