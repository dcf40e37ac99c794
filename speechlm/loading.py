"""Load a trained SpeechLM for decoding: dtype choice, int8 quantisation of the LLM, LoRA merged.

The one home of `load_pretrained` (transcribe, evaluate, serve and the demo load through it). Torch and the model code
are imported inside the functions, so the option choices below can be read by `speechlm CMD --help` without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .modeling import SpeechLMModel

QUANTIZE_CHOICES = ("auto", "none", "int8")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def load_pretrained(path: str, dtype: torch.dtype | str | None = "auto", device: str | torch.device | None = None,
                    quantize: str | None = None, merge_lora: bool = False):
    """(processor, model) from a folder written by training / `save_pretrained` (model + processor side by side).

    `dtype="auto"` (default) decodes in what the hardware does fast and exactly (`resolve_dtype`: float32 on a CPU
    even when the checkpoint was saved in bf16), None keeps the checkpoint's dtype. `quantize="int8"` quantises the
    LLM's linear layers for decoding (`quantize_language_model`), `quantize="auto"` does so on a CPU unless a 16-bit
    dtype is asked for (`resolve_quantize`). `merge_lora=True` folds LoRA adapters into the LLM (inference only:
    less work per token).
    """
    import torch

    from .modeling import SpeechLMModel
    from .processing import SpeechLMProcessor

    device = torch.device(device) if device is not None else None
    quantize = resolve_quantize(quantize, device or torch.device("cpu"), dtype)
    if quantize and device is not None and device.type != "cpu":
        raise ValueError(f"quantize={quantize!r} runs on the CPU only (dynamic int8 kernels), not on {device}")
    dtype = resolve_dtype(dtype, device or "cpu", quantize)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = SpeechLMModel.from_pretrained(path, **kwargs).eval()
    if merge_lora or quantize:
        model.merge_lora()
    if device is not None:
        model = model.to(device)
    if quantize:
        quantize_language_model(model, quantize)
    processor = SpeechLMProcessor.from_pretrained(path)
    return processor, model


def resolve_quantize(quantize: str | None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | str | None = None) -> str | None:
    """None or "int8". `auto` = int8 on a CPU that has a quantised-kernel engine, unless `dtype` asks for 16 bits.

    Not the default, because float32 is the exact path: with int8, a clip's tokens can change with its batch-mates
    (per-token scales keep the linear layers row-exact, but rounding to int8 turns float noise from padded attention
    into whole quantisation steps: 45 of 200 demo clips differed between batch 1 and 8). Accuracy is kept: see
    benchmarks/results/int8_wer.md. GPUs decode in their own dtype.
    """
    import torch

    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if quantize != "auto":
        return None if quantize in (None, "none") else quantize
    sixteen_bits = (torch.bfloat16, torch.float16, "bfloat16", "float16")
    engines = set(torch.backends.quantized.supported_engines) - {"none"}
    cpu = torch.device(device).type == "cpu"
    return "int8" if cpu and engines and dtype not in sixteen_bits else None


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device = "cpu",
                  quantize: str | None = None) -> torch.dtype | None:
    """The dtype to load with: `auto` = what this hardware decodes fastest in (`hardware.choose_decoding_dtype`),
    None = the checkpoint's own. int8 quantisation needs float32 weights to quantise, so it forces float32."""
    import torch

    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
        if dtype == "auto":
            from .hardware import choose_decoding_dtype

            return torch.float32 if quantize else choose_decoding_dtype(device).dtype
        dtype = getattr(torch, dtype)
    if quantize and dtype not in (None, torch.float32):
        raise ValueError(f"quantize={quantize!r} quantises float32 weights; drop dtype={dtype} (or use float32)")
    return torch.float32 if quantize else dtype


def quantize_language_model(model: SpeechLMModel, scheme: str = "int8") -> SpeechLMModel:
    """Dynamic int8 quantisation of every linear layer of the LLM (LM head included), in place, for CPU decoding.

    Per-channel weight scales, per-token activation scales (`speechlm.quantization`): a loud batch-mate or audio
    token no longer sets a quiet token's step. The encoder and projector stay in floating point: they run once per
    clip. LoRA adapters must be merged first.
    """
    from .quantization import QUANTIZATION_SCHEMES, quantize_linear_layers

    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"unsupported quantisation scheme {scheme!r}; supported: {', '.join(QUANTIZATION_SCHEMES)}")
    if any("lora_" in name for name, _ in model.language_model.named_parameters()):
        raise ValueError("merge the LoRA adapters (model.merge_lora()) before quantising the LLM")
    quantize_linear_layers(model.language_model.float())
    return model


__all__ = ["DTYPE_CHOICES", "QUANTIZE_CHOICES", "load_pretrained", "quantize_language_model", "resolve_dtype",
           "resolve_quantize"]
