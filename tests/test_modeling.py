"""SpeechLMModel behaviour users rely on, for every encoder and decoder family we claim."""

from __future__ import annotations

import pytest
import torch

from speechlm.modeling import IGNORE_INDEX
from tests.conftest import make_clips
from tests.tiny_models import DECODERS, ENCODERS

# Every encoder with one decoder, every decoder with one encoder: each family is exercised end to end.
PAIRS = [(e, "qwen2") for e in ENCODERS] + [("wav2vec2-layer", d) for d in DECODERS if d != "qwen2"]
PROMPTS = ["transcribe", "transcribe the audio please now", ""]


def _select(batch, index):
    return {k: v[index : index + 1] for k, v in batch.items()}


def _trim(batch):
    """A single-clip batch cut to its real lengths: what a user gets when processing one clip alone."""
    audio_len = int(batch["attention_mask"].sum())
    text_len = int(batch["decoder_attention_mask"].sum())
    out = {}
    for key, value in batch.items():
        limit = audio_len if key in ("input_values", "input_features", "attention_mask") else text_len
        out[key] = value[..., :limit]
    return out


def _generate_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("encoder,decoder", PAIRS)
def test_create_keeps_pretrained_weights(model_dirs, encoder, decoder):
    """The assembled model holds exactly the loaded encoder and LLM weights (post_init must not re-randomise them)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from speechlm import create_speech_lm_model

    _, _, model = create_speech_lm_model(str(model_dirs("encoder", encoder)), str(model_dirs("decoder", decoder)))
    reference_encoder = AutoModel.from_pretrained(model_dirs("encoder", encoder))
    if encoder == "whisper":  # saved as a whole WhisperModel; the audio tower is its encoder
        reference_encoder = reference_encoder.get_encoder()
    for name, tensor in model.audio_tower.state_dict().items():
        assert torch.equal(tensor, reference_encoder.state_dict()[name]), name
    reference_decoder = AutoModelForCausalLM.from_pretrained(model_dirs("decoder", decoder)).state_dict()
    for name, tensor in model.language_model.state_dict().items():
        expected = reference_decoder[name]
        assert torch.equal(tensor[: expected.shape[0]], expected), name  # new token rows are appended


@pytest.mark.parametrize("encoder,decoder", PAIRS)
def test_batched_forward_equals_one_by_one(build, clips, encoder, decoder):
    processor, model = build(encoder, decoder)
    batch = processor(clips, text=["set an alarm", "call mom tomorrow morning", "play"], prompt=PROMPTS)
    with torch.no_grad():
        batched = model(**batch)
        for i in range(len(clips)):
            single = model(**_trim(processor([clips[i]], text=[["set an alarm", "call mom tomorrow morning",
                                                                  "play"][i]], prompt=PROMPTS[i])))
            length = single.logits.shape[1]
            # With labels the merged batch is right-padded (no query row attends to nothing; see test_precision).
            torch.testing.assert_close(batched.logits[i, :length], single.logits[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("encoder,decoder", PAIRS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generate_equals_one_by_one(build, clips, encoder, decoder, num_beams):
    processor, model = build(encoder, decoder)
    batch = processor(clips, prompt=PROMPTS)
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    batched = model.generate(**_generate_inputs(batch), **kwargs)
    for i in range(len(clips)):
        single = model.generate(**_trim(processor([clips[i]], prompt=PROMPTS[i])), **kwargs)
        pad = processor.tokenizer.pad_token_id
        expected = single[0].tolist()
        got = batched[i].tolist()[: len(expected)]
        assert got == expected, f"clip {i}: batched {got} != alone {expected}"
        assert all(t == pad for t in batched[i].tolist()[len(expected):])


@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2-group"])
def test_projector_layers_keep_batched_logits_equal_to_one_by_one(build, clips, encoder):
    """The layers attend across tokens: the padding a shorter clip gets in a batch must stay invisible to it."""
    processor, model = build(encoder, "qwen2", projector_layers=2)
    texts = ["set an alarm", "call mom tomorrow morning", "play"]
    with torch.no_grad():
        batched = model(**processor(clips, text=texts, prompt=PROMPTS)).logits
        for i in range(len(clips)):
            single = model(**_trim(processor([clips[i]], text=[texts[i]], prompt=PROMPTS[i]))).logits
            torch.testing.assert_close(batched[i, : single.shape[1]], single[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_padded_audio_cannot_change_the_output(build, clips, encoder):
    processor, model = build(encoder, "llama")
    batch = processor(clips, text=["a", "b", "c"])
    name = model.audio_input_name
    noisy = dict(batch)
    padding = (batch["attention_mask"] == 0)
    if name == "input_features":
        padding = padding[:, None, :].expand_as(batch[name])
    noisy[name] = batch[name].masked_fill(padding, 0.0) + padding * torch.randn_like(batch[name]) * 100
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, model(**noisy).logits, atol=0, rtol=0)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_audio_token_count_follows_the_encoders_own_arithmetic(build, encoder):
    processor, model = build(encoder, "qwen2", stack_factor=1)
    for seconds in (0.3, 0.51, 1.0):
        batch = processor(make_clips((seconds,)))
        audio = batch[model.audio_input_name].double()
        frames = model.adapter.encode(model.audio_tower, audio, batch["attention_mask"].sum(-1)).shape[1]
        if encoder == "whisper":
            assert frames == (audio.shape[-1] - 1) // 2 + 1
        else:
            assert frames == model.audio_tower(audio).last_hidden_state.shape[1]
        assert int(model.audio_output_lengths(batch["attention_mask"].sum(-1))) == frames


def test_whisper_real_length_forward_equals_transformers_on_30_seconds(build):
    """On a full 30 s input our real-length Whisper path must reproduce transformers' own encoder exactly."""
    _, model = build("whisper", "qwen2")
    features = torch.randn(2, 16, 3000, dtype=torch.float64)
    ours = model.adapter.encode(model.audio_tower, features, torch.tensor([3000, 3000]))
    theirs = model.audio_tower(features).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_default_stack_factor_gives_at_most_12_5_tokens_per_second(build):
    processor, model = build("whisper", "qwen2")
    assert model.config.stack_factor == 4
    batch = processor(make_clips((2.0,)))
    assert int(model.audio_output_lengths(batch["attention_mask"].sum(-1))) == 25


