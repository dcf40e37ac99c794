"""The files of a saved SpeechLM folder beside transformers' own: trainable-only weights (rebuilt on the recorded base
models at load), LoRA adapters in peft's format, the `auto_map` module and the model card.

Functions that create a model take its class as an argument (and `SpeechLMCheckpointMixin` uses `cls`), so
`modeling` imports this module at the top and this module imports no model code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .base_models import build_from_config, make_portable, portable_base_model, restore_names, without_hub_kernels
from .configuration import SpeechLMConfig

TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"
LORA_ADAPTER_DIR = "language_model_adapter"  # peft's own format, for PeftModel.from_pretrained(model.language_model)
MODEL_CARD_MARK = "<!-- written by speechlm: save_pretrained rewrites this card; remove this line to keep edits -->"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def save_trainable_only(model, save_directory: str, state_dict: dict | None = None) -> None:
    """Projector, audio start/end, CTC head and whatever else trains (LoRA goes to `LORA_ADAPTER_DIR`), plus a
    config recording portable base model ids (`portable_base_model`). The values come from `state_dict` where given
    (`_weights`)."""
    from safetensors.torch import save_file

    config = model.config.__class__.from_dict(model.config.to_dict())
    for side in ("encoder", "decoder"):
        if not getattr(config, f"{side}_name_or_path"):
            raise ValueError(f"trainable_only needs config.{side}_name_or_path (the base model to rebuild on)")
    make_portable(config)
    os.makedirs(save_directory, exist_ok=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    names |= {"audio_start", "audio_end"}
    names |= {n for n, _ in model.named_parameters() if n.startswith("ctc_head.")}
    weights = _weights(model, state_dict)
    state = {n: weights[n].detach().contiguous().cpu() for n, _ in model.named_parameters()
             if n in names and "lora_" not in n}
    save_file(state, os.path.join(save_directory, TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
    config.trainable_only = True
    config.save_pretrained(save_directory)
    model.generation_config.save_pretrained(save_directory)


def load_trainable_only(model_class: type, path: str, config: SpeechLMConfig | None = None, dtype=None,
                        encoder: str | None = None, decoder: str | None = None, **hub_kwargs):
    """A trainable-only folder or hub repo rebuilt as a `model_class` on its base models, with the folder's
    generation_config.json; None when `path` is not one.

    `cache_dir` / `local_files_only` / `token` / `force_download` also reach the base models' loading.
    """
    from safetensors.torch import load_file
    from transformers import GenerationConfig
    from transformers.utils import GENERATION_CONFIG_NAME, cached_file

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and v is not None}
    found = cached_file(path, TRAINABLE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    if found is None:
        return None
    if config is None:
        config = SpeechLMConfig.from_pretrained(path, **hub_kwargs)
    shared = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "force_download", "local_files_only", "token")}
    model = build_from_config(model_class, config, dtype=dtype, encoder=encoder, decoder=decoder, checkpoint=str(path),
                              hub_kwargs=shared)
    state = load_file(found)
    adapter = cached_file(path, f"{LORA_ADAPTER_DIR}/adapter_model.safetensors",
                          _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False, **hub_kwargs)
    if adapter is not None:
        state.update({f"language_model.{k}": v for k, v in lora_state_from_peft(load_file(adapter)).items()})
    parameters = dict(model.named_parameters())
    unknown = set(state) - set(parameters)
    if unknown:
        raise ValueError(f"{found} holds weights the rebuilt model lacks: {sorted(unknown)[:5]}")
    model.load_state_dict(state, strict=False)
    model.config.trainable_only = False
    if cached_file(path, GENERATION_CONFIG_NAME, _raise_exceptions_for_missing_entries=False,
                   _raise_exceptions_for_connection_errors=False, **hub_kwargs) is not None:
        model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
    return model.eval()


def _lora_parameters(model) -> dict:
    return {n: p for n, p in model.language_model.named_parameters() if "lora_" in n}


def _weights(model, state_dict: dict | None = None) -> dict:
    """Parameter name -> value: from `state_dict` where the caller gathered one (transformers' Trainer hands the full
    weights of an FSDP- or ZeRO-3-sharded model to `save_pretrained`; the live parameters are shards), else live."""
    if state_dict is None:
        return dict(model.named_parameters())
    return {n: state_dict[n] for n, _ in model.named_parameters() if n in state_dict}


def lora_state_to_peft(state: dict) -> dict:
    """Injected names (`...q_proj.lora_A.default.weight`) -> peft's saved ones (`base_model.model....lora_A.weight`)."""
    return {"base_model.model." + re.sub(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)", r".\1", k): v
            for k, v in state.items()}


