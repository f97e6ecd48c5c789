"""Chat templates: checking chat messages, and rendering a model's jinja2 chat template with
bounded time and size.

A chat template comes from the model file (GGUF ``tokenizer.chat_template``, a Hugging Face
``tokenizer_config.json``), so it is hostile input: it is code. jinja2's sandbox already refuses
attribute tricks (``''.__class__``) and mutation of lists and dicts; what it does not bound is
how long a template runs and how much it builds. This module bounds both:

* Time: a wall-clock deadline, checked by a ``sys.settrace`` function while the template runs:
  on every line of the compiled template's code (so on every loop iteration, however the loop
  iterates: ``range``, a string, a list) and on every Python call made meanwhile. A capped
  ``range`` alone would miss loops over strings or lists, and a check between output chunks
  would miss loops that print nothing. The tracer only runs in the rendering thread, during the
  render; any trace function already set (a debugger, coverage) is put back afterwards.
* Size: no value may hold more than ``max_chars`` characters (nested containers counted
  through). Operations that multiply a size in one C-level step are checked *before* they run:
  ``*``, ``+``, ``**`` and ``%`` (intercepted binary operators), integer arguments to any call or
  filter (widths: ``center``, ``ljust``, ``lipsum``), format-string widths, and estimates for the
  multiplying string operations (``replace``, ``join``, ``indent``, ``wordwrap``,
  ``expandtabs``). Everything else that builds a value is checked right after it: every call
  and filter result, ``~`` concatenations (a code-generator hook), and every output buffer of
  a macro or ``{% set %}`` block (a list that counts what is appended). The rendered text is
  streamed with ``generate()`` and stopped at the same cap. So a value grows at most one
  bounded step past the cap before the render stops, and a loop cannot pile values up.

What this does not bound: a C-level operation outside the list above that multiplies its
inputs' size (jinja2's filters and str's methods were reviewed for such operations), and memory
as such. Only process isolation (a subprocess with memory limits) bounds everything; it would
cost a process start per render, too much for an interactive chat prompt.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InputError, ModelLoadError

#: CPU seconds a render may take on its thread (real templates take milliseconds; waiting for a core
#: on a busy machine does not count).
RENDER_SECONDS = 2.0
#: A value or the output may hold this many characters plus four times the messages' size.
BASE_MAX_CHARS = 1 << 20
#: Largest integer a template may build (2**65536 already has ~20,000 digits).
MAX_INT_BITS = 1 << 16
#: Largest ``tojson(indent=...)`` (each nesting level repeats it on every line).
MAX_JSON_INDENT = 64
#: The name jinja2 gives code compiled by ``from_string``: how the tracer knows template lines.
TEMPLATE_FILENAME = "<template>"

_FORMAT_WIDTH = re.compile(r"[%:][^\d%:{}\s]{0,3}(\d+)|[%:][^%:{}\s]{0,12}?\.(\d+)")


class _RenderLimit(Exception):
    """The template ran out of time or built too much (becomes a ModelLoadError)."""


class _Raised(TemplateError):
    """The template called raise_exception(): it rejects these messages (becomes an InputError)."""


# -- messages -------------------------------------------------------------------------------------
def check_messages(messages: Any, text_only: bool) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts, or an InputError naming the first bad message and the fix.
    ``text_only``: every content must be a string (no model template: our fallbacks print it);
    else a list of parts or None (tool calls) is left to the model's template."""
    example = "[{'role': 'user', 'content': 'Hello'}]"
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InputError(f"chat messages must be a list of dicts like {example}, got a {type(messages).__name__}; "
                         "wrap a single message in a list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat message {i} is a {type(message).__name__}, not a dict; write each message as "
                             "{'role': 'user', 'content': 'text'}")
        if "role" not in message:
            raise InputError(f"chat message {i} has no 'role'; add one ('system', 'user' or 'assistant'), "
                             "e.g. {'role': 'user', 'content': 'text'}")
        role = message["role"]
        if not isinstance(role, str):
            raise InputError(f"chat message {i} has role {role!r} of type {type(role).__name__}; the role must be "
                             "a string such as 'user' or 'assistant'")
        if "content" not in message:
            raise InputError(f"chat message {i} (role {role!r}) has no 'content'; add the text as 'content' "
                             "(an empty string when there is none)")
        content = message["content"]
        allowed = (str,) if text_only else (str, list, tuple, type(None))
        if not isinstance(content, allowed):
            what = "a string" if text_only else "a string, a list of parts or None"
            raise InputError(f"chat message {i} (role {role!r}) has content of type {type(content).__name__}; "
                             f"it must be {what}")
        checked.append(dict(message))
    return checked


