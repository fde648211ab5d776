"""Generation: chunked prefill, caches by layer kind, sampling, streaming and ragged batches."""

from .engine import decode_step, generate, generate_batch, generate_batch_stream, generate_stream, prefill
from .sampling import SamplingParams, sample

__all__ = ["SamplingParams", "decode_step", "generate", "generate_batch", "generate_batch_stream",
           "generate_stream", "prefill", "sample"]
