"""Tokenizer: text <-> token ids for generation, from a Hugging Face tokenizer.json or the
vocabulary embedded in a GGUF file, plus streaming decode and chat templates.

BOS is added by ``encode`` (when the model wants it), never by the backend, so ``add_bos`` means
the same for every source. Streaming holds text back while it ends in an incomplete UTF-8
sequence (one character split over several byte tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from . import chat_template
from .tokenizer_backends import HFBackend, SentencePieceBPE, TokenizerBackend, gguf_byte_level_bpe

Message = Mapping[str, str]


class Tokenizer:
    #: Wall-clock seconds and characters a chat template render may use (None: 1 Mi characters
    #: plus four times the messages' size); see runtime/chat_template.py.
    chat_template_seconds: float = chat_template.RENDER_SECONDS
    chat_template_max_chars: int | None = None

    def __init__(self, backend: TokenizerBackend, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool,
                 chat_template: str | None = None, chat_template_source: str | None = None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        #: Where the template came from, for error messages (the file and field).
        self.chat_template_source = chat_template_source or "the chat template"

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> Tokenizer:
        """A .gguf file, a Hugging Face folder (tokenizer.json inside) or a tokenizer.json path."""
        path = Path(source)
        if path.suffix.lower() == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir() or path.name == "tokenizer.json":
            return cls.from_hf(path if path.is_dir() else path.parent)
        raise ModelLoadError(f"{path}: not a .gguf file or a folder with tokenizer.json; pass one of those.")

    @classmethod
    def from_model(cls, model) -> Tokenizer:
        """The tokenizer of a model imported from a checkpoint (its ``infercc.source``)."""
        source = model.metadata_props.get("infercc.source")
        if not source:
            raise ModelLoadError("this model was not imported from a GGUF file or HF folder: load its tokenizer "
                                 "with Tokenizer.from_pretrained(path).")
        return cls.from_pretrained(source)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        from ..importers.from_gguf import eos_ids, field, open_gguf

        reader = open_gguf(Path(path))
        kind = field(reader, "tokenizer.ggml.model")
        tokens = field(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{path}: the GGUF file has no embedded vocabulary (tokenizer.ggml.tokens).")
        types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "llama":
            backend: TokenizerBackend = SentencePieceBPE(
                tokens, field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens), types,
                unk_id=field(reader, "tokenizer.ggml.unknown_token_id", 0),
                add_space_prefix=field(reader, "tokenizer.ggml.add_space_prefix", True),
            )
        elif kind == "gpt2":
            merges = field(reader, "tokenizer.ggml.merges") or []
            backend = gguf_byte_level_bpe(tokens, merges, types, field(reader, "tokenizer.ggml.pre", "default"))
        else:
            raise ModelLoadError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'llama', 'gpt2').")
        return cls(
            backend, bos_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_ids=eos_ids(reader),
            add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
            chat_template=field(reader, "tokenizer.chat_template"),
            chat_template_source=f"{path} (tokenizer.chat_template)",
        )

    @classmethod
    def from_hf(cls, folder: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json; save the tokenizer with tokenizer.save_pretrained(folder).")
        backend = HFBackend(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        config = _json(folder / "tokenizer_config.json")
        model_config = _json(folder / "config.json")
        generation = _json(folder / "generation_config.json")
        bos = _token_id(backend, config.get("bos_token"), model_config.get("bos_token_id"))
        eos_ids = [_token_id(backend, config.get("eos_token"), None)]
        for source in (generation.get("eos_token_id"), model_config.get("eos_token_id")):
            eos_ids += source if isinstance(source, list) else [source]
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # let the tokenizer's post-processor tell whether it prepends BOS
            with_special = backend.tokenizer.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(with_special) and with_special[0] == bos
        template = config.get("chat_template")
        source = f"{folder / 'tokenizer_config.json'} (chat_template)"
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
            source = str(folder / "chat_template.jinja")
        return cls(backend, bos_id=bos, eos_ids=[e for e in eos_ids if e is not None], add_bos=bool(add_bos),
                   chat_template=template, chat_template_source=source)

    # -- text <-> ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` (default: what the model was trained with)."""
        ids = self.backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special)

    def stream(self, context: Sequence[int] = ()) -> StreamDecoder:
        """An incremental decoder for tokens generated after ``context`` (the prompt ids)."""
        return StreamDecoder(self, context)

    # -- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            tokenize: bool = False, **extra: Any) -> str | list[int]:
        """The prompt for ``messages`` ([{"role": ..., "content": ...}]) with the model's jinja2
        template; without one, ChatML when the vocabulary has its tokens, else plain "Role: content"
        lines. ``tokenize`` returns ids, with BOS added unless the template already wrote it.
        Malformed messages are an InputError naming the message; a template that fails, runs
        too long or builds too much text is an error naming its source and line (see
        runtime/chat_template.py for which are the model's fault and which the messages')."""
        messages = chat_template.check_messages(messages, text_only=not self.chat_template)
        if self.chat_template:
            text = chat_template.render(
                self.chat_template, self.chat_template_source,
                {"messages": messages, "add_generation_prompt": add_generation_prompt,
                 "bos_token": self._token_text(self.bos_id),
                 "eos_token": self._token_text(self.eos_ids[0] if self.eos_ids else None), **extra},
                seconds=self.chat_template_seconds, max_chars=self.chat_template_max_chars)
        elif self.backend.token_to_id("<|im_start|>") is not None:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            text += "<|im_start|>assistant\n" if add_generation_prompt else ""
        else:
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            text += "Assistant:" if add_generation_prompt else ""
        if not tokenize:
            return text
        bos_text = self._token_text(self.bos_id)
        return self.encode(text, add_bos=self.add_bos and not (bos_text and text.startswith(bos_text)))

    def _token_text(self, token: int | None) -> str:
        return "" if token is None else self.backend.decode([token], False)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive. Each step decodes a short window of
    recent ids and emits what the new id added, so decoders that depend on neighbours (leading-
    space removal, byte tokens) give the same text as one ``decode`` of everything."""

    #: ids of context kept before the read point so the first pieces decode in context.
    CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in context]
        self._prefix = max(0, len(self.ids) - self.CONTEXT)
        self._read = len(self.ids)

    def push(self, token: int) -> str:
        """Add one id; returns the new complete text ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):]


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-download it.") from None


def _token_id(backend: TokenizerBackend, token: Any, fallback: int | None) -> int | None:
    """tokenizer_config's bos/eos entry (a string or {"content": ...}) as an id."""
    if isinstance(token, dict):
        token = token.get("content")
    found = backend.token_to_id(token) if isinstance(token, str) else None
    return found if found is not None else fallback
