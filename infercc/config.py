"""The one configuration object. Every optimization option lives here with its default; every
value is validated when the config is made, with an error naming the field and what it allows."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, reject_unknown

PROVIDERS = ("auto", "cpu", "cuda")
LOWERINGS = ("ort", "onnx")
BACKENDS = ("ort", "c", "auto")
QUANTIZE = ("auto", None, "int8", "int4")
QUANT_BLOCKS = (16, 32, 64, 128)
QUANT_METHODS = ("gptq", "mse", "rtn")
QUANT_ROLES = ("keep", "int8", "int4")
MASKINGS = ("auto", "causal", "none")
KV_CACHE_DTYPES = ("auto", "fp32", "fp16", "int8")
KV_CACHE_LAYOUTS = ("paged", "contiguous")
SPECULATIONS = (None, "auto", "prompt_lookup", "draft", "self_draft", "medusa", "eagle")
LORA_COMPOSITIONS = ("stack", "merge")
SPECULATION_POLICIES = ("auto", "latency", "throughput", "fixed")


def default_backend() -> str:
    """Config.backend's default: $INFERCC_BACKEND when set, else "auto"."""
    value = os.environ.get("INFERCC_BACKEND", "").strip()
    if not value:
        return "auto"
    if value not in BACKENDS:
        raise ConfigError(f"the environment variable INFERCC_BACKEND must be one of {list(BACKENDS)}, got {value!r}; "
                          "set it to one of them or unset it (the default is 'auto')")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    #: Run the optimization pipeline. False = import and export only (a faithful round trip).
    optimize: bool = True
    #: Names of passes to leave out (see ``infercc.passes.pass_names()``).
    disable_passes: tuple[str, ...] = ()
    #: Re-raise a failing pass instead of rolling it back and going on.
    strict: bool = False
    #: After every pass that changed the graph, compare outputs with the input model on random feeds
    #: and roll the pass back if they differ by more than ``check_tolerance``. Slower; for debugging.
    check_each_pass: bool = False
    #: Max absolute difference allowed by ``check_each_pass`` (relative to max(1, |reference|)).
    check_tolerance: float = 1e-4
    #: Execution provider: "auto" (CUDA if onnxruntime has it and a GPU is present, else CPU), "cpu", "cuda".
    provider: str = "auto"
    #: onnxruntime intra-op threads; 0 lets onnxruntime choose (one per physical core).
    intra_op_threads: int = 0
    #: onnxruntime inter-op threads; 0 lets onnxruntime choose.
    inter_op_threads: int = 0
    #: Lower canonical ops to ONNX Runtime contrib ops ("ort", fastest under ORT) or to standard
    #: ONNX only ("onnx", a portable artifact any runtime loads).
    lowering: str = "ort"
    #: The runtime: "ort" (ONNX Runtime), "c" (the generated-C kernel runtime: the canonical ops are
    #: kept, the graph becomes one C file built by gcc; a model it cannot run -- an op without a C
    #: kernel, no compiler -- falls back to ONNX Runtime with a warning saying why), "auto" (C on a
    #: CPU when every op is covered, else ONNX Runtime, silently; CUDA, and a standard-ONNX graph
    #: asked for with lowering="onnx", are always ONNX Runtime).
    #: ``CompiledModel.runtime`` says which one runs. Default "auto": on the benchmarks the C
    #: runtime decodes SmolLM2-135M Q4_1 ~1.8x faster than ONNX Runtime and prefills ~1.3x faster
    #: (2 AVX2 cores); its first run of a model pays a gcc build (cached per source, flags and
    #: compiler). The environment variable ``INFERCC_BACKEND`` (ort, c or auto) sets the default of
    #: a process, e.g. a deployment or a test suite that pins ONNX Runtime.
    backend: str = dataclasses.field(default_factory=default_backend)
    #: Once the generated-C runtime has packed the weights into its own blob, move the IR's copy of
    #: every large initializer out of memory (a read-only map of a temporary file, or of the saved
    #: model's external data: ir/offload.py), so the weights are resident once. Everything that reads
    #: them (save, speculation heads, LoRA, the ONNX Runtime fallback) reads the map. False keeps both.
    offload_weights: bool = True
    #: Attention masking: "auto" keeps what each attention's mask computes (causal where the model
    #: builds a causal triangle; encoders stay bidirectional), "causal" forces a causal mask,
    #: "none" removes the causal triangle and sliding window (padding masks stay). A policy that
    #: contradicts the model's mask changes its outputs and is reported as a warning.
    masking: str = "auto"
    #: Insert a KV cache into causal LMs (passes/kv_cache): the compiled graph then takes
    #: ``attention_mask`` [batch, past+seq] and ``past_key_values.{i}.key/value`` [batch, kv_heads,
    #: past, head_size] and returns ``present.{i}.key/value`` (past+seq), so a decode step computes
    #: only the new tokens. Encoders, graphs that already have a cache and graphs the pass cannot
    #: prove right are left alone, with the reason in the diagnostics. False keeps the source's
    #: interface (every step recomputes the whole sequence).
    kv_cache: bool = True
    #: Element type of the KV cache: "auto" (the model's float type; see
    #: passes/kv_cache/precision.py for why not float16 on CPU), "fp32", "fp16" (half the memory),
    #: "int8" (about a quarter: int8 values plus one float32 scale per token and head, carried as
    #: extra ``*_scale`` inputs/outputs). The diagnostics report the bytes per token.
    kv_cache_dtype: str = "auto"
    #: How the serving engine (runtime/engine.py: sessions, batched ``generate``, ``infercc serve``)
    #: stores K/V: "paged" (the default, as vLLM and TGI: one pool of fixed-size blocks shared by all
    #: requests, per-sequence block tables, prefix caching, no per-sequence max-length reservation)
    #: or "contiguous" (each sequence owns a buffer that grows by doubling).
    kv_cache_layout: str = "paged"
    #: Tokens per KV block of the paged layout.
    kv_block_size: int = 16
    #: Bytes of KV cache the serving engine may hold (all requests together); 0 = auto (a quarter of
    #: the memory available when the engine starts, at most 4 GiB).
    kv_cache_memory: int = 0
    #: Tokens one engine step computes at most (decode tokens of running requests first, then
    #: chunks of waiting prompts: chunked prefill).
    max_batch_tokens: int = 1024
    #: Requests running at once at most; more wait in the queue.
    max_num_seqs: int = 64
    #: Speculative decoding (runtime/speculative/): each step a cheap proposer guesses up to
    #: ``num_speculative_tokens`` next tokens and the model checks them all in one forward run
    #: (decoding a small model on a CPU is bound by reading the weights once per step, so a step
    #: over k+1 tokens costs little more than over one). The output is the same as without it:
    #: greedy tokens identical, sampled ones from the same distribution (rejection sampling).
    #: None (off), "prompt_lookup" (n-gram match of the last tokens in the prompt and output so
    #: far: no extra model; pays off on input-grounded text: summaries, answers from a passage,
    #: code edits), "draft" (a smaller model, ``draft_model``; without one, the target's own first
    #: ``draft_layers`` layers: "self_draft"), "self_draft", "medusa" (k heads on the model's final
    #: hidden state, ``speculation_heads``: ``infercc train-heads`` makes them), "eagle" (one
    #: draft decoder layer on the model's features, guessing a token at a time, ``speculation_heads``:
    #: ``infercc train-heads --kind eagle``), or "auto" (prompt lookup, its depth
    #: following the measured acceptance rate: switched off where guesses keep failing). Default
    #: None: a rejected guess costs a wider step, and on free-form chat prompt lookup rarely
    #: matches, so speculation is asked for per model or per request (``speculation=``).
    speculation: str | None = None
    #: How deep to speculate: "latency" (batch 1 thinking: keep the full depth while acceptance
    #: pays), "throughput" (speculate only while the batch is small and the queue empty), "auto"
    #: (latency alone, less as the batch and queue grow and when free KV blocks run short), "fixed"
    #: (always ``num_speculative_tokens``, whatever the acceptance and the timing, as vLLM's
    #: speculative decoding does: for measuring acceptance and for reproducible runs; off only when
    #: KV blocks run out).
    speculation_policy: str = "auto"
    #: Most tokens proposed per step (the depth k; the policy lowers it per sequence).
    num_speculative_tokens: int = 5
    #: Trees of candidates for "eagle" and "medusa" (runtime/speculative/tree.py): the draft's top
    #: this-many tokens at each depth are candidates, and the most probable of them (by cumulative
    #: draft probability; as many as the depth policy's k, itself following the measured
    #: acceptance) are verified in one row with tree attention: greedy requests on the C paged
    #: runner (elsewhere, and for sampling, chains, the reason in the speculation notes). 1 = chains,
    #: the default: every verified position costs a share of a step on a CPU, so a tree pays only
    #: where the draft's runners-up are often right. Measured on SmolLM2-135M with its EAGLE draft
    #: (3 chat prompts x 96 tokens, 2 cores): width 3 with k = 6 gave 1.95 tokens per forward step
    #: against the chain's 1.87 (k = 5) and 1.91 (k = 6), and 1.1-1.2x the chain's decode tok/s.
    speculation_tree_width: int = 1
    #: Most of a step's computed tokens that may be speculated ones (the engine's budget: with a
    #: large batch the extra positions stop being free). A request may bring its own, lower.
    max_speculation_compute_fraction: float = 0.5
    #: A single greedy prompt speculating on the generated-C runtime runs on the paged serving
    #: engine; once its depth policy has kept speculation off for this many decode steps in a row,
    #: the sequence moves to the C decode loop (its K/V copied out of the pool once) and decodes
    #: plainly there to the end: an engine step costs more than a step of that loop, so a sequence
    #: whose guesses stopped standing would otherwise lose to plain decoding. 0 = never. The policy
    #: would probe again only after ~50+ off steps (the measured rate drifting back to its prior).
    #: 8 (was 24, before the policy measured its costs): SmolLM2-135M Q4_1, C, 2 threads, the
    #: speculative benchmark's prompts: grounded text where lookup and EAGLE do not pay +3%,
    #: chat with EAGLE unchanged within noise.
    speculation_hand_back: int = 8
    #: Path of the draft model for ``speculation="draft"``: any source ``infercc.compile``
    #: accepts, with the target's vocabulary. None with "draft" = the self-speculative draft.
    draft_model: str | None = None
    #: Layers of the self-speculative draft (the target's first layers + its final norm and LM
    #: head); 0 = auto (a quarter of the layers, at least one).
    draft_layers: int = 0
    #: Medusa heads for ``speculation="medusa"``: a ``medusa_lm_head.safetensors`` file (Medusa-1's
    #: published layout) or a folder holding one (``infercc train-heads`` writes it); the EAGLE
    #: draft for ``speculation="eagle"``: ``eagle_draft.safetensors`` or its folder (``infercc
    #: train-heads --kind eagle``). None or a missing file = plain decoding with the reason (never an
    #: error); a file that is there but does not fit the model is one.
    speculation_heads: str | None = None
    #: Constant folding keeps a computation when its folded result would exceed this many bytes
    #: and be larger than its inputs.
    fold_limit_bytes: int = 64 << 20
    #: Weight-only quantization: "auto" (keep the checkpoint's precision: weights already on a
    #: quantized grid, as a GGUF's Q4_0/Q4_1/Q8_0 tensors, stay on it, exactly but for Q4_1's (see
    #: ``quant_native_exact``); float weights stay float), None (float everywhere: a quantized
    #: checkpoint is dequantized), "int8" (one scale per output channel) or "int4" (blockwise).
    #: Quantized MatMul/Gemm weights become packed integers (ORT MatMulNBits); see passes/quantize.
    quantize: str | None = "auto"
    #: int4 block length along the reduction axis (16, 32, 64 or 128): smaller is more accurate,
    #: larger is smaller and faster. Measured on the ~100M LLaMA (2 cores, onnxruntime 1.32, AVX-512
    #: VNNI): block 128 prefills 128 tokens in 82 ms against 99 (float32: 96; MatMulNBits' int8
    #: kernel at block 32 runs 0.8x float32 SGEMM from 16 rows up) and decodes a step (128 cached
    #: tokens) in 2.80 ms against 3.29, but SmolLM2-135M's perplexity (its Q4_1 weights rounded
    #: again) moves +48% against +15% (block 64: +27%), so 32 stays the default.
    quant_block_size: int = 32
    #: "gptq" (int4 weights: error feedback on calibration inputs the model generates itself; "mse"
    #: for int8 weights and where a weight has no activation, e.g. embedding tables), "mse"
    #: (least-squares scale/zero-point search per block, no data) or "rtn" (round to nearest over
    #: each block's min/max range).
    quant_method: str = "gptq"
    #: True: no zero points (codes centred on 0); False: one integer zero point per block.
    #: Speed: onnxruntime's MatMulNBits (1.32, two AVX2 cores, int8 compute) runs a one-row (decode)
    #: product with an int4 weight 1.2-1.3x slower with zero points than without: 768x2048 88 vs
    #: 70 us, 2048x768 87 vs 70, the 32000x768 LM head 1.46 vs 1.27 ms (8-bit weights: no
    #: difference). That, with the int8 LM head, is what separates our default int4 decode from
    #: onnxruntime-genai's (symmetric, int4 head): see ``python -m benchmarks.decode_gap``. ~100M
    #: LLaMA, one thread, CPU time per decode token against genai's: 0.75x asymmetric (this
    #: default), 0.83x symmetric, 0.93x symmetric with genai's int4 head and no int8 weights (its
    #: graph alone runs 1.02x: the rest is our Python loop); logits' relative error against float
    #: 0.258 vs 0.285 (genai-format 0.416, genai's own 0.401): not equal quality, so False stays.
    quant_symmetric: bool = False
    #: The LM head and embedding tables when quantizing: "keep" (float), "int8" or "int4". This
    #: default against onnxruntime-genai's int4 recipe (int4 head and embeddings, tied; no int8
    #: weights), ~100M LLaMA on 2 cores: prefill of 128 tokens 100 ms vs 108 (an int8 head over 128
    #: positions runs faster than an int4 one), decoding 290 vs 335 tokens/s (an int4 head reads fewer
    #: bytes); perplexity over float: stories260K's sampled text +4.8% vs +8.1%, SmolLM2-135M on its
    #: own Q4_1/Q8_0 grids +0.0% vs +1.3%, rounded again +14.6% vs +16.7% (KL 0.20 vs 0.29). On two
    #: AVX2 cores without VNNI (shared, interleaved) genai's recipe decodes 1.15x and prefills 1.13x
    #: faster (23.1 vs 20.1 tok/s, 1.05 vs 1.18 s for 128 tokens: MatMulNBits' 8-bit kernel runs 128
    #: rows 1.7x slower than float32 SGEMM there) at stories260K +8.1% vs +4.8% (RTN: +10.3% vs +5.8%):
    #: not equal quality, so the default stays.
    quant_lm_head: str = "int8"
    quant_embeddings: str = "int8"
    #: An int4 weight whose relative reconstruction error ||W - Q(W)|| / ||W|| exceeds this falls
    #: back to int8, and stays float if int8 exceeds it too.
    quant_max_error: float | None = None
    #: Store weights that already sit on a grid of at most the asked bits (GGUF Q4_0/Q4_1/Q8_0
    #: checkpoints) on that grid instead of rounding them a second time from scratch (exactly, but
    #: for offset grids: see ``quant_native_exact``).
    quant_native: bool = True
    #: How a grid with a float offset per block (GGUF Q4_1: w = d * q + m, m not a multiple of d)
    #: is carried. True (default): exact, with a correction MatMul beside each projection (SmolLM2:
    #: 720 graph nodes against 330, a decode step ~1.3x slower than the fast grid's; no single
    #: ONNX Runtime kernel is exact and fast: float zero points are exact but dequantize the weight
    #: on every call, 10-30x slower). False: moved to the nearest
    #: grid ONNX Runtime's MatMulNBits runs in one op (an integer zero point per block of 32, codes
    #: and scales re-fitted by least squares; never farther from the source than rounding the zero
    #: point; the diagnostics report its error). Exact is the default because the fast grid is a
    #: second 4-bit rounding: SmolLM2-135M Q4_1 perplexity +27% over exact (14.0 -> 17.9), outside
    #: any tolerance we would call the checkpoint's precision. See passes/quantize/native.py.
    quant_native_exact: bool = True
    #: Mixed precision: up to this fraction of the int4 weights' parameters stays int8, the weights
    #: whose int4 rounding costs the output most per parameter first (measured on calibration inputs,
    #: one forward pass per weight). 0 = every int4 weight is int4 (~100M LLaMA: decoding +4%,
    #: prefill level; stories260K's sampled-text perplexity +5.9% over float instead of +4.8%).
    #: The default 5% is the industry's int4 recipe (llama.cpp's Q4_K_M, onnxruntime-genai's
    #: k_quant_mixed keep their most sensitive tensors at higher precision), chosen by measurement
    #: instead of by tensor name: it costs ~0.005x of the float size and lifts all-MiniLM-L6-v2's
    #: int4 RTN cosine 0.976 -> 0.983.
    quant_int8_fraction: float = 0.05
    #: LoRA adapters (``compiled.add_adapter``; infercc/lora/): the largest rank an adapter may
    #: have (a composition of stacked adapters: the sum of their ranks). Every row of a batch
    #: multiplies by the largest loaded rank, so one oversized adapter slows all adapter rows.
    max_lora_rank: int = 64
    #: How ``adapter=["a", "b"], adapter_weights=[wa, wb]`` combines adapters. "stack": the
    #: weighted deltas are applied one after the other, y = W x + sum_i w_i s_i B_i A_i x (exact;
    #: ranks may differ; PEFT's add_weighted_adapter(combination_type="cat") and several active
    #: adapters compute the same). "merge": the factors are averaged into one adapter of the same
    #: rank, A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i (PEFT's
    #: combination_type="linear": task arithmetic, cross terms included; equal ranks required).
    lora_composition: str = "stack"
    #: Bytes of merged-weight copies (W + s B A at the base weight's precision, one model copy per
    #: adapter) kept for the adapters that serve whole batches alone (lora/merged.py); 0 = none. Such
    #: batches then run at base speed, but merged weights round differently from base + delta.
    lora_merged_cache_bytes: int = 0

    def __new__(cls, *args: Any, **options: Any) -> Config:
        """Unknown keywords are a ConfigError (the one ``replace`` gives), not the dataclass's TypeError."""
        check_option_names(options)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        from .passes.pipeline import pass_names

        passes = self.disable_passes
        if isinstance(passes, str):  # disable_passes="cse" means one pass, not its letters
            passes = (passes,)
        if not isinstance(passes, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in passes):
            raise ConfigError(
                f"Config.disable_passes must be a list of pass names, got {self.disable_passes!r}; "
                f"known passes: {pass_names()}"
            )
        object.__setattr__(self, "disable_passes", tuple(sorted(passes) if isinstance(passes, (set, frozenset)) else passes))
        for name in ("optimize", "strict", "check_each_pass", "kv_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Config.{name} must be True or False, got {getattr(self, name)!r}")
        unknown = [p for p in self.disable_passes if p not in pass_names()]
        if unknown:
            raise ConfigError(f"Config.disable_passes names unknown pass(es) {unknown}; known passes: {pass_names()}")
        if self.provider not in PROVIDERS:
            raise ConfigError(f"Config.provider must be one of {list(PROVIDERS)}, got {self.provider!r}")
        if self.lowering not in LOWERINGS:
            raise ConfigError(f"Config.lowering must be one of {list(LOWERINGS)}, got {self.lowering!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Config.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.masking not in MASKINGS:
            raise ConfigError(f"Config.masking must be one of {list(MASKINGS)}, got {self.masking!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"Config.kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_layout not in KV_CACHE_LAYOUTS:
            raise ConfigError(f"Config.kv_cache_layout must be one of {list(KV_CACHE_LAYOUTS)}, got {self.kv_cache_layout!r}")
        for name in ("kv_block_size", "max_batch_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Config.{name} must be an integer >= 1, got {value!r}")
        for name in ("intra_op_threads", "inter_op_threads", "fold_limit_bytes", "kv_cache_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"Config.{name} must be an integer >= 0, got {value!r}")
        self._check_speculation()
        tolerance = self.check_tolerance
        if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance > 0:
            raise ConfigError(f"Config.check_tolerance must be a number > 0, got {self.check_tolerance!r}")
        self._check_quantization()
        self._check_lora()

    def _check_lora(self) -> None:
        rank = self.max_lora_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
            raise ConfigError(f"Config.max_lora_rank must be an integer in [1, 4096], got {rank!r}")
        if self.lora_composition not in LORA_COMPOSITIONS:
            raise ConfigError(f"Config.lora_composition must be one of {list(LORA_COMPOSITIONS)}, "
                              f"got {self.lora_composition!r}")
        cache = self.lora_merged_cache_bytes
        if not isinstance(cache, int) or isinstance(cache, bool) or cache < 0:
            raise ConfigError(f"Config.lora_merged_cache_bytes must be an integer >= 0 (0 = no cache), got {cache!r}")

    def _check_speculation(self) -> None:
        if self.speculation not in SPECULATIONS:
            raise ConfigError(f"Config.speculation must be one of {list(SPECULATIONS)}, got {self.speculation!r}")
        if self.speculation_policy not in SPECULATION_POLICIES:
            raise ConfigError(f"Config.speculation_policy must be one of {list(SPECULATION_POLICIES)}, "
                              f"got {self.speculation_policy!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise ConfigError(f"Config.num_speculative_tokens must be an integer in [1, 64], got {k!r}")
        width = self.speculation_tree_width
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 16:
            raise ConfigError(f"Config.speculation_tree_width must be an integer in [1, 16] (1 = chains), got {width!r}")
        layers = self.draft_layers
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
            raise ConfigError(f"Config.draft_layers must be an integer >= 0 (0 = auto), got {layers!r}")
        back = self.speculation_hand_back
        if not isinstance(back, int) or isinstance(back, bool) or back < 0:
            raise ConfigError(f"Config.speculation_hand_back must be an integer >= 0 (0 = never), got {back!r}")
        fraction = self.max_speculation_compute_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ConfigError(f"Config.max_speculation_compute_fraction must be a number in [0, 1], got {fraction!r}")
        draft = self.draft_model
        if draft is not None and not (isinstance(draft, (str, os.PathLike)) and str(draft)):
            raise ConfigError(f"Config.draft_model must be None or the path of a model, got {draft!r}")
        if draft is not None:
            object.__setattr__(self, "draft_model", os.fspath(draft))
        heads = self.speculation_heads
        if heads is not None and not (isinstance(heads, (str, os.PathLike)) and str(heads)):
            raise ConfigError(f"Config.speculation_heads must be None or the path of a heads file, got {heads!r}")
        if heads is not None:
            object.__setattr__(self, "speculation_heads", os.fspath(heads))

    def _check_quantization(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"Config.quantize must be one of {list(QUANTIZE)}, got {self.quantize!r}")
        if self.quant_block_size not in QUANT_BLOCKS or isinstance(self.quant_block_size, bool):
            raise ConfigError(f"Config.quant_block_size must be one of {list(QUANT_BLOCKS)}, got {self.quant_block_size!r}")
        if self.quant_method not in QUANT_METHODS:
            raise ConfigError(f"Config.quant_method must be one of {list(QUANT_METHODS)}, got {self.quant_method!r}")
        for name in ("quant_symmetric", "quant_native", "quant_native_exact"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Config.{name} must be True or False, got {getattr(self, name)!r}")
        fraction = self.quant_int8_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ConfigError(f"Config.quant_int8_fraction must be a number in [0, 1], got {fraction!r}")
        for name in ("quant_lm_head", "quant_embeddings"):
            if getattr(self, name) not in QUANT_ROLES:
                raise ConfigError(f"Config.{name} must be one of {list(QUANT_ROLES)}, got {getattr(self, name)!r}")
        limit = self.quant_max_error
        if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit > 0):
            raise ConfigError(f"Config.quant_max_error must be None or a number > 0, got {limit!r}")
        if self.quantize in ("int8", "int4") and not self.optimize:
            raise ConfigError("Config.quantize needs optimize=True: quantization is a pass of the pipeline")

    def replace(self, **options: Any) -> Config:
        """A copy with some fields changed; unknown names are an error listing the valid ones."""
        check_option_names(options)
        return dataclasses.replace(self, **options)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["disable_passes"] = list(self.disable_passes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        return cls().replace(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_option_names(names: Iterable[str]) -> None:
    """ConfigError for names that are not Config fields (``Config(qauntize=...)``,
    ``compile(..., optimise=False)``), with the closest valid one suggested."""
    reject_unknown(names, (f.name for f in dataclasses.fields(Config)))
