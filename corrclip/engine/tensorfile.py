"""A minimal tensor file for hosts without Python (examples/cpp reads and writes it).

Layout, little-endian: b"CCT1", uint32 count, then per tensor: uint32 dtype code, uint32 ndim,
int64 dims[ndim], raw contiguous data. Codes: 0 float32, 1 int64, 2 bool (1 byte), 3 int32, 4 float16.
"""

from __future__ import annotations

import os
import struct

import torch

CODES = {torch.float32: 0, torch.int64: 1, torch.bool: 2, torch.int32: 3, torch.float16: 4}
DTYPES = {v: k for k, v in CODES.items()}


def save_tensors(path: str | os.PathLike, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        f.write(b"CCT1" + struct.pack("<I", len(tensors)))
        for t in tensors:
            t = t.detach().cpu().contiguous()
            f.write(struct.pack("<II", CODES[t.dtype], t.ndim) + struct.pack(f"<{t.ndim}q", *t.shape))
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def load_tensors(path: str | os.PathLike) -> list[torch.Tensor]:
    data = open(path, "rb").read()
    if data[:4] != b"CCT1":
        raise ValueError(f"{path} is not a corrclip tensor file")
    (count,), pos = struct.unpack_from("<I", data, 4), 8
    out = []
    for _ in range(count):
        code, ndim = struct.unpack_from("<II", data, pos)
        pos += 8
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        dtype = DTYPES[code]
        n = int(torch.tensor(shape).prod()) if ndim else 1
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(bytearray(data[pos: pos + nbytes]), dtype=dtype).reshape(shape)
        pos += nbytes
        out.append(t)
    return out
