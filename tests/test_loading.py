"""Loading for decoding (`speechlm.loading`): --dtype auto asks the hardware, --quantize int8 quantises the LLM, LoRA
is merged, and bad combinations are clear `ValueError`s."""

from __future__ import annotations

import pytest
import torch

import speechlm.hardware
from speechlm import SpeechLMProcessor, create_speech_lm_model
from speechlm.hardware import DtypeChoice
from speechlm.inference.decoding import transcribe_arrays
from speechlm.loading import load_pretrained, quantize_language_model, resolve_quantize
from speechlm.quantization import PerTokenInt8Linear
from tests.conftest import make_clips


def save_lora_model(build, folder):
    """A full float32 checkpoint with LoRA adapters (non-zero, so merging them matters), saved in `folder`."""
    processor, model = build("whisper", "llama", dtype=torch.float32)
    model.add_lora(r=2, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_model_dir(build, tmp_path_factory):
    return save_lora_model(build, tmp_path_factory.mktemp("lora-model"))


def quantized_linears(model) -> int:
    return sum(isinstance(m, PerTokenInt8Linear) for m in model.language_model.modules())


@pytest.fixture(scope="module")
def variants(lora_model_dir):
    """processor and the same checkpoint loaded three ways: as saved, LoRA merged, int8."""
    processor, reference = load_pretrained(str(lora_model_dir), dtype="float32")
    _, merged = load_pretrained(str(lora_model_dir), dtype="float32", merge_lora=True)
    _, int8 = load_pretrained(str(lora_model_dir), quantize="int8")
    return processor, reference, merged, int8


def test_merge_lora_folds_the_adapters_into_the_llm(variants):
    _, _, merged, _ = variants
    assert merged.config.lora is None and not any("lora_" in n for n, _ in merged.named_parameters())


def test_int8_quantises_every_linear_layer_of_the_llm(variants):
    _, reference, merged, int8 = variants
    linears = sum(isinstance(m, torch.nn.Linear) for m in merged.language_model.modules())
    assert quantized_linears(int8) == linears > 0  # every linear layer, the LM head included
    assert quantized_linears(reference) == 0


def test_merged_and_int8_logits_stay_close_to_the_reference(variants):
    processor, reference, merged, int8 = variants
    batch = processor(make_clips((0.6, 0.9, 0.4)))
    with torch.no_grad():
        logits = [m(**batch).logits[:, -1] for m in (reference, merged, int8)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)  # merging LoRA is exact up to rounding
    scale = logits[0].abs().max()
    assert (logits[2] - logits[0]).abs().max() < 0.05 * scale  # int8: a few per cent of the logit range


def test_int8_decodes_like_float32_wherever_float32_is_clear(variants):
    """int8 picks float32's greedy token at every step where float32's top two logits are further apart than int8's
    error bound (0.05 of the logit range each, test above). A near-tie may go either way, and every later token then
    follows it: counting agreeing tokens across rows (>= 80 %) passed on AVX-512 CPUs and failed on AVX2 (78 %)."""
    processor, reference, _, int8 = variants
    clips = make_clips((0.6, 0.9, 0.4))
    batch = processor(clips)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    runs = [m.generate(**batch, **kwargs) for m in (reference, int8)]
    tokens = [run.sequences[:, -len(run.scores):] for run in runs]
    assert tokens[1].shape == tokens[0].shape
    assert int(tokens[1].max()) < int8.config.text_config.vocab_size
    scores = torch.stack(runs[0].scores, dim=1)  # float32's logits at each step of its own decoding
    top = scores.topk(2, dim=-1).values
    margin = top[..., 0] - top[..., 1]
    same = (tokens[0] == tokens[1]).long()
    shared_prefix = torch.cat([torch.ones_like(same[:, :1]), same.cumprod(1)[:, :-1]], dim=1).bool()
    clear = shared_prefix & (margin > 0.1 * scores.abs().amax())
    assert clear.any()
    assert torch.equal(tokens[1][clear], tokens[0][clear])
    assert len(transcribe_arrays(int8, processor, clips, max_new_tokens=4)) == 3


def test_dtype_auto_follows_the_hardware_choice(lora_model_dir, monkeypatch):
    for chosen in (torch.bfloat16, torch.float32):
        monkeypatch.setattr(speechlm.hardware, "choose_decoding_dtype",
                            lambda device, chosen=chosen: DtypeChoice(chosen, "test"))
        _, model = load_pretrained(str(lora_model_dir), dtype="auto")
        assert model.language_model.dtype == chosen


def test_dtype_auto_never_fights_the_quantiser(lora_model_dir):
    _, int8 = load_pretrained(str(lora_model_dir), dtype="auto", quantize="int8")
    assert quantized_linears(int8) > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"dtype": "bfloat16", "quantize": "int8"}, "quantises float32 weights"),
    ({"quantize": "int4"}, "quantize must be one of"),
    ({"dtype": "float8"}, "dtype must be one of"),
])  # fmt: skip
def test_bad_loading_options_are_value_errors(lora_model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        load_pretrained(str(lora_model_dir), **options)


def test_quantising_before_merging_lora_is_a_value_error(lora_model_dir):
    _, model = load_pretrained(str(lora_model_dir), dtype="float32")
    with pytest.raises(ValueError, match="merge the LoRA adapters"):
        quantize_language_model(model)


def test_a_checkpoint_saved_in_bf16_decodes_in_float32_on_a_cpu(model_dirs, tmp_path):
    # A demo trained on an AMX CPU keeps its LLM in bf16; decoding that on a CPU was slower and made a clip's
    # output depend on its batch-mates (bf16 rounding of left-padded batches).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    decoder = tmp_path / "decoder-bf16"
    AutoModelForCausalLM.from_pretrained(model_dirs("decoder", "llama"), dtype=torch.bfloat16).save_pretrained(decoder)
    AutoTokenizer.from_pretrained(model_dirs("decoder", "llama")).save_pretrained(decoder)
    feature_extractor, tokenizer, model = create_speech_lm_model(str(model_dirs("encoder", "whisper")), str(decoder))
    model.save_pretrained(tmp_path / "model", trainable_only=True)
    SpeechLMProcessor(feature_extractor, tokenizer).save_pretrained(tmp_path / "model")
    assert load_pretrained(str(tmp_path / "model"), dtype=None)[1].language_model.dtype == torch.bfloat16
    assert load_pretrained(str(tmp_path / "model"))[1].language_model.dtype == torch.float32


def test_quantize_auto_is_int8_on_a_cpu():
    assert resolve_quantize("auto", "cpu") == "int8"
    assert resolve_quantize("auto", "cpu", "float32") == "int8"


def test_quantize_auto_leaves_16_bit_dtypes_and_gpus_alone():
    assert resolve_quantize("auto", "cpu", "bfloat16") is None
    assert resolve_quantize("auto", "cpu", torch.float16) is None
    assert resolve_quantize("auto", "cuda") is None


def test_load_pretrained_with_quantize_auto_quantises_on_the_cpu(lora_model_dir):
    _, model = load_pretrained(str(lora_model_dir), quantize="auto")
    assert quantized_linears(model) > 0
