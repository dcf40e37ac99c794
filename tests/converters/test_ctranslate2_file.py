"""The CTranslate2 `model.bin` reader (`speechlm.converters.ctranslate2_file`): a byte-exact round trip through the
test writer, and every kind of corruption is a `ValueError` naming the file and what is wrong."""

from __future__ import annotations

import struct

import pytest

from speechlm.converters.ctranslate2 import is_ctranslate2_whisper
from speechlm.converters.ctranslate2_file import CTranslate2ModelFile
from tests.converters.conftest import ct2_folder, expect_error, write_ct2


def test_writer_reproduces_real_file(whisper_dir, tmp_path, ct2_variables):
    """Guards the test writer (and the reader's round trip): re-serializing the real file gives identical bytes."""
    folder = ct2_folder(tmp_path, whisper_dir)
    write_ct2(folder / "model.bin", *ct2_variables)
    assert (folder / "model.bin").read_bytes() == (whisper_dir / "model.bin").read_bytes()


@pytest.mark.parametrize(
    "corruption, pattern",
    [
        ("truncated_data", r"truncated: variable 'encoder/layer_\d.*' needs \d+ bytes"),
        ("truncated_header", r"truncated while reading"),
        ("bad_dtype", r"unsupported dtype id 9"),
        ("bad_byte_count", r"should take \d+ bytes, header says"),
        ("bad_version", r"binary version 99; supported versions are 4-6"),
    ],
)
def test_corrupt_model_bin_raises_value_error(whisper_dir, tmp_path, corruption, pattern):
    data = bytearray((whisper_dir / "model.bin").read_bytes())
    model_file = CTranslate2ModelFile(whisper_dir / "model.bin")
    first = next(iter(model_file.variables.values()))
    if corruption == "truncated_data":
        del data[model_file.variables["encoder/layer_2/ffn/linear_0/weight"].offset + 1000 :]
    elif corruption == "truncated_header":
        del data[40:]
    elif corruption == "bad_dtype":
        data[first.offset - 5] = 9  # dtype byte, then u32 byte count, then data
    elif corruption == "bad_byte_count":
        data[first.offset - 4 : first.offset] = struct.pack("<I", first.num_bytes + 3)
    elif corruption == "bad_version":
        data[:4] = struct.pack("<I", 99)
    folder = ct2_folder(tmp_path, whisper_dir)
    (folder / "model.bin").write_bytes(bytes(data))
    expect_error(folder, pattern)


def test_a_foreign_model_bin_is_not_taken_for_ctranslate2(whisper_dir, tmp_path):
    pickle = ct2_folder(tmp_path, whisper_dir, "pickle")
    (pickle / "model.bin").write_bytes(b"PK\x03\x04" + bytes(200))
    assert not is_ctranslate2_whisper(pickle)
    expect_error(pickle, r"not a CTranslate2 model file")