# -- rendering ------------------------------------------------------------------------------------
def render(template: str, source: str, variables: dict[str, Any], *, seconds: float = RENDER_SECONDS,
           max_chars: int | None = None) -> str:
    """Render ``template`` (from ``source``, named in errors) with ``variables`` within ``seconds``
    and ``max_chars`` (default: BASE_MAX_CHARS + 4 x the size of ``variables``).

    Errors: a broken template (syntax, sandbox violation, runaway loop or size, any other
    failure) is a ModelLoadError; the template rejecting the messages (``raise_exception``) or
    needing a value they do not give (undefined) is an InputError."""
    limit = max_chars if max_chars is not None else BASE_MAX_CHARS + 4 * _size(variables, None)
    fix = "fix the template in the model file, or set tokenizer.chat_template to a working one"
    deadline = time.thread_time() + seconds  # CPU time of this thread: a loaded machine is no runaway
    previous = sys.gettrace()
    sys.settrace(_tracer(deadline, seconds))
    try:
        compiled = _BoundedEnvironment(limit).from_string(template)
        pieces: list[str] = []
        total = 0
        for piece in compiled.generate(**variables):
            total += len(piece)
            if total > limit:
                raise _RenderLimit(f"its text exceeds {limit:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateSyntaxError as exc:
        raise ModelLoadError(f"{source}: chat template syntax error at line {exc.lineno}: {exc.message}; {fix}") from None
    except _RenderLimit as exc:
        raise ModelLoadError(f"{source}: chat template stopped{_at(exc)}: {exc}; the template loops without end or "
                             f"builds a huge text: {fix}") from None
    except (MemoryError, RecursionError) as exc:
        raise ModelLoadError(f"{source}: chat template stopped{_at(exc)}: {type(exc).__name__}; the template builds "
                             f"too much or recurses without end: {fix}") from None
    except _Raised as exc:
        raise InputError(f"{source}: the chat template rejected the messages{_at(exc)}: {exc.message}; change the "
                         "messages to what the model's chat format allows") from None
    except UndefinedError as exc:
        raise InputError(f"{source}: chat template{_at(exc)}: {exc.message}: the messages (or the keyword arguments "
                         "of apply_chat_template) lack a value the template uses; add it") from None
    except SecurityError as exc:
        raise ModelLoadError(f"{source}: chat template stopped by the sandbox{_at(exc)} ({exc}); the template tries "
                             f"something unsafe: {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure of template code is the template's
        raise ModelLoadError(f"{source}: chat template failed{_at(exc)} ({type(exc).__name__}: {exc}); check that "
                             f"the messages follow the model's chat format, else {fix}") from None
    finally:
        sys.settrace(previous)


def _tracer(deadline: float, seconds: float):
    """A trace function that raises _RenderLimit once ``deadline`` passes: checked on every
    Python call, and on every line of template code (the loops)."""

    def check() -> None:
        if time.thread_time() > deadline:  # raising also unsets the tracer (Python's rule)
            raise _RenderLimit(f"it ran longer than {seconds:g} s")

    def local(frame, event: str, arg: Any):
        check()
        return local

    def on_call(frame, event: str, arg: Any):
        check()
        return local if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    return on_call


def _at(exc: BaseException) -> str:
    """" at line N": the template line where ``exc`` happened (jinja2 rewrites tracebacks to
    template lines); "" when it happened outside template code."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" at line {line}" if line is not None else ""


def _size(value: Any, limit: int | None) -> int:
    """Characters and items in ``value``, nested containers counted through (shared items once
    per reference, as printing them would); stops counting past ``limit``."""
    total, stack = 0, [value]
    while stack and (limit is None or total <= limit):
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, Mapping):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
    return total


class _Buffer(list):
    """The output buffer of a macro or ``{% set %}`` block: counts what is appended."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.chars = limit, 0

    def _count(self, item: Any) -> None:
        self.chars += len(item) if isinstance(item, str) else 0
        if self.chars > self.limit:
            raise _RenderLimit(f"a block's text exceeds {self.limit:,} characters")

    def append(self, item: Any) -> None:
        self._count(item)
        super().append(item)

    def extend(self, items: Any) -> None:
        items = tuple(items)
        for item in items:
            self._count(item)
        super().extend(items)


class _CodeGenerator(CodeGenerator):
    """jinja2's code generator with two hooks: output buffers are ``_Buffer``s, and ``~``
    concatenations pass through the size check."""

    def buffer(self, frame) -> None:
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.new_buffer()")

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the globals HF templates use and the size checks of the module docstring."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CodeGenerator

    def __init__(self, max_chars: int) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.max_chars = max_chars
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    # -- checks -----------------------------------------------------------------------------
    def checked(self, value: Any) -> Any:
        """``value``, or _RenderLimit when it is too large."""
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _RenderLimit(f"it builds an integer of {value.bit_length():,} bits")
        if _size(value, self.max_chars) > self.max_chars:
            raise _RenderLimit(f"it builds a value of more than {self.max_chars:,} characters")
        return value

    def _refuse_over(self, estimate: int, what: str) -> None:
        if estimate > self.max_chars:
            raise _RenderLimit(f"{what} would make about {estimate:,} characters (limit {self.max_chars:,})")

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.max_chars:
                raise _RenderLimit(f"it passes {value} as an argument (limit {self.max_chars:,})")

    def _check_format(self, fmt: Any) -> None:
        if isinstance(fmt, str):
            for match in _FORMAT_WIDTH.finditer(fmt):
                width = int(match.group(1) or match.group(2))
                self._refuse_over(width, f"the format width {width}")

    def new_buffer(self) -> _Buffer:
        return _Buffer(self.max_chars)

    # -- hooks --------------------------------------------------------------------------------
    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and not isinstance(seq, (int, float)):
                    self._refuse_over(_size(seq, self.max_chars) * n, "repeating a value")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _RenderLimit("it multiplies integers past the size limit")
        elif operator == "+" and not isinstance(left, (int, float)):
            self._refuse_over(_size(left, self.max_chars) + _size(right, self.max_chars), "concatenating")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if left.bit_length() * right > MAX_INT_BITS:
                raise _RenderLimit(f"it computes a power of {left.bit_length() * right:,} bits")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left)
            self._check_arguments(right if isinstance(right, tuple) else (right,), {})
        return self.checked(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja2's signature
        __self._check_arguments(args, kwargs)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
        if isinstance(owner, str):
            __self._estimate_str_method(owner, name, args)
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def _estimate_str_method(self, s: str, name: str, args: tuple) -> None:
        if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            self._refuse_over(_replaced(s, args[0], args[1]), "str.replace")
        elif name == "join" and args:
            self._refuse_over(_joined(self, args[0], s), "str.join")
        elif name == "expandtabs" and args and isinstance(args[0], int):
            self._refuse_over(len(s) + s.count("\t") * args[0], "str.expandtabs")
        elif name in ("format", "format_map"):
            self._check_format(s)

    def _bounded_filter(self, name: str, f: Any) -> Any:
        signature = _signature(f)

        @functools.wraps(f)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self._check_arguments(args, kwargs)
            if signature is not None and name in _FILTER_ESTIMATES:
                try:
                    bound = signature.bind(*args, **kwargs).arguments
                except TypeError:
                    bound = None  # the filter itself reports the wrong call
                if bound is not None:
                    self._refuse_over(_FILTER_ESTIMATES[name](self, bound), f"the {name} filter")
            return self.checked(f(*args, **kwargs))

        return bounded


def _replaced(s: str, old: str, new: str) -> int:
    count = len(s) + 1 if not old else s.count(old)
    return len(s) + count * max(0, len(new) - len(old))


def _joined(env: _BoundedEnvironment, items: Any, separator: str) -> int:
    """Size of ``separator.join(items)`` for a string or list; 0 for other iterables (checked after)."""
    if not isinstance(items, (str, list, tuple)):
        return 0
    return _size(items, env.max_chars) + len(separator) * len(items)


def _width(width: Any) -> int:
    """indent's width: a count of spaces or the indent string itself."""
    if isinstance(width, str):
        return len(width)
    return width if isinstance(width, int) else 0


def _str_arg(bound: dict, name: str, default: str = "") -> str:
    value = bound.get(name, default)
    return value if isinstance(value, str) else default


#: Size estimates (before running) of the filters that can multiply their input's size.
_FILTER_ESTIMATES = {
    "replace": lambda env, a: _replaced(_str_arg(a, "s"), _str_arg(a, "old"), _str_arg(a, "new")),
    "join": lambda env, a: _joined(env, a.get("value"), _str_arg(a, "d")),
    "indent": lambda env, a: len(_str_arg(a, "s")) + _str_arg(a, "s").count("\n") * _width(a.get("width", 4)),
    "wordwrap": lambda env, a: len(_str_arg(a, "s")) * (1 + len(_str_arg(a, "wrapstring", "\n"))),
    "format": lambda env, a: env._check_format(a.get("value")) or 0,
}


def _signature(f: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(f)
    except (TypeError, ValueError):
        return None


def _raise_exception(message: str) -> None:
    """The global HF templates call to reject a conversation (roles out of order, say)."""
    raise _Raised(str(message))


def _tojson(value: Any, indent: int | None = None) -> str:
    if indent is not None and (not isinstance(indent, int) or abs(indent) > MAX_JSON_INDENT):
        raise _RenderLimit(f"tojson(indent={indent!r}) is over {MAX_JSON_INDENT}")
    return json.dumps(value, ensure_ascii=False, indent=indent)
