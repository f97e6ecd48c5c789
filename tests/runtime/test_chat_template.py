"""Chat templates from model files are hostile code: runaway loops and huge values stop fast with
an error naming the template's source and line; template bugs are ModelLoadErrors, rejected or
incomplete messages InputErrors; malformed messages are InputErrors naming the message."""

from __future__ import annotations

import sys
import time

import gguf
import pytest

from infercc.errors import InputError, ModelLoadError
from infercc.runtime.tokenizer import Tokenizer
from infercc.runtime.tokenizer_backends import BYTE, CONTROL, NORMAL, SentencePieceBPE

HI = [{"role": "user", "content": "hi"}]
SOURCE = "model.gguf (tokenizer.chat_template)"
SIMPLE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def vocab() -> SentencePieceBPE:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "h", "i"]
    types = [2, CONTROL, CONTROL, *([BYTE] * 256), NORMAL, NORMAL, NORMAL]
    return SentencePieceBPE(tokens, [0.0] * len(tokens), types)


def tokenizer(template: str | None, seconds: float = 0.25) -> Tokenizer:
    tok = Tokenizer(vocab(), bos_id=1, eos_ids=[2], add_bos=True, chat_template=template, chat_template_source=SOURCE)
    tok.chat_template_seconds = seconds
    return tok


def fails_fast(template: str, error: type[Exception], messages=HI, **extra) -> str:
    """The error message of rendering ``template``, which must come in well under a second of this
    thread's CPU time (the limit is CPU time: on a loaded machine the wall clock says nothing)."""
    tok = tokenizer(template)
    start = time.thread_time()
    with pytest.raises(error) as info:
        tok.apply_chat_template(messages, **extra)
    assert time.thread_time() - start < 0.8, f"took {time.thread_time() - start:.2f} s of CPU"
    message = str(info.value)
    assert message.startswith(SOURCE) and "\n" not in message
    return message


# -- runaway templates ---------------------------------------------------------------------------
RUNAWAY = {
    "billion-range": "{% for i in range(10**9) %}x{% endfor %}",
    "nested-silent-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested-string-loops": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "nested-printing-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    "repeat-string": "{{ 'x' * 10**9 }}",
    "repeat-list": "{{ ([1] * 1000000000)|length }}",
    "huge-power": "{{ 7 ** 10000000 }}",
    "squaring": "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "center": "{{ 'x'|center(1000000000) }}",
    "ljust-method": "{{ 'x'.ljust(1000000000) }}",
    "format-width": "{{ '{:>1000000000}'.format(1) }}",
    "percent-width": "{{ '%1000000000s' % 'x' }}",
    "format-filter": "{{ '%.1000000000f'|format(1.5) }}",
    "replace": "{% set s = 'x' * 500000 %}{{ s|replace('x', s) }}",
    "replace-method": "{% set s = 'x' * 500000 %}{{ s.replace('x', s) }}",
    "join-method": "{% set s = 'x' * 500000 %}{{ s.join(s) }}",
    "join-filter": "{% set s = 'x' * 500000 %}{{ [s, s, s, s]|join(s) }}",
    "indent": "{% set s = '\n' * 500000 %}{{ s|indent(1000) }}",
    "expandtabs": "{% set s = '\t' * 500000 %}{{ s.expandtabs(1000) }}",
    "tojson-indent": "{{ [[[1]]]|tojson(indent=100000) }}",
    "namespace-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "set-doubling": "{% set s = 'xxxxxxxxxx' %}" + "{% set s = s ~ s %}" * 40,
    "block-doubling": "{% set s = 'xxxxxxxxxx' %}" + "{% set s %}{{ s }}{{ s }}{% endset %}" * 40,
    "macro-doubling": "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}{% set ns = namespace(s='x') %}"
                      "{% for i in range(64) %}{% set ns.s = twice(ns.s) %}{% endfor %}",
    "list-growth": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + ['x' * 500000] %}"
                   "{% endfor %}",
    "recursion": "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
}


@pytest.mark.parametrize("template", RUNAWAY.values(), ids=RUNAWAY.keys())
def test_runaway_templates_stop_fast_with_the_source(template):
    message = fails_fast(template, ModelLoadError)
    assert "chat template stopped" in message and "set tokenizer.chat_template" in message
    assert ("loops without end" in message) or ("recurses" in message)


