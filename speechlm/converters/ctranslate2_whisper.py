"""CTranslate2 Whisper -> transformers Whisper: weight names, configuration, generation settings and tokenizer.

Everything is inferred from the tensors' shapes and the files' tokens, so any Whisper size (tiny..large-v3, .en or
multilingual) maps; a variable the mapping does not understand is an error, never silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperTokenizer

from .ctranslate2_file import CTranslate2ModelFile

# ctranslate2.specs.common_spec.Activation.GELU
CT2_GELU = 3
# Whisper's multilingual vocabulary has one more token (<|yue|> aside) than the English-only one (51864).
MULTILINGUAL_VOCAB_SIZE = 51865
WHISPER_TIME_PRECISION = 0.02


def read_json(path: Path) -> dict:
    """The JSON object in `path`; an unreadable file or another JSON type is a `ValueError` naming the file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Weights: CTranslate2 names -> transformers names
# ---------------------------------------------------------------------------------------------------------------------


class StateDictBuilder:
    """Collects transformers tensors from CTranslate2 variables and remembers which variables were used.

    Remembering lets the caller reject files with weights this mapping does not understand (e.g. Lite-Whisper
    low-rank layers) instead of silently dropping them.
    """

    def __init__(self, ct2: CTranslate2ModelFile, dtype: torch.dtype):
        self.ct2 = ct2
        self.dtype = dtype
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        tensor = self.ct2.tensor(name)
        self.used.add(name)
        scale_name = f"{name}_scale"
        if scale_name in self.ct2:
            # int8 (per output row) or int16 (one scale) quantization: stored = round(weight * scale).
            scale = self.ct2.tensor(scale_name).float()
            self.used.add(scale_name)
            if tensor.dim() == 2 and scale.dim() == 1:
                scale = scale[:, None]
            tensor = tensor.float() / scale
        elif not tensor.is_floating_point():
            raise ValueError(
                f"{self.ct2.path}: variable {name!r} is stored as {tensor.dtype} without a scale; "
                "this quantization scheme is not supported"
            )
        return tensor.to(self.dtype)

    def copy(self, target: str, source: str) -> None:
        self.state[target] = self.get(source)

    def layer_norm(self, target: str, source: str) -> None:
        self.copy(f"{target}.weight", f"{source}/gamma")
        self.copy(f"{target}.bias", f"{source}/beta")

    def linear(self, target: str, source: str) -> None:
        self.copy(f"{target}.weight", f"{source}/weight")
        self.copy(f"{target}.bias", f"{source}/bias")

    def fused_linear(self, targets: list[str], source: str, width: int, biased: list[bool]) -> None:
        """Split a CTranslate2 fused projection (rows stacked as [q; k; v] or [k; v]) into separate layers.

        CTranslate2 stores a zero bias for Whisper's bias-free k projection; dropping it is exact either way, since
        a key bias only adds a per-query constant to the attention logits and softmax ignores it.
        """
        weight = self.get(f"{source}/weight")
        if weight.shape[0] != width * len(targets):
            raise ValueError(
                f"{self.ct2.path}: {source}/weight has shape {list(weight.shape)}, expected "
                f"{len(targets)} x {width} fused rows"
            )
        bias = self.get(f"{source}/bias") if f"{source}/bias" in self.ct2 else None
        for index, target in enumerate(targets):
            rows = slice(index * width, (index + 1) * width)
            self.state[f"{target}.weight"] = weight[rows].clone()
            if biased[index]:
                self.state[f"{target}.bias"] = (
                    bias[rows].clone() if bias is not None else torch.zeros(width, dtype=self.dtype)
                )

    def check_all_used(self, prefix: str) -> None:
        """Fail on any tensor under `prefix` that was not mapped (scalars are configuration, read elsewhere)."""
        leftover = sorted(
            name
            for name in self.ct2.names()
            if name.startswith(prefix) and name not in self.used and self.ct2.shape(name) != ()
        )
        if leftover:
            shown = ", ".join(leftover[:8]) + (" ..." if len(leftover) > 8 else "")
            raise ValueError(
                f"{self.ct2.path}: unsupported CTranslate2 Whisper variant, {len(leftover)} variable(s) have no "
                f"transformers counterpart: {shown}"
            )


