"""CRC algebra shared by the zip writer (CRC-32) and the TF bundle code
(CRC-32C): a reflected CRC is linear over GF(2), so "append n zero bytes" is
a 32x32 bit matrix, and crc(A + B) = shift(crc(A), len(B)) ^ crc(B). This is
zlib's ``crc32_combine`` generalised over the polynomial.
"""
from __future__ import annotations

from functools import lru_cache

CRC32_POLY = 0xEDB88320    # zip, zlib
CRC32C_POLY = 0x82F63B78   # Castagnoli: TensorFlow, LevelDB


def gf2_apply(mat: tuple[int, ...], vec: int) -> int:
    """Matrix (a tuple of column images) times a 32-bit vector."""
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator ``a(b(x))``."""
    return tuple(gf2_apply(a, col) for col in b)


@lru_cache(maxsize=None)
def zeros_operator(poly: int, k: int) -> tuple[int, ...]:
    """Operator: CRC register after appending 2**k zero bytes."""
    if k == 0:
        m = (poly,) + tuple(1 << i for i in range(31))  # one zero bit
        for _ in range(3):                               # 1 -> 8 bits
            m = gf2_compose(m, m)
        return m
    half = zeros_operator(poly, k - 1)
    return gf2_compose(half, half)


def shift(poly: int, crc: int, nbytes: int) -> int:
    """Register ``crc`` advanced over ``nbytes`` zero bytes."""
    k = 0
    while nbytes and crc:
        if nbytes & 1:
            crc = gf2_apply(zeros_operator(poly, k), crc)
        nbytes >>= 1
        k += 1
    return crc


def crc_combine(poly: int, crc1: int, crc2: int, len2: int) -> int:
    """CRC of A + B from the finished crc(A), crc(B) and len(B)."""
    return shift(poly, crc1, len2) ^ crc2
