"""Tokenizer: the real GGUF vocabularies against REFERENCE.txt, the SentencePiece-style merge on a
hand-made vocabulary, GGUF byte-level BPE against the same vocabulary as an HF tokenizer.json,
streaming decode, chat templates."""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from infercc.errors import ModelLoadError
from infercc.runtime.tokenizer import Tokenizer
from infercc.runtime.tokenizer_backends import BYTE, CONTROL, NORMAL, SentencePieceBPE
from tests.importers._models import SMOLLM2, STORIES, reference, require

TEXTS = ["Once upon a time", "Hello, world!  Two  spaces\nand a newline.", "digits 12345 and 3.14",
         "unicode: héllo wörld 日本語 🙂", "it's we're I'll", "  leading and trailing  ", ""]


# -- real vocabularies --------------------------------------------------------------------------
def test_stories260k_llama_vocab():
    path = require(STORIES)
    ref = reference(path)
    tok = Tokenizer.from_pretrained(path)
    assert tok.encode(ref["prompt"]) == ref["prompt_ids"] == [1, 403, 407, 261, 378]
    assert tok.encode(ref["prompt"], add_bos=False) == [403, 407, 261, 378]
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2], 512)
    text = tok.decode(ref["prompt_ids"] + ref["ids"])
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")
    assert text.endswith("it was too high.\nLily's mom said")
    for sample in TEXTS:  # byte fallback makes every text round-trip
        assert tok.decode(tok.encode(sample)) == sample


def test_smollm2_gpt2_vocab():
    path = require(SMOLLM2)
    ref = reference(path)
    tok = Tokenizer.from_pretrained(path)
    assert tok.encode(ref["prompt"]) == ref["prompt_ids"] == [6403, 1980, 253, 655]  # add_bos_token is False
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2, 0], False)  # <|im_end|>, then <|endoftext|>
    assert tok.decode(ref["ids"]).startswith(", the city of Nova Haven was a thriving metropolis")
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # pre "smollm": digits one by one
    for sample in TEXTS:
        assert tok.decode(tok.encode(sample)) == sample
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|> whole
    assert tok.decode(ids, skip_special=False) == prompt
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True) == ids


def test_streaming_equals_decode_on_real_vocab():
    path = require(STORIES)
    ref = reference(path)
    tok = Tokenizer.from_pretrained(path)
    stream = tok.stream(ref["prompt_ids"])
    pieces = [stream.push(i) for i in ref["ids"]] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ref["prompt_ids"] + ref["ids"])[len(ref["prompt"]):]
    fresh = tok.stream()
    ids = tok.encode("日本 ok", add_bos=False)
    assert "".join(fresh.push(i) for i in ids) == "日本 ok"


# -- SentencePiece-style BPE on a hand-made vocabulary -------------------------------------------
def spm_vocab() -> SentencePieceBPE:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, CONTROL, CONTROL] + [BYTE] * 256
    scores = [0.0] * len(tokens)
    for token, score in (("\u2581", -1), ("a", -1), ("b", -1), ("c", -1), ("ab", -2), ("bc", -2), ("\u2581a", -5),
                         ("abc", -3), ("\u2581abc", -9), ("\u2581\u2581", -4)):
        tokens.append(token)
        types.append(NORMAL)
        scores.append(float(score))
    return SentencePieceBPE(tokens, scores, types)


def test_spm_merges_highest_score_leftmost_first_then_byte_fallback():
    spm = spm_vocab()
    ids = {t: i for i, t in enumerate(spm.tokens)}
    # "▁abc": ab and bc tie (-2), the left one wins; then abc (-3) beats ▁a... none left but ▁abc (-9).
    assert spm.encode("abc") == [ids["\u2581abc"]]
    assert spm.encode("bc") == [ids["\u2581"], ids["bc"]]
    # é is not in the vocabulary: its two UTF-8 bytes become byte tokens.
    assert spm.encode("é") == [ids["\u2581"], ids["<0xC3>"], ids["<0xA9>"]]
    assert spm.decode(spm.encode("é ab"), skip_special=True) == "é ab"
    # Special tokens match whole; the text after one gets a dummy prefix again.
    assert spm.encode("<s>a") == [ids["<s>"], ids["\u2581a"]]


def test_stream_holds_back_incomplete_utf8():
    spm = spm_vocab()
    tok = Tokenizer(spm, bos_id=1, eos_ids=[2], add_bos=True)
    stream = tok.stream([1])
    ids = {t: i for i, t in enumerate(spm.tokens)}
    assert [stream.push(i) for i in (ids["<0xE6>"], ids["<0x97>"], ids["<0xA5>"])] == ["", "", "日"]
    stream.push(ids["<0xE6>"])
    assert stream.flush() == "\ufffd"  # an unfinished character at the end shows as U+FFFD


# -- GGUF gpt2 vocabulary vs the same BPE as tokenizer.json ---------------------------------------
def train_byte_level_bpe(digits: bool) -> HFTokenizer:
    tokenizer = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level] if digits else [byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog 0123456789"] * 20, trainer)
    return tokenizer


def write_gguf_vocab(path, hf: HFTokenizer, pre: str) -> None:
    state = json.loads(hf.to_str())
    vocab = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    specials = {a["content"] for a in state["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([CONTROL if t in specials else NORMAL for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre,digits", [("gpt2", False), ("smollm", True)])
def test_gguf_byte_level_bpe_matches_tokenizer_json(tmp_path, pre, digits):
    hf = train_byte_level_bpe(digits)
    write_gguf_vocab(tmp_path / "vocab.gguf", hf, pre)
    ours = Tokenizer.from_pretrained(tmp_path / "vocab.gguf")
    for text in [*TEXTS, "<|im_start|>user\nhi 42<|im_end|>"]:
        assert ours.encode(text) == hf.encode(text).ids, text
        assert ours.decode(ours.encode(text), skip_special=False) == text
    # No template: ChatML, since the vocabulary has its tokens.
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- HF folders ----------------------------------------------------------------------------------
def test_hf_folder_bos_from_post_processor_and_template(tmp_path):
    hf = train_byte_level_bpe(False)
    hf.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, [2, 1], True)
    assert tok.encode("the fox") == [0, *hf.encode("the fox", add_special_tokens=False).ids]
    assert tok.encode("the fox", add_bos=False) == hf.encode("the fox", add_special_tokens=False).ids
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages) == "<|endoftext|>[user] hi<|im_end|>[assistant] yo<|im_end|>"
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids[0] == 0 and ids[1] != 0  # the template wrote BOS: not added twice


def test_plain_fallback_template_and_errors(tmp_path):
    tok = Tokenizer(spm_vocab(), bos_id=1, eos_ids=[2], add_bos=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        Tokenizer.from_pretrained(tmp_path / "vocab.txt")
