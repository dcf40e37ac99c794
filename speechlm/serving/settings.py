"""The server's settings: what it accepts and how it decodes (every field has a `speechlm serve` flag)."""

from __future__ import annotations

from dataclasses import dataclass

from ..inference.decoding import MIN_AUDIO_SECONDS


@dataclass
class ServerSettings:
    """What the server accepts and how it decodes; every field has a `speechlm serve` flag."""

    model_name: str = "speechlm"
    api_key: str | None = None
    max_upload_bytes: int = 25 * 1024 * 1024  # OpenAI's limit
    # Past its first `upload_burst_bytes`, a request's body is read at most this fast: every byte read costs the
    # event loop (parsing, spooling), and a client looping on 25 MB uploads otherwise took a core from everyone.
    max_upload_rate: float = 8 * 1024 * 1024  # bytes per second per request; 0: unlimited
    upload_burst_bytes: int = 2 * 1024 * 1024
    max_audio_seconds: float = 1800.0
    min_audio_seconds: float = MIN_AUDIO_SECONDS
    request_timeout: float = 300.0
    max_batch_size: int = 16
    batch_wait_ms: float = 10.0
    # Padded audio per batch (clips x longest): short clips do not wait in a batch padded to long chunks.
    max_batch_audio_seconds: float = 120.0
    max_chunk_seconds: float = 25.0
    prompt: str | None = None
    max_new_tokens: int | None = None
    num_beams: int | None = None
    # Transcriptions, and the transcript field of chat answers held to a schema that opens with one, decoded jointly
    # with the model's CTC head (speechlm.joint_ctc); None: the weight saved with it.
    joint_ctc_weight: float | None = None
    # Chat answers held to a schema that quotes its values from a transcript (x-speechlm-words-from) are the best
    # beam whose values all are quoted, else the best beam (`speechlm.inference.first_quoted`); needs beams.
    prefer_quoted: bool = False
    # Limits that keep one client from stalling the others (every one has a `speechlm serve` flag).
    max_prompt_chars: int = 2000
    max_prompt_tokens: int = 256
    min_sampling_rate: int = 4000  # declared rates outside this range are refused: 1 Hz makes 1.8 kB "30 minutes"
    max_sampling_rate: int = 384000
    max_concurrent_requests: int = 64  # API requests in flight; more get 503 + Retry-After
    max_connections: int = 512  # open sockets (file descriptors); more are closed at once
    header_timeout: float = 10.0  # seconds for a connection to finish sending a request's headers
    body_timeout: float = 30.0  # seconds the upload may stall between two pieces of its body
    keep_alive_timeout: float = 5.0
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the server's own that may POST
    # /v1/chat/completions: each clip is at most max_chunk_seconds (one encoder window, not split on silence).
    max_chat_clips: int = 8
    max_chat_messages: int = 64
    max_chat_chars: int = 16000  # text of all messages together
    max_chat_tokens: int = 4096  # text tokens of the rendered conversation (audio positions not counted)
    max_completion_tokens: int = 1024  # the most a request's max_tokens may ask for
