"""A reader of CTranslate2's `model.bin`, so its tensors load without the `ctranslate2` runtime.

The format knows nothing of Whisper: `ctranslate2_whisper` maps the variables onto transformers' Whisper.

`model.bin` layout (little-endian), as written by `ctranslate2.specs.ModelSpec`:

    u32 binary version | str spec name | u32 spec revision | u32 variable count
    per variable: str name | u8 rank | u32 x rank dims | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: str alias | str target

where `str` is a u16 byte length (counting a trailing NUL) followed by the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# Order of the DataType enum in CTranslate2's include/ctranslate2/types.h.
CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
# Binary version 4 introduced the explicit dtype byte; 6 is the latest CTranslate2 writes.
SUPPORTED_BINARY_VERSIONS = range(4, 7)


@dataclass(frozen=True)
class _Variable:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    num_bytes: int


class CTranslate2ModelFile:
    """Index of a CTranslate2 `model.bin`: the header and where each variable lives.

    Only offsets are read up front and tensors are read on demand, so the encoder alone can be loaded without
    touching the (larger) decoder bytes. Every malformed or truncated field raises a `ValueError` naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.variables: dict[str, _Variable] = {}
        self.aliases: dict[str, str] = {}
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                self._parse(handle)
        except OSError as error:
            raise ValueError(f"Cannot read CTranslate2 model file {self.path}: {error}") from error

    # -- parsing -------------------------------------------------------------------------------------------------
    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid CTranslate2 model file: {message}")

    def _read(self, handle, num_bytes: int, what: str) -> bytes:
        position = handle.tell()
        data = handle.read(num_bytes)
        if len(data) != num_bytes:
            raise self._error(
                f"truncated while reading {what} ({num_bytes} bytes at offset {position}, file has {self.size} bytes)"
            )
        return data

    def _unpack(self, handle, fmt: str, what: str):
        return struct.unpack("<" + fmt, self._read(handle, struct.calcsize("<" + fmt), what))[0]

    def _string(self, handle, what: str) -> str:
        length = self._unpack(handle, "H", f"length of {what}")
        raw = self._read(handle, length, what)
        # CTranslate2 counts and writes a trailing NUL.
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as error:
            raise self._error(f"{what} is not UTF-8 ({raw[:40]!r})") from error

    def _parse(self, handle) -> None:
        self.binary_version = self._unpack(handle, "I", "binary version")
        if self.binary_version not in SUPPORTED_BINARY_VERSIONS:
            raise self._error(f"unsupported binary version {self.binary_version} (supported: {supported_versions()})")
        self.spec_name = self._string(handle, "spec name")
        self.spec_revision = self._unpack(handle, "I", "spec revision")
        num_variables = self._unpack(handle, "I", "variable count")
        for index in range(num_variables):
            name = self._string(handle, f"name of variable {index}")
            rank = self._unpack(handle, "B", f"rank of {name!r}")
            shape = tuple(self._unpack(handle, "I", f"dimension {axis} of {name!r}") for axis in range(rank))
            type_id = self._unpack(handle, "B", f"dtype of {name!r}")
            if type_id not in CT2_DTYPES:
                raise self._error(
                    f"variable {name!r} has unsupported dtype id {type_id} (supported: "
                    + ", ".join(f"{key}={str(value).removeprefix('torch.')}" for key, value in CT2_DTYPES.items())
                    + ")"
                )
            dtype = CT2_DTYPES[type_id]
            num_bytes = self._unpack(handle, "I", f"byte count of {name!r}")
            expected = math.prod(shape) * dtype.itemsize
            if num_bytes != expected:
                raise self._error(
                    f"variable {name!r} of shape {list(shape)} and dtype {dtype} should take {expected} bytes, "
                    f"header says {num_bytes}"
                )
            offset = handle.tell()
            if offset + num_bytes > self.size:
                raise self._error(
                    f"truncated: variable {name!r} needs {num_bytes} bytes at offset {offset}, "
                    f"file has {self.size} bytes"
                )
            handle.seek(num_bytes, os.SEEK_CUR)
            self.variables[name] = _Variable(name, shape, dtype, offset, num_bytes)
        num_aliases = self._unpack(handle, "I", "alias count")
        for index in range(num_aliases):
            alias = self._string(handle, f"alias {index}")
            target = self._string(handle, f"target of alias {alias!r}")
            if target not in self.variables:
                raise self._error(f"alias {alias!r} points to unknown variable {target!r}")
            self.aliases[alias] = target

    # -- access --------------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def names(self) -> list[str]:
        return [*self.variables, *self.aliases]

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.variables[self.resolve(name)].shape

    def tensor(self, name: str) -> torch.Tensor:
        """The variable as stored (CTranslate2 dtype), in a fresh CPU tensor."""
        if name not in self:
            raise self._error(f"missing variable {name!r}")
        variable = self.variables[self.resolve(name)]
        if variable.num_bytes == 0:
            return torch.empty(variable.shape, dtype=variable.dtype)
        with open(self.path, "rb") as handle:
            handle.seek(variable.offset)
            data = bytearray(self._read(handle, variable.num_bytes, f"data of {name!r}"))
        return torch.frombuffer(data, dtype=variable.dtype).reshape(variable.shape)

    def scalar(self, name: str, default=None):
        if name not in self:
            return default
        return self.tensor(name).item()


def read_header(model_file: Path) -> tuple[int, str | None] | None:
    """(binary version, spec name) from the first bytes, or None: cheap enough for a format sniff.

    The spec name is None for binary versions this module cannot read (their layout may differ).
    """
    try:
        with open(model_file, "rb") as handle:
            head = handle.read(4 + 2 + 256)
    except OSError:
        return None
    if len(head) < 4:
        return None
    version = struct.unpack_from("<I", head)[0]
    if version not in SUPPORTED_BINARY_VERSIONS:
        # Plausible versions of a future or older CTranslate2 get a precise message; anything else is foreign.
        return (version, None) if 0 < version < 100 else None
    if len(head) < 6:
        return None
    end = 6 + struct.unpack_from("<H", head, 4)[0]
    if len(head) < end:
        return None
    try:
        return version, head[6:end].rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        return None


def supported_versions() -> str:
    return f"{SUPPORTED_BINARY_VERSIONS.start}-{SUPPORTED_BINARY_VERSIONS.stop - 1}"


__all__ = ["CT2_DTYPES", "SUPPORTED_BINARY_VERSIONS", "CTranslate2ModelFile", "read_header", "supported_versions"]
