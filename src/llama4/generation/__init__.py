"""Generation: chunked prefill, caches by layer kind, sampling, streaming and ragged batches."""

from .engine import ChatSession, decode_step, generate, generate_batch, generate_batch_stream, generate_stream, prefill
from .sampling import SamplingParams, sample

__all__ = ["ChatSession", "SamplingParams", "decode_step", "generate", "generate_batch", "generate_batch_stream",
           "generate_stream", "prefill", "sample"]
