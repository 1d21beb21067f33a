"""CRC32C of many byte ranges in one compiled call, on the CPU's SSE4.2 ``crc32`` instruction.

``page_checksums`` uses this for the page checksums of every cold read: one call per batch of
pages instead of one C call per page (the ``crc32c`` package's call costs ~0.3 us on top of the
~0.2 us a 4 KiB page takes), with the GIL released so the reader threads checksum in parallel.
Four pages run interleaved, so four independent ``crc32`` chains keep the instruction's pipeline
full (one ``crc32`` alone waits ~3 cycles for the previous one). The results are the standard
CRC32C (Castagnoli, as iSCSI, ext4 and the ``crc32c`` package compute it); a test checks them
against the package on every alignment and length.

Importing this module imports numba (~0.5 s): ``page_checksums`` imports it when checksums are
first needed (to ask :func:`unavailable_reason`, on any machine) and runs the kernel only where
that is ``None``, else it uses the ``crc32c`` package per page.
"""

from __future__ import annotations

import os
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["crc32c_ranges", "first_bad_page", "unavailable_reason"]

_ONES = np.uint64(0xFFFFFFFF)


def unavailable_reason() -> str | None:
    """Why the SSE4.2 kernel cannot run on this machine, or ``None`` when it can."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    if numba.config.DISABLE_JIT:  # its crc32 intrinsics have no pure-Python form
        return "NUMBA_DISABLE_JIT is set: the kernel runs only compiled"
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return "NUMBA_CPU_NAME/NUMBA_CPU_FEATURES select another code-generation target"
    import llvmlite.binding as llvm

    if not llvm.get_host_cpu_features().get("sse4.2", False):
        return "the CPU lacks SSE4.2"
    return None


@intrinsic
def _crc_u64(typingctx, crc, word):
    """The ``crc32q`` instruction: ``crc`` (low 32 bits) updated with 8 bytes."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.64.64")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _crc_u8(typingctx, crc, byte):
    """The ``crc32b`` instruction: ``crc`` updated with one byte."""
    sig = types.uint32(types.uint32, types.uint8)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32), ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.sse42.crc32.32.8")
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(cache=True, nogil=True)
def _crc_bytes(data, start, stop, crc):
    """``crc`` (not inverted) updated with ``data[start:stop]`` one byte at a time."""
    c = np.uint32(crc)
    for i in range(start, stop):
        c = _crc_u8(c, data[i])
    return np.uint64(c)


@numba.njit(cache=True, nogil=True)
def crc32c_ranges(data, skew, starts, lengths, out):
    """``out[k]`` = CRC32C of ``data[starts[k] : starts[k] + lengths[k]]`` for every ``k``.

    ``data`` is a 1-D contiguous uint8 array, ``skew`` its first byte's address modulo 8; ranges
    that are 8-byte aligned and of one length are done four at a time.
    """
    first = (8 - skew) & 7  # index of data's first 8-byte-aligned byte
    nwords = max(data.size - first, 0) >> 3
    words = data[first : first + (nwords << 3)].view(np.uint64)
    n = starts.size
    k = 0
    while k < n:
        s0, length = starts[k], lengths[k]
        if (
            k + 4 <= n
            and (length & 7) == 0
            and lengths[k + 1] == length
            and lengths[k + 2] == length
            and lengths[k + 3] == length
            and ((s0 - first) & 7) == 0
            and ((starts[k + 1] - first) & 7) == 0
            and ((starts[k + 2] - first) & 7) == 0
            and ((starts[k + 3] - first) & 7) == 0
        ):
            w0 = np.uint64((s0 - first) >> 3)
            w1 = np.uint64((starts[k + 1] - first) >> 3)
            w2 = np.uint64((starts[k + 2] - first) >> 3)
            w3 = np.uint64((starts[k + 3] - first) >> 3)
            c0 = c1 = c2 = c3 = _ONES
            for i in range(np.uint64(length >> 3)):
                c0 = _crc_u64(c0, words[w0 + i])
                c1 = _crc_u64(c1, words[w1 + i])
                c2 = _crc_u64(c2, words[w2 + i])
                c3 = _crc_u64(c3, words[w3 + i])
            out[k] = np.uint32(c0 ^ _ONES)
            out[k + 1] = np.uint32(c1 ^ _ONES)
            out[k + 2] = np.uint32(c2 ^ _ONES)
            out[k + 3] = np.uint32(c3 ^ _ONES)
            k += 4
            continue
        stop = s0 + length
        head = min(s0 + ((first - s0) & 7), stop)  # bytes up to the first aligned one
        c = _crc_bytes(data, s0, head, _ONES)
        w_end = (stop - first) >> 3 if stop - first >= 0 else 0
        w = (head - first) >> 3 if head - first >= 0 else 0
        for i in range(np.uint64(w), np.uint64(max(w_end, w))):
            c = _crc_u64(c, words[i])
        tail = max(head, first + (max(w_end, w) << 3))
        c = _crc_bytes(data, tail, stop, c)
        out[k] = np.uint32(c ^ _ONES)
        k += 1
    return out


@numba.njit(cache=True, nogil=True)
def first_bad_page(data, first_start, packed, pages, sums, page_bytes, last_page, tail):
    """Index of the first of ``pages`` whose bytes in ``data`` fail ``sums[page]``, or -1.

    Page ``k`` starts at ``first_start + k * page_bytes`` when ``packed`` (a read buffer), else
    at ``first_start + pages[k] * page_bytes`` (a mapped file); ``last_page`` is ``tail`` long.
    """
    n = pages.size
    starts = np.empty(n, np.int64)
    lengths = np.empty(n, np.int64)
    for k in range(n):
        starts[k] = first_start + (k if packed else pages[k]) * page_bytes
        lengths[k] = tail if pages[k] == last_page else page_bytes
    out = np.empty(n, np.uint32)
    crc32c_ranges(data, data.ctypes.data & 7, starts, lengths, out)
    for k in range(n):
        if out[k] != sums[pages[k]]:
            return k
    return -1
