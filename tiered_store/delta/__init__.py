"""Writes: the LMDB delta beside a base table, write-back of dirty cached rows, row-wise
optimizers and the autograd lookup that trains a table through the store."""
