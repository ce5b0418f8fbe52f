"""The one place that opens GGUF files: header metadata as plain Python values, and the tensors.

`read_metadata` is a small reader of the documented header layout (magic, version, counts, then typed
key/values): much faster than `gguf.GGUFReader`, which also maps every tensor and every array element.
`open_gguf` adds the tensors (memory-mapped by `gguf.GGUFReader`) for the weight loaders; both the
tokenizer and the weight loaders take their metadata from `read_metadata`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

# GGUF value types (gguf.GGUFValueType) -> struct formats; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/values of a GGUF file's header as plain Python values (arrays as lists); tensors are not read."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise ValueError(f"{os.fspath(path)} is not a GGUF file")
        order = "<" if struct.unpack_from("<I", head, 4)[0] < 0x10000 else ">"  # big-endian files exist
        n_kv = struct.unpack_from(order + "Q", head, 16)[0]

        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(order + fmt, f.read(size))[0]

        def string() -> str:
            return f.read(unpack("Q")).decode("utf-8", "replace")

        def value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                item, count = unpack("I"), unpack("Q")
                if item in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[item]
                    return list(struct.unpack(f"{order}{count}{fmt}", f.read(count * struct.calcsize(fmt))))
                return [value(item) for _ in range(count)]
            if vtype not in _GGUF_SCALARS:
                raise ValueError(f"{os.fspath(path)}: unknown GGUF value type {vtype}")
            return unpack(_GGUF_SCALARS[vtype])

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(unpack("I"))
        return meta


@dataclass(frozen=True)
class GGUFFile:
    """An opened GGUF file: its metadata and its tensors (`gguf.ReaderTensor`s, data memory-mapped)."""

    path: str
    metadata: dict[str, Any]
    tensors: tuple[Any, ...]

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file once for everything the loaders read (parsing the tensor index takes ~2 s for a 49k
    vocabulary: `gguf.GGUFReader` also walks every metadata array)."""
    from gguf import GGUFReader

    p = os.fspath(path)
    metadata = read_metadata(p)
    return GGUFFile(p, metadata, tuple(GGUFReader(p).tensors))
