"""KV-cache insertion: an uncached causal LM graph becomes one that keeps each layer's keys and
values between calls, so a decode step computes one token instead of the whole sequence.

``contract`` states the cached graph's interface; ``sequence`` splits the graph into activations
and metadata; ``positions`` recomputes metadata (positions, rotary tables, masks) over past + new
tokens; ``precision`` stores the cache in float32, float16 or int8; ``insert`` is the pass;
``lower`` maps a cached canonical Attention to ONNX Runtime or standard ONNX kernels; ``paged``
(not in the pipeline: the paged runner applies it) turns the cached graph into one whose attention
reads and writes a shared block pool (``paged_op``'s PagedAttention, generated C only).
"""

from .insert import KVCacheInsertion

__all__ = ["KVCacheInsertion"]
