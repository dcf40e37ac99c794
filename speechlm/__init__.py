"""SpeechLM: any Hugging Face audio encoder + any decoder-only LLM = one speech language model."""

from transformers import AutoConfig, AutoModel

from .configuration import SpeechLMConfig
from .factory import create_speech_lm_model
from .modeling import SpeechLMModel

AutoConfig.register("speechlm", SpeechLMConfig, exist_ok=True)
AutoModel.register(SpeechLMConfig, SpeechLMModel, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["SpeechLMConfig", "SpeechLMModel", "create_speech_lm_model", "SpeechLMProcessor"]


def __getattr__(name):
    if name == "SpeechLMProcessor":
        from .processing import SpeechLMProcessor

        return SpeechLMProcessor
    raise AttributeError(name)
