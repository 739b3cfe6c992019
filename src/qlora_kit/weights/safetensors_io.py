"""Safetensors shards read and written one tensor at a time (no whole-model load)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from qlora_kit.errors import MergeError


INDEX = "model.safetensors.index.json"


SINGLE = "model.safetensors"


# safetensors files, one tensor at a time. Written here, not with the safetensors package,
# because of memory: `safe_open` maps the file and every page read stays resident in this process
# until the file is closed, and `save_file` takes a dict of the whole shard, so merging one shard
# with them holds it two or three times (measured: bench/merge_memory.py). Llama-2-13B ships 10 GB
# shards, which would not fit on a 24 GB machine. The format is a little-endian u64 header length,
# a JSON header (dtype, shape, data_offsets relative to the data) and the raw bytes.
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def libc_trim():
    """glibc's malloc_trim, or a no-op. Tensors under glibc's mmap threshold (up to 32 MiB) come
    from the heap, which keeps freed pages: a merge that frees one 16-23 MiB temporary after the
    other grew by several hundred MiB of them. Trimming after each tensor keeps the peak at about
    the largest tensor (bench/merge_memory.py)."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def read_st_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= n <= Path(path).stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise MergeError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + n


def read_st_tensor(f: Any, data_start: int, spec: dict[str, Any]) -> Any:
    import torch

    begin, end = spec["data_offsets"]
    dtype = getattr(torch, ST_DTYPES[spec["dtype"]])
    if end == begin:
        return torch.empty(spec["shape"], dtype=dtype)
    buf = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise MergeError(f"{f.name}: truncated tensor data")
    return torch.frombuffer(buf, dtype=dtype).reshape(spec["shape"])


def weight_shards(base: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The base's safetensors files in order, and its index (None for a single file)."""
    base = Path(base)
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text(encoding="utf-8"))
        files = list(dict.fromkeys(index["weight_map"].values()))
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise MergeError(f"{base / INDEX} names shards that are not there: {missing}")
        return files, index
    if (base / SINGLE).is_file():
        return [SINGLE], None
    raise MergeError(f"{base}: no {SINGLE} or {INDEX}; merge.method shardwise reads safetensors only "
                     "(a pickle-only base can be merged with merge.method: peft)")


def tensor_shapes(base: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor, from the safetensors headers (no data read)."""
    from safetensors import safe_open

    out = {}
    for f in weight_shards(base)[0]:
        try:
            with safe_open(str(Path(base) / f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # safetensors' SafetensorError: a damaged header
            raise MergeError(f"{Path(base) / f}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); "
                             "fetch the base again") from None
    return out


def write_index(out: Path, index: dict[str, Any]) -> None:
    """The base's index with total_size recomputed for the merged files."""
    from qlora_kit.artifacts import write_json

    total = sum(_tensor_bytes(out / f) for f in dict.fromkeys(index["weight_map"].values()))
    write_json(out / INDEX, {**index, "metadata": {**index.get("metadata", {}), "total_size": total}})


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n
