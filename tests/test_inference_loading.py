"""Loading for decoding: --dtype auto asks the hardware, --quantize int8 quantises the LLM, LoRA is merged, and each
option reaches the model from `transcribe`, `evaluate` and `serve`."""

from __future__ import annotations

import argparse
import json

import pytest
import soundfile as sf
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

import speechlm.hardware
import speechlm.inference
from speechlm.cli import main
from speechlm.hardware import DtypeChoice
from speechlm.inference import load_for_inference, load_pretrained, quantize_language_model, transcribe_arrays
from speechlm.serving.app import add_serve_arguments
from tests.conftest import make_clips

SR = 16000


@pytest.fixture(scope="module")
def saved(build, tmp_path_factory):
    """A full float32 checkpoint with LoRA adapters (non-zero, so merging them matters)."""
    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.add_lora(r=2, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("lora-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def quantized_linears(model) -> int:
    return sum(isinstance(m, DynamicQuantizedLinear) for m in model.language_model.modules())


def test_int8_decodes_like_float32(saved):
    processor, reference = load_pretrained(str(saved), dtype="float32")
    _, merged = load_pretrained(str(saved), dtype="float32", merge_lora=True)
    _, int8 = load_pretrained(str(saved), quantize="int8")
    assert merged.config.lora is None and not any("lora_" in n for n, _ in merged.named_parameters())
    linears = sum(isinstance(m, torch.nn.Linear) for m in merged.language_model.modules())
    assert quantized_linears(int8) == linears > 0  # every linear layer, the LM head included
    assert quantized_linears(reference) == 0

    clips = make_clips((0.6, 0.9, 0.4))
    batch = processor(clips)
    with torch.no_grad():
        logits = [m(**batch).logits[:, -1] for m in (reference, merged, int8)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)  # merging LoRA is exact up to rounding
    scale = logits[0].abs().max()
    assert (logits[2] - logits[0]).abs().max() < 0.05 * scale  # int8: a few per cent of the logit range

    kwargs = {"max_new_tokens": 6, "do_sample": False}
    tokens = [m.generate(**batch, **kwargs) for m in (reference, int8)]
    assert tokens[1].shape == tokens[0].shape
    assert int(tokens[1].max()) < int8.config.text_config.vocab_size
    agree = (tokens[1] == tokens[0]).float().mean().item()
    assert agree >= 0.8, f"int8 greedy tokens agree with float32 on only {agree:.0%}"
    assert len(transcribe_arrays(int8, processor, clips, max_new_tokens=4)) == 3


def test_dtype_auto_follows_the_hardware_choice(saved, monkeypatch):
    for chosen in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(speechlm.hardware, "choose_cpu_dtype", lambda chosen=chosen: DtypeChoice(chosen, "test"))
        _, model = load_pretrained(str(saved), dtype="auto")
        assert model.language_model.dtype == chosen
    _, int8 = load_pretrained(str(saved), dtype="auto", quantize="int8")  # auto never fights the quantiser
    assert quantized_linears(int8) > 0


def test_bad_loading_options_are_value_errors(saved):
    with pytest.raises(ValueError, match="quantises float32 weights"):
        load_pretrained(str(saved), dtype="bfloat16", quantize="int8")
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_pretrained(str(saved), quantize="int4")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_pretrained(str(saved), dtype="float8")
    _, model = load_pretrained(str(saved), dtype="float32")
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        quantize_language_model(model)


@pytest.fixture
def spy(monkeypatch):
    """Records the options every CLI load passes to `load_pretrained`, and still loads."""
    calls = []
    real = speechlm.inference.load_pretrained

    def record(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(speechlm.inference, "load_pretrained", record)
    return calls


def write_clip(folder, name="a.wav", seconds=0.7):
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(folder / name, make_clips((seconds,))[0], SR, subtype="FLOAT")
    return folder / name


def test_transcribe_and_evaluate_pass_quantize_and_dtype(saved, tmp_path, spy, capsys):
    clip = write_clip(tmp_path)
    assert main(["transcribe", str(clip), "--model", str(saved), "--quantize", "int8", "--max-new-tokens", "3",
                 "--quiet"]) == 0  # fmt: skip
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text(json.dumps({"audio": clip.name, "text": "hello"}) + "\n")
    assert main(["evaluate", str(manifest), "--model", str(saved), "--dtype", "float32", "--max-new-tokens", "3",
                 "--quiet"]) == 0  # fmt: skip
    assert spy == [
        {"dtype": None, "device": "cpu", "quantize": "int8", "merge_lora": True},
        {"dtype": "float32", "device": "cpu", "quantize": "none", "merge_lora": True},
    ]
    code = main(["transcribe", str(clip), "--model", str(saved), "--quantize", "int8", "--dtype", "bfloat16",
                 "--quiet"])  # fmt: skip
    assert code == 2 and "quantises float32 weights" in capsys.readouterr().err


def test_serve_options_reach_the_model(saved):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", str(saved), "--quantize", "int8", "--dtype", "auto"])
    _, model = load_for_inference(args, "cpu")
    assert quantized_linears(model) > 0 and model.config.lora is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", str(saved), "--quantize", "int4"])
