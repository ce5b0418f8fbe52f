"""The GGUF reader: header metadata of every value type equals what `gguf.GGUFReader` reads, in both byte
orders; open_gguf adds the tensors; a file of another kind is refused by name."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from model_core.weights.gguf_reader import open_gguf, read_metadata
from tests.model_core.tokenizer_cases import smollm2_path


def _reference(path: str | Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _write(path: Path, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -70000)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo 😀")
    w.add_array("t.strs", ["a", "", "中文"])
    w.add_array("t.floats", [0.25, -1.5])
    w.add_array("t.ints", [1, 2, 3])
    w.add_tensor("w", np.arange(8, dtype=np.float32).reshape(2, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_metadata_matches_gguf_reader(tmp_path: Path, endian: gguf.GGUFEndian) -> None:
    path = _write(tmp_path / "kv.gguf", endian)
    md = read_metadata(path)
    assert md == _reference(path)
    assert md["general.architecture"] == "llama" and md["t.str"] == "héllo 😀" and md["t.bool"] is True
    assert md["t.strs"] == ["a", "", "中文"] and md["t.u64"] == 2**40 and md["t.i8"] == -5


def test_open_gguf_reads_metadata_and_tensors(tmp_path: Path) -> None:
    path = _write(tmp_path / "kv.gguf")
    file = open_gguf(path)
    assert file.path == str(path) and file.metadata == read_metadata(path)
    assert file.tensor_names == ["w"]
    assert np.array_equal(np.asarray(file.tensors[0].data), np.arange(8, dtype=np.float32).reshape(2, 4))


def test_not_a_gguf_file(tmp_path: Path) -> None:
    for name, data in [("empty.gguf", b""), ("text.gguf", b"this is not a model file at all")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a GGUF file"):
            read_metadata(tmp_path / name)


def test_default_model_metadata_matches_gguf_reader() -> None:
    path = smollm2_path()
    md = read_metadata(path)
    assert md == _reference(path)
    assert md["tokenizer.ggml.model"] == "gpt2" and len(md["tokenizer.ggml.tokens"]) == 49152
