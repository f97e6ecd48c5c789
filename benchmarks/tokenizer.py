"""An offline byte-level BPE tokenizer for the random-initialized benchmark LLaMA.

Why: onnxruntime-genai's model builder (and infercc's generation, which decodes text as it goes)
expect tokenizer files beside the weights, and the benchmark models are built without downloads.
The benchmarks feed token ids, so the tokenizer only has to load and cover the vocabulary: ids
0-2 are <unk>/<s>/</s> (LlamaConfig's defaults), then the 256 byte symbols, then filler tokens.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<unk>", "<s>", "</s>")


def vocabulary(vocab_size: int) -> list[str]:
    """Token strings by id: specials, the byte-level alphabet, then ``t<id>`` fillers up to the size."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*SPECIALS, *alphabet]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens)} base symbols")
    return tokens + [f"t{i}" for i in range(len(tokens), vocab_size)]


def save_offline_tokenizer(folder: Path, vocab_size: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary(vocab_size)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