def test_generate_with_cache_equals_without(build, clips):
    processor, model = build("whisper", "mistral")
    batch = _generate_inputs(processor(clips, prompt=PROMPTS))
    with_cache = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
    without = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()


def test_beam_search_with_one_beam_equals_greedy(build, clips):
    processor, model = build("hubert", "gpt2")
    batch = _generate_inputs(processor(clips, prompt=PROMPTS))
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)
    beam = model.generate(**batch, max_new_tokens=6, num_beams=1, do_sample=False)
    assert greedy.tolist() == beam.tolist()


def test_sampling_is_reproducible_and_max_length_counts_new_tokens(build, clips):
    processor, model = build("whisper", "qwen3")
    batch = _generate_inputs(processor(clips))
    torch.manual_seed(3)
    first = model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5)
    torch.manual_seed(3)
    second = model.generate(**batch, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=5)
    assert first.tolist() == second.tolist()
    assert model.generate(**batch, max_length=4, min_length=4, do_sample=False).shape == (3, 4)


def test_loss_is_on_text_only(build, clips):
    processor, model = build("wav2vec2-layer", "llama")
    batch = processor(clips, text=["set an alarm", "call mom", "play"], prompt=PROMPTS)
    with torch.no_grad():
        out = model(**batch)
        merged = model.prepare_inputs(**{k: v for k, v in batch.items()})
    # Merged labels are exactly the target tokens; every audio, boundary, prompt and padding position is ignored.
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert merged.labels[merged.labels != IGNORE_INDEX].tolist() == targets.tolist()
    shift_logits, shift_labels = out.logits[:, :-1], merged.labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(shift_logits[keep].float(), shift_labels[keep])
    torch.testing.assert_close(out.loss, manual)

    # Changing what sits under a masked label (the prompt's tokens' labels, text padding) changes nothing...
    padded = dict(batch)
    padded["input_ids"] = batch["input_ids"].masked_fill(batch["decoder_attention_mask"] == 0, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).loss, out.loss, atol=0, rtol=0)
    # ...while changing one text label does.
    changed = dict(batch)
    labels = batch["labels"].clone()
    first_target = (labels[0] != IGNORE_INDEX).nonzero()[0, 0]
    labels[0, first_target] = (labels[0, first_target] + 1) % model.config.vocab_size
    changed["labels"] = labels
    with torch.no_grad():
        assert not torch.equal(model(**changed).loss, out.loss)


