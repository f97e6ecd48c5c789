"""The token <-> text algorithms behind ``Tokenizer``: one interface (encode without BOS, decode,
token lookup) over the ``tokenizers`` library (HF tokenizer.json, and GGUF ``gpt2`` vocabularies
rebuilt as a byte-level BPE) and a plain-Python SentencePiece-style BPE for GGUF ``llama``
vocabularies, since that algorithm (merge by score, byte fallback) is not a ``tokenizers`` model.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from typing import Protocol

#: GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: Pre-tokenizer regexes of llama.cpp's ``tokenizer.ggml.pre`` values, for BPE vocabularies.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT = r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
#: pre-tokenizers that split every digit off before GPT-2's regex.
DIGIT_SPLITTING = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


class TokenizerBackend(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, special-token strings matched, no BOS/EOS added."""

    def decode(self, ids: Sequence[int], skip_special: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class HFBackend:
    """A ``tokenizers.Tokenizer`` (from tokenizer.json or built from a GGUF vocabulary)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def gguf_byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> HFBackend:
    """GGUF ``gpt2`` vocabulary -> byte-level BPE with the pre-tokenizer its ``pre`` names
    (unknown names get GPT-2's regex). Control and user-defined tokens match whole in text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3"))
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = LLAMA3_SPLIT if pre != "qwen2" else QWEN2_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    else:
        steps = [pre_tokenizers.Split(Regex(GPT2_SPLIT), "isolated"), byte_level]
        if pre in DIGIT_SPLITTING:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=kind == CONTROL, normalized=False)
               for t, kind in zip(tokens, token_types) if kind in (CONTROL, USER_DEFINED)]
    tokenizer.add_tokens(special)
    return HFBackend(tokenizer)


class SentencePieceBPE:
    """llama.cpp's SPM tokenizer (also llama2.c's encode): spaces become U+2581, a dummy-prefix
    space starts each text run, then the adjacent pair whose merge is the highest-scoring vocab
    entry is merged (leftmost on ties) until none is; pieces not in the vocab fall back to
    <0xNN> byte tokens."""

    def __init__(self, tokens: list[str], scores: list[float], token_types: list[int], *,
                 unk_id: int = 0, add_space_prefix: bool = True) -> None:
        self.tokens, self.scores, self.types = tokens, scores, token_types
        self.vocab_size = len(tokens)
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.unk_id, self.add_space_prefix = unk_id, add_space_prefix
        self.byte_ids = {i: self.ids.get(f"<0x{i:02X}>") for i in range(256)}
        specials = sorted((t for t, k in zip(tokens, token_types) if k in (CONTROL, USER_DEFINED, UNKNOWN) and t),
                          key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)

    def encode(self, text: str) -> list[int]:
        """Special-token strings become their ids; a dummy prefix starts every text run that
        opens the input or follows a special token, as llama.cpp does."""
        out: list[int] = []
        fragments = self._special_split.split(text) if self._special_split else [text]
        after_special = True
        for k, fragment in enumerate(fragments):
            if k % 2:  # a special token
                out.append(self.ids[fragment])
                after_special = True
            elif fragment:
                prefix = " " if self.add_space_prefix and after_special else ""
                out += self._merge((prefix + fragment).replace(" ", "\u2581"))
                after_special = False
        return out

    def _merge(self, text: str) -> list[int]:
        symbols = list(text)
        prev = list(range(-1, len(symbols) - 1))
        nxt = [*range(1, len(symbols)), -1]
        heap: list[tuple[float, int, str, str]] = []

        def push(left: int) -> None:
            right = nxt[left]
            if left < 0 or right < 0:
                return
            merged = symbols[left] + symbols[right]
            token = self.ids.get(merged)
            if token is not None:
                heapq.heappush(heap, (-self.scores[token], left, symbols[left], symbols[right]))

        for i in range(len(symbols) - 1):
            push(i)
        while heap:
            _, left, a, b = heapq.heappop(heap)
            right = nxt[left]
            if right < 0 or symbols[left] != a or symbols[right] != b:
                continue  # stale: one side was merged since this pair was queued
            symbols[left], symbols[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left])
            push(left)
        ids: list[int] = []
        i = 0 if symbols else -1
        while i >= 0:
            token = self.ids.get(symbols[i])
            if token is not None:
                ids.append(token)
            else:
                ids += [self.byte_ids[b] if self.byte_ids[b] is not None else self.unk_id for b in symbols[i].encode()]
            i = nxt[i]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        """Byte tokens become raw bytes (so multi-token characters join), U+2581 a space; the
        dummy-prefix space the encoder added is removed from the start."""
        data = bytearray()
        for token in ids:
            kind = self.types[token]
            if kind == BYTE:
                data.append(int(self.tokens[token][3:5], 16))
            elif skip_special and kind in (CONTROL, UNKNOWN, UNUSED):
                continue
            else:
                data += self.tokens[token].replace("\u2581", " ").encode()
        text = data.decode("utf-8", errors="replace")
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text