def lora_state_from_peft(state: dict) -> dict:
    return {re.sub(r"\.(lora_[A-Za-z_]+)(?=\.|$)", r".\1.default", k.removeprefix("base_model.model.")): v
            for k, v in state.items()}


def save_lora_adapter(model, save_directory: str, state_dict: dict | None = None) -> None:
    """The decoder's LoRA adapters in peft's format: `PeftModel.from_pretrained(language_model, folder)` reads them."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.language_model.named_modules()
                      if isinstance(module, BaseTunerLayer)})
    decoder, _ = portable_base_model(model.config.decoder_name_or_path or "", {})
    settings = {**model.config.lora, "target_modules": targets}
    config = LoraConfig(**settings, task_type="CAUSAL_LM", base_model_name_or_path=decoder or None)
    folder = os.path.join(save_directory, LORA_ADAPTER_DIR)
    config.save_pretrained(folder)
    weights = _weights(model, state_dict)
    state = {k: weights["language_model." + k].detach().contiguous().cpu() for k in _lora_parameters(model)}
    save_file(lora_state_to_peft(state), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def write_model_card(model, save_directory: str, metrics: dict | None = None,
                     pipeline_tag: str | None = None, trainable_only: bool = False) -> None:
    """README.md with hub metadata (base models, pipeline_tag, library, metrics); a card without our mark is kept."""
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(save_directory, "README.md")
    if os.path.isfile(path) and MODEL_CARD_MARK not in Path(path).read_text(encoding="utf-8"):
        return
    config = model.config
    bases = [portable_base_model(getattr(config, f"{side}_name_or_path") or "", {})[0]
             for side in ("encoder", "decoder")]
    hub_ids = [b for b in bases if b and not os.path.isabs(b) and not b.startswith(".")]
    data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline_tag or "automatic-speech-recognition",
        base_model=hub_ids or None, tags=["speechlm", "audio", "speech", "custom_code"],
        metrics=sorted(metrics) if metrics else None,
    )
    kind = ("Trainable-only checkpoint: the projector (and LoRA adapters) only; loading fetches the base models "
            "above (override with `encoder=` / `decoder=`)." if trainable_only else "Full checkpoint.")
    lines = [MODEL_CARD_MARK, "", f"# SpeechLM: {bases[0]} + {bases[1]}", "",
             "Audio encoder -> projector -> decoder-only LLM, built with SpeechLM "
             f"(audio layout `{config.audio_layout}`). {kind}", "", "## Usage", "", "```python",
             "import speechlm  # registers SpeechLM with transformers' Auto classes",
             "from transformers import AutoModel, AutoProcessor", "",
             'model = AutoModel.from_pretrained("<this repo or folder>")',
             'processor = AutoProcessor.from_pretrained("<this repo or folder>")',
             "inputs = processor(audio_arrays)  # list of 1-D float arrays at the encoder's sampling rate",
             "print(processor.batch_decode(model.generate(**inputs, max_new_tokens=64)))", "```"]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in metrics.items()]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(path)


def save_checkpoint_extras(model, save_directory: str, trainable_only: bool = False, metrics: dict | None = None,
                           pipeline_tag: str | None = None, state_dict: dict | None = None) -> None:
    """What every saved folder gets beside the weights: peft adapters, the `auto_map` module and the model card."""
    from .configuration import write_remote_code

    if model.config.lora and _lora_parameters(model):
        save_lora_adapter(model, save_directory, state_dict)
    write_remote_code(save_directory)
    write_model_card(model, save_directory, metrics, pipeline_tag, trainable_only)


class SpeechLMCheckpointMixin:
    """`save_pretrained` / `push_to_hub` / `from_pretrained` that also handle these files.

    Listed before `PreTrainedModel` in the model's bases, so each override's `super()` reaches transformers' own.
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args, trainable_only: bool = False,
                        metrics: dict | None = None, pipeline_tag: str | None = None, **kwargs):
        """Save the model; with `trainable_only=True` save just the trained weights plus the base models' ids.

        A trainable-only folder holds the projector, the audio start/end embeddings, the CTC head and whatever else
        requires grad (MBs instead of GBs), with the base models recorded as hub ids + revision where known
        (`base_models.portable_base_model`); `from_pretrained` rebuilds them and loads these weights on top. Every
        folder also gets LoRA adapters in peft's format (`language_model_adapter/`), the module `auto_map` names
        and a model card (README.md: base models, `pipeline_tag`, `metrics` if given).
        """
        # The gathered weights of a sharded model (FSDP, ZeRO-3); copied, since transformers' save empties the dict.
        state_dict = None if kwargs.get("state_dict") is None else dict(kwargs["state_dict"])
        if trainable_only:
            save_trainable_only(self, str(save_directory), state_dict)
        else:
            old_names = make_portable(self.config)  # no machine-specific paths in a folder that may be shared
            try:
                super().save_pretrained(save_directory, *args, **kwargs)
            finally:
                restore_names(self.config, old_names)
        save_checkpoint_extras(self, str(save_directory), trainable_only, metrics, pipeline_tag, state_dict)

    def push_to_hub(self, repo_id: str, *, trainable_only: bool = False, metrics: dict | None = None,
                    pipeline_tag: str | None = None, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False, **kwargs):
        """Upload what `save_pretrained` writes (with its model card, not transformers' generic one)."""
        import tempfile

        from transformers.utils import hub

        repo_id = hub.hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, trainable_only=trainable_only, metrics=metrics, pipeline_tag=pipeline_tag,
                                 **kwargs)
            return self._upload_modified_files(folder, repo_id, files_timestamps={},
                                               commit_message=commit_message or "Upload SpeechLM model",
                                               token=token, create_pr=create_pr, revision=revision)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, encoder: str | None = None,
                        decoder: str | None = None, **kwargs):
        """Load a full checkpoint, or a trainable-only one (folder or hub repo) on top of its base models.

        `encoder` / `decoder` (hub id or folder) replace a trainable-only checkpoint's recorded base models.
        """
        path = str(pretrained_model_name_or_path)
        options = {k: v for k, v in kwargs.items() if k not in ("config", "dtype", "torch_dtype")}
        model = load_trainable_only(cls, path, config=kwargs.get("config"), dtype=kwargs.get("dtype", kwargs.get(
            "torch_dtype")), encoder=encoder, decoder=decoder, **options)
        if model is not None:
            return model
        if encoder is not None or decoder is not None:
            raise ValueError(f"encoder= / decoder= replace the base models of a trainable-only checkpoint, but {path} "
                             "is a full checkpoint that holds its base weights")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **without_hub_kernels(kwargs))


__all__ = ["LORA_ADAPTER_DIR", "MODEL_CARD_MARK", "TRAINABLE_WEIGHTS_NAME", "SpeechLMCheckpointMixin",
           "load_trainable_only", "lora_state_from_peft", "lora_state_to_peft", "save_checkpoint_extras",
           "save_lora_adapter", "save_trainable_only", "write_model_card"]
