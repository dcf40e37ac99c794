"""SpeechLM: any Hugging Face audio encoder + any decoder-only LLM = one speech language model.

Importing the package registers SpeechLM with transformers' `AutoConfig`, `AutoModel` and `AutoProcessor`, so
saved folders load with `trust_remote_code=False` once `speechlm` is imported.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor

from .configuration import SpeechLMConfig
from .factory import create_speech_lm_model
from .modeling import SpeechLMModel
from .processing import SpeechLMProcessor

AutoConfig.register("speechlm", SpeechLMConfig, exist_ok=True)
AutoModel.register(SpeechLMConfig, SpeechLMModel, exist_ok=True)
AutoProcessor.register(SpeechLMConfig, SpeechLMProcessor, exist_ok=True)
# The class transformers' "any-to-any" pipeline loads (audio + text in, text out).
AutoModelForMultimodalLM.register(SpeechLMConfig, SpeechLMModel, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["SpeechLMConfig", "SpeechLMModel", "create_speech_lm_model", "SpeechLMProcessor"]