BAD_INPUTS = {
    "empty audio": (lambda p: {"input_values": torch.zeros(1, 0)}, "empty"),
    "too short": (lambda p: {"input_values": torch.randn(1, 300)}, "shorter than the encoder's receptive field"),
    "nan": (lambda p: {"input_values": torch.full((1, 8000), float("nan"))}, "NaN or inf"),
    "inf in one clip": (
        lambda p: {"input_values": torch.cat([torch.randn(1, 8000), torch.full((1, 8000), float("inf"))])},
        r"clip\(s\) \[1\]",
    ),
    "batch mismatch": (
        lambda p: {"input_values": torch.randn(2, 8000), **p.encode_text(["a", "b", "c"])},
        "2 audio clip.* but 3 text",
    ),
    "wrong input kind": (lambda p: {"input_features": torch.randn(1, 16, 100)}, "takes raw waveforms"),
    "wrong rank": (lambda p: {"input_values": torch.randn(8000)}, r"must have shape \(batch, samples\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_a_clear_error(build, case):
    processor, model = build("wav2vec2-layer", "qwen2")
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        model.generate(**make(processor), max_new_tokens=2)


def test_whisper_bad_inputs(build):
    _, model = build("whisper", "qwen2")
    with pytest.raises(ValueError, match="position table holds at most 3000"):
        model.generate(input_features=torch.randn(1, 16, 3002), max_new_tokens=2)
    with pytest.raises(ValueError, match="takes log-mel input_features"):
        model.generate(input_values=torch.randn(1, 16000), max_new_tokens=2)


@pytest.mark.parametrize("encoder", ["whisper", "wav2vec2-group"])
def test_cached_encoder_frames_give_the_same_loss_and_generation(build, clips, encoder):
    processor, model = build(encoder, "qwen2")
    batch = processor(clips, text=["set an alarm", "call mom", "play"], prompt=PROMPTS)
    frames, frame_lengths = model.encode_audio(batch[model.audio_input_name], batch["attention_mask"])
    text = {k: batch[k] for k in ("input_ids", "decoder_attention_mask", "labels")}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**text, encoder_frames=frames, encoder_frame_lengths=frame_lengths).loss, model(**batch).loss
        )
    generated = model.generate(**_generate_inputs(batch), max_new_tokens=4)
    cached = model.generate(input_ids=text["input_ids"], decoder_attention_mask=text["decoder_attention_mask"],
                            encoder_frames=frames, encoder_frame_lengths=frame_lengths, max_new_tokens=4)
    assert generated.tolist() == cached.tolist()


def test_training_mode_loss_equals_eval_mode_loss(build, clips):
    """In training mode the LM head skips unlabelled positions; the loss must not change (no dropout in Llama)."""
    processor, model = build("whisper", "llama")
    batch = processor(clips, text=["set an alarm", "call mom tomorrow morning", "play"], prompt=PROMPTS)
    with torch.no_grad():
        eval_loss = model(**batch).loss
        model.train()
        train_out = model(**batch)
    torch.testing.assert_close(train_out.loss, eval_loss)
    assert train_out.logits.shape[1] < model.eval()(**batch).logits.shape[1]



def _lm_head_inputs(model):
    """Records whether each input the LLM's LM head receives is contiguous."""
    seen = []
    hook = model.language_model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous())
    )
    return seen, hook


def test_training_lm_head_reads_a_contiguous_input(build, clips):
    """Skipping unlabelled positions must not hand the LM head a strided view: torch's CPU linear over one copies
    the weight per sample (14x slower for SmolLM2 in bfloat16)."""
    processor, model = build("whisper", "llama")
    batch = processor(clips, text=["set an alarm", "call mom tomorrow morning", "play"], prompt=PROMPTS)
    seen, hook = _lm_head_inputs(model.train())
    with torch.no_grad():
        model(**batch)
    hook.remove()
    assert seen == [True]


def test_generation_lm_head_reads_contiguous_inputs(build, clips):
    """The prefill keeps the last position's logits only; that position reaches the LM head gathered, not strided."""
    processor, model = build("whisper", "llama")
    seen, hook = _lm_head_inputs(model)
    model.generate(**_generate_inputs(processor(clips, prompt=PROMPTS)), max_new_tokens=3, do_sample=False)
    hook.remove()
    assert seen and all(seen)