def _layer_count(ct2: CTranslate2ModelFile, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(match.group(1)) for name in ct2.names() if (match := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{ct2.path}: {stack} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _self_attention_state(builder: StateDictBuilder, target: str, source: str, width: int) -> None:
    """One layer's self-attention: CTranslate2 fuses q, k, v (k has no bias in Whisper) into linear_0."""
    builder.fused_linear(
        [f"{target}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
        f"{source}/self_attention/linear_0",
        width,
        biased=[True, False, True],
    )
    builder.linear(f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")
    builder.layer_norm(f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")


def encoder_state(builder: StateDictBuilder, config: WhisperConfig, prefix: str) -> None:
    width = config.d_model
    for conv in ("conv1", "conv2"):
        builder.linear(f"{prefix}{conv}", f"encoder/{conv}")
    builder.copy(f"{prefix}embed_positions.weight", "encoder/position_encodings/encodings")
    for i in range(config.encoder_layers):
        source, target = f"encoder/layer_{i}", f"{prefix}layers.{i}"
        _self_attention_state(builder, target, source, width)
        builder.linear(f"{target}.fc1", f"{source}/ffn/linear_0")
        builder.linear(f"{target}.fc2", f"{source}/ffn/linear_1")
        builder.layer_norm(f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
    builder.layer_norm(f"{prefix}layer_norm", "encoder/layer_norm")
    builder.check_all_used("encoder/")


def decoder_state(builder: StateDictBuilder, config: WhisperConfig, prefix: str) -> None:
    width = config.d_model
    builder.copy(f"{prefix}embed_tokens.weight", "decoder/embeddings/weight")
    builder.copy(f"{prefix}embed_positions.weight", "decoder/position_encodings/encodings")
    for i in range(config.decoder_layers):
        source, target = f"decoder/layer_{i}", f"{prefix}layers.{i}"
        _self_attention_state(builder, target, source, width)
        # Cross-attention: linear_0 = q (from the decoder), linear_1 = fused [k; v] (from the encoder), linear_2 = out.
        builder.linear(f"{target}.encoder_attn.q_proj", f"{source}/attention/linear_0")
        builder.fused_linear(
            [f"{target}.encoder_attn.{p}" for p in ("k_proj", "v_proj")],
            f"{source}/attention/linear_1",
            width,
            biased=[False, True],
        )
        builder.linear(f"{target}.encoder_attn.out_proj", f"{source}/attention/linear_2")
        builder.layer_norm(f"{target}.encoder_attn_layer_norm", f"{source}/attention/layer_norm")
        builder.linear(f"{target}.fc1", f"{source}/ffn/linear_0")
        builder.linear(f"{target}.fc2", f"{source}/ffn/linear_1")
        builder.layer_norm(f"{target}.final_layer_norm", f"{source}/ffn/layer_norm")
    builder.layer_norm(f"{prefix}layer_norm", "decoder/layer_norm")
    if config.tie_word_embeddings:
        builder.state["proj_out.weight"] = builder.state[f"{prefix}embed_tokens.weight"]
        builder.used.add("decoder/projection/weight")
    else:
        builder.copy("proj_out.weight", "decoder/projection/weight")
    bias = "decoder/projection/bias"
    if bias in builder.ct2:
        if builder.get(bias).abs().max() != 0:
            raise ValueError(f"{builder.ct2.path}: a non-zero {bias} has no counterpart in transformers Whisper")
    builder.check_all_used("decoder/")


# ---------------------------------------------------------------------------------------------------------------------
# Configuration, tokenizer, feature extractor
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class SpecialTokens:
    end_of_text: int
    start_of_transcript: int
    no_timestamps: int
    start_of_prev: int | None
    translate: int | None
    transcribe: int | None
    languages: dict[str, int]
    special: list[str]


def special_tokens(tokenizer_file: Path) -> SpecialTokens:
    """Whisper's control tokens, read from the added tokens of `tokenizer.json` (ids differ between .en and not)."""
    added = read_json(tokenizer_file).get("added_tokens") or []
    ids = {token["content"]: token["id"] for token in added if isinstance(token, dict) and "content" in token}
    for required in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if required not in ids:
            raise ValueError(f"{tokenizer_file} has no {required} token; is it a Whisper tokenizer?")
    controls = {"<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>", "<|endoftext|>"}
    controls |= {"<|startoftranscript|>", "<|translate|>", "<|transcribe|>"}
    languages = {
        content: token_id
        for content, token_id in ids.items()
        if re.fullmatch(r"<\|[a-z]{2,3}(_[a-zA-Z]+)?\|>", content) and content not in controls
    }
    special = [
        token["content"]
        for token in sorted(added, key=lambda token: token["id"])
        if token.get("special") and token["content"] != "<|endoftext|>"
    ]
    return SpecialTokens(
        end_of_text=ids["<|endoftext|>"],
        start_of_transcript=ids["<|startoftranscript|>"],
        no_timestamps=ids["<|notimestamps|>"],
        start_of_prev=ids.get("<|startofprev|>"),
        translate=ids.get("<|translate|>"),
        transcribe=ids.get("<|transcribe|>"),
        languages=languages,
        special=special,
    )


def whisper_config(ct2: CTranslate2ModelFile, tokens: SpecialTokens, ct2_config: dict) -> WhisperConfig:
    """A WhisperConfig inferred from tensor shapes and flags, so any Whisper size (tiny..large-v3) loads."""
    path = ct2.path

    def flag(name: str, expected, description: str) -> None:
        value = ct2.scalar(name, expected)
        if value != expected:
            raise ValueError(f"{path}: {name} = {value}; only {description} is supported")

    flag("decoder/pre_norm", 1, "pre-norm Whisper")
    flag("decoder/alibi", 0, "Whisper without ALiBi")
    flag("decoder/scale_embeddings", 0, "unscaled embeddings")
    flag("decoder/activation", CT2_GELU, "the GELU activation")
    for name in ("encoder/conv1/weight", "encoder/layer_0/ffn/linear_0/weight", "decoder/embeddings/weight"):
        if name not in ct2:
            raise ValueError(f"{path}: missing variable {name!r}; not a Whisper model")
    d_model, num_mel_bins, _ = ct2.shape("encoder/conv1/weight")
    vocab_size = ct2.shape("decoder/embeddings/weight")[0]
    heads = {stack: int(ct2.scalar(f"{stack}/num_heads", 0)) for stack in ("encoder", "decoder")}
    for stack, count in heads.items():
        if count <= 0 or d_model % count:
            raise ValueError(f"{path}: {stack}/num_heads = {count} does not divide d_model = {d_model}")
    projection = "decoder/projection/weight"
    tied = projection not in ct2 or ct2.resolve(projection) == "decoder/embeddings/weight"
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=heads["encoder"],
        decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=ct2.shape("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=ct2.shape("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=ct2.shape("encoder/position_encodings/encodings")[0],
        max_target_positions=ct2.shape("decoder/position_encodings/encodings")[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=tied,
        pad_token_id=tokens.end_of_text,
        bos_token_id=tokens.start_of_transcript,
        eos_token_id=tokens.end_of_text,
        decoder_start_token_id=tokens.start_of_transcript,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin") or [220, tokens.end_of_text],
    )


def generation_config(config: WhisperConfig, tokens: SpecialTokens, ct2_config: dict) -> GenerationConfig:
    """The Whisper-specific generation settings `WhisperForConditionalGeneration.generate` relies on."""
    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB_SIZE
    generation = GenerationConfig(
        bos_token_id=tokens.start_of_transcript,
        decoder_start_token_id=tokens.start_of_transcript,
        eos_token_id=tokens.end_of_text,
        pad_token_id=tokens.end_of_text,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=tokens.no_timestamps,
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if tokens.start_of_prev is not None:
        generation.prev_sot_token_id = tokens.start_of_prev
    if multilingual:
        generation.lang_to_id = dict(tokens.languages)
        generation.task_to_id = {
            task: token_id
            for task, token_id in (("translate", tokens.translate), ("transcribe", tokens.transcribe))
            if token_id is not None
        }
    return generation


def whisper_tokenizer(tokenizer_file: Path, tokens: SpecialTokens, vocab_size: int) -> PreTrainedTokenizerFast:
    """A WhisperTokenizer from `tokenizer.json`, with Whisper's control and timestamp tokens registered.

    faster-whisper's `tokenizer.json` lacks the 1501 timestamp tokens the model's vocabulary ends with; adding them
    (as non-special tokens, like the Hugging Face checkpoints) makes `len(tokenizer)` match the model and lets
    `decode(..., decode_with_timestamps=True)` render them.
    """
    end_of_text = "<|endoftext|>"
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        unk_token=end_of_text,
        bos_token=end_of_text,
        eos_token=end_of_text,
        pad_token=end_of_text,
        extra_special_tokens=tokens.special,
        model_max_length=1024,
    )
    first_timestamp = tokens.no_timestamps + 1
    if len(tokenizer) == first_timestamp and vocab_size > first_timestamp:
        timestamps = [f"<|{i * WHISPER_TIME_PRECISION:.2f}|>" for i in range(vocab_size - first_timestamp)]
        tokenizer.add_tokens(timestamps)
    return tokenizer


__all__ = [
    "SpecialTokens",
    "StateDictBuilder",
    "decoder_state",
    "encoder_state",
    "generation_config",
    "read_json",
    "special_tokens",
    "whisper_config",
    "whisper_tokenizer",
]
