"""Byte-level helpers shared by adapters: zip member offsets, crc32c,
protobuf varints. Nothing format-specific lives here.
"""
from __future__ import annotations