def test_the_error_names_the_line_and_the_limit():
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}\n\n{% for i in range(100000) %}" \
               "{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message = fails_fast(template, ModelLoadError)
    assert "at line 3" in message and "longer than 0.25 s" in message
    assert "at line 2" in fails_fast("\n{{ 'x' * 10**9 }}", ModelLoadError)


def test_output_is_capped_and_legitimate_large_prompts_render():
    tok = tokenizer(SIMPLE)
    big = [{"role": "user", "content": "word " * 400_000}]  # 2 M characters: the limit grows with the input
    assert len(tok.apply_chat_template(big)) == 2_000_000 + len("<user>")
    tok.chat_template_max_chars = 1000
    with pytest.raises(ModelLoadError, match="exceeds 1,000 characters"):
        tok.apply_chat_template([{"role": "user", "content": "x" * 2000}])
    assert tok.apply_chat_template([{"role": "user", "content": "x" * 900}]) == "<user>" + "x" * 900


def test_a_real_loop_over_messages_is_fast_and_the_tracer_is_restored():
    before = sys.gettrace()
    tok = tokenizer(SIMPLE, seconds=2.0)
    messages = [{"role": "user" if i % 2 else "assistant", "content": "hello " * 20} for i in range(2000)]
    start = time.thread_time()
    assert tok.apply_chat_template(messages).count("<user>") == 1000
    assert time.thread_time() - start < 0.8
    assert sys.gettrace() is before
    with pytest.raises(ModelLoadError):
        tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", 0.05) \
            .apply_chat_template(HI)
    assert sys.gettrace() is before


# -- template errors: whose fault ----------------------------------------------------------------
def test_syntax_error_is_the_model_files_fault():
    message = fails_fast("ok\n{% for %}", ModelLoadError)
    assert "syntax error at line 2" in message


def test_sandbox_violation_is_the_model_files_fault():
    message = fails_fast("{{ ''.__class__.__mro__ }}", ModelLoadError)
    assert "stopped by the sandbox at line 1" in message and "unsafe" in message


def test_other_failures_are_the_model_files_fault():
    message = fails_fast("\n{{ 'a' + 1 }}", ModelLoadError)
    assert "failed at line 2" in message and "TypeError" in message


def test_raise_exception_rejects_the_messages():
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}\n"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    message = fails_fast(template, InputError, [{"role": "system", "content": "be brief"}])
    assert "rejected the messages at line 2: System role not supported" in message
    assert tokenizer(template).apply_chat_template(HI) == "hi"


def test_undefined_value_asks_for_it():
    template = "{{ messages[0]['content'] }}\n{{ tools.names }}"
    message = fails_fast(template, InputError)
    assert "at line 2" in message and "'tools' is undefined" in message and "keyword arguments" in message
    assert tokenizer(template).apply_chat_template(HI, tools={"names": "none"}) == "hi\nnone"


def test_gguf_template_errors_name_the_file(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "h", "i"]
    writer = gguf.GGUFWriter(str(tmp_path / "chat.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, CONTROL, CONTROL, NORMAL, NORMAL, NORMAL])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% for %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = Tokenizer.from_pretrained(tmp_path / "chat.gguf")
    with pytest.raises(ModelLoadError) as info:
        tok.apply_chat_template(HI)
    assert str(info.value).startswith(f"{tmp_path / 'chat.gguf'} (tokenizer.chat_template): chat template syntax "
                                      "error at line 2")


# -- messages ------------------------------------------------------------------------------------
BAD_MESSAGES = [
    ("just text", "must be a list of dicts"),
    ({"role": "user", "content": "hi"}, "wrap a single message in a list"),
    (["hi"], "chat message 0 is a str, not a dict"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "chat message 1 has no 'role'; add one"),
    ([{"role": "user"}], "chat message 0 (role 'user') has no 'content'; add the text"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], "chat message 1 has role 3 of type int"),
    ([{"role": "user", "content": 5}], "chat message 0 (role 'user') has content of type int"),
]


@pytest.mark.parametrize("template", [SIMPLE, None], ids=["model-template", "fallback"])
@pytest.mark.parametrize("messages, needle", BAD_MESSAGES, ids=[n.split(";")[0] for _, n in BAD_MESSAGES])
def test_malformed_messages_name_the_message_and_the_fix(template, messages, needle):
    with pytest.raises(InputError) as info:
        tokenizer(template).apply_chat_template(messages)
    assert needle in str(info.value)


def test_content_parts_go_to_the_model_template_only():
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    template = "{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}"
    assert tokenizer(template).apply_chat_template(parts) == "hi"
    with pytest.raises(InputError, match="it must be a string"):
        tokenizer(None).apply_chat_template(parts)
