"""Generation: chunked prefill, a KV store sized by layer kind, sampling, streaming, ragged batches, chat sessions."""

from .engine import (compiled_decode_step, decode_step, generate, generate_batch, generate_batch_stream,
                     generate_stream, prefill, prefill_ragged)
from .sampling import SamplingParams, sample
from .session import ChatSession

__all__ = ["ChatSession", "SamplingParams", "compiled_decode_step", "decode_step", "generate", "generate_batch",
           "generate_batch_stream", "generate_stream", "prefill", "prefill_ragged", "sample"]
