"""The guarded Jinja environment chat templates render in: resource limits (RenderLimits), the per-render
budget, size pre-checks for everything that can grow, and the sandboxed environment plus the AST rewrite that
routes loops and output through its counters.

Kept apart from ChatTemplate (chat_template.py) because it is the security boundary: a template is code from a
downloaded file, so rendering is contained:

| threat                                  | defence                                                               |
|-----------------------------------------|-----------------------------------------------------------------------|
| reaching Python internals (`__class__`) | ImmutableSandboxedEnvironment; an unsafe attribute raises at once     |
| mutating the caller's messages          | immutable sandbox: list.append, dict.update... are refused            |
| looping forever, exponential recursion  | every loop iteration, call, filter, operator and output costs a step: |
|                                         | at most `RenderLimits.max_steps` steps and `timeout_s` seconds        |
| building enormous strings or lists      | no single value may exceed `max_output_chars`; operations that        |
|                                         | multiply sizes (`*`, `%`, join, replace, center, indent, tojson...)   |
|                                         | are checked before they allocate; all text emitted, captured blocks   |
|                                         | and macro bodies included, is bounded by 8 x `max_output_chars`       |
| an oversized result                     | the prompt may not exceed `max_output_chars` (4 Mi characters)        |
| a huge template                         | sources over 1 Mi characters are refused                              |

Every failure, of the template or of a guard, surfaces as ember.errors.TemplateError with a one-line message.
"""
from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from ember.errors import InvalidParameterError, TemplateError

__all__ = ["EMITTED_FACTOR", "MAX_INT_BITS", "MAX_RANGE", "MAX_SOURCE_CHARS", "RenderLimits"]

MAX_SOURCE_CHARS = 1 << 20  # real templates are a few KB; a multi-MB one is an attack or a broken file
MAX_RANGE = 100_000  # items one range() may produce (jinja2.sandbox's own bound)
MAX_INT_BITS = 1 << 16  # integer results larger than this are refused (str() of them would fail anyway)
EMITTED_FACTOR = 8  # all text output (incl. captured {% set %} blocks and macro bodies) <= this x output limit
_MAX_NESTING = 256  # deeper structures are treated as too large to print


@dataclass(frozen=True)
class RenderLimits:
    """Resource bounds for one render. The defaults fit any real conversation with room to spare."""

    max_output_chars: int = 4 * 1024 * 1024  # the prompt, and any single value built while rendering
    max_steps: int = 1_000_000  # loop iterations + calls + filters + operators
    timeout_s: float = 10.0  # wall-clock seconds

    def __post_init__(self) -> None:
        for name in ("max_output_chars", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise InvalidParameterError(f"timeout_s must be a positive number, got {self.timeout_s!r}")


# -----------------------------------------------------------------------------------------------------------
# The guarded environment.
# -----------------------------------------------------------------------------------------------------------
class _Budget:
    """Per-render counters. Lives in a thread-local so filters (which get no context) can reach it."""

    __slots__ = ("limits", "steps", "deadline", "emitted", "value_limit", "emitted_limit")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps = 0
        self.deadline = time.monotonic() + limits.timeout_s
        self.emitted = 0
        self.value_limit = limits.max_output_chars
        self.emitted_limit = EMITTED_FACTOR * limits.max_output_chars

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise TemplateError(f"chat template exceeded {self.limits.max_steps} steps (endless loop?)")
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template took longer than {self.limits.timeout_s:g} s to render")

    def require(self, size: int, what: str) -> None:
        if size > self.value_limit:
            raise TemplateError(f"chat template {what} would exceed {self.value_limit} characters")


_active = threading.local()


def _budget() -> _Budget:
    budget = getattr(_active, "budget", None)
    if budget is None:
        # Outside a render: Jinja's compiler tries to constant-fold filters; failing here makes it leave them
        # to run time, where they are counted. (Also fails closed should a template object ever escape.)
        raise TemplateError("chat template code ran outside a render")
    return budget


def _text_size(obj: Any, limit: int, indent: int = 0) -> int:
    """Estimate len(str(obj)) (or of its JSON with `indent`), stopping as soon as it passes `limit`.

    Counts shared references every time they would be printed: `[big] * 1000` is 1000 x big, which is what
    makes it dangerous. Iterators on a stack keep memory bounded by nesting depth, not size."""
    if type(obj) is str:  # the overwhelmingly common case
        return len(obj)
    total = 0
    stack: list[Iterator[Any]] = [iter((obj,))]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        depth = len(stack)
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, (bytes, bytearray)):
            total += 4 * len(item) + 3
        elif item is None or isinstance(item, (bool, float)):
            total += 24
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, jinja2.Undefined):
            pass
        elif depth > _MAX_NESTING:
            return limit + 1
        elif isinstance(item, Namespace):
            attrs = object.__getattribute__(item, "_Namespace__attrs")
            total += 13 + len(attrs) * (4 + indent * depth)
            stack.append(itertools.chain.from_iterable(attrs.items()))
        elif isinstance(item, Mapping):
            total += 2 + len(item) * (4 + indent * depth)
            stack.append(itertools.chain.from_iterable(item.items()))
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + len(item) * (2 + indent * depth)
            stack.append(iter(item))
        else:
            total += 64  # jinja objects (macros, loop, cycler) print as short reprs
        if total > limit:
            return total
    return total


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], pos: int, name: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _int_arg(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_BIG_NUMBER = re.compile(r"\d{7,}")


def _check_format(fmt: str, values: Iterable[Any], budget: _Budget) -> None:
    """printf/str.format: widths in the spec, `*` widths and repeated fields can all multiply sizes."""
    if _BIG_NUMBER.search(fmt):
        raise TemplateError("chat template format string has an oversized width or precision")
    values = list(values)
    for value in values:
        if abs(_int_arg(value)) > budget.value_limit:
            raise TemplateError("chat template format argument is too large")
    fields = fmt.count("%") + fmt.count("{")
    payload = sum(_text_size(v, budget.value_limit) for v in values)
    budget.require(len(fmt) + fields * payload, "formatted string")


def _materialize(value: Any) -> list[Any]:
    # Size checks must look at every item, and a generator can be read only once: read it here.
    return [] if isinstance(value, jinja2.Undefined) else list(value)


def _text(budget: _Budget, value: Any) -> str:
    budget.require(_text_size(value, budget.value_limit), "string")  # before str() builds it
    return str(value)


# Pre-checks for the filters whose result can be much larger than their inputs. Each gets the filter's
# arguments after any context/environment argument; join and sum replace a generator argument in place by
# the list they read (a generator can be consumed only once).
def _pre_center(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    budget.require(_int_arg(_arg(args, kwargs, 1, "width", 80)), "padded string")


def _pre_indent(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    text = _text(budget, args[0]) if args else ""
    width = _arg(args, kwargs, 1, "width", 4)
    width = len(width) if isinstance(width, str) else _int_arg(width)
    budget.require(len(text) + (text.count("\n") + 1) * width, "indented string")


def _pre_count_arg(pos: int, name: str) -> Callable[[_Budget, list[Any], dict[str, Any]], None]:
    def check(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
        if _int_arg(_arg(args, kwargs, pos, name, 0)) > MAX_RANGE:
            raise TemplateError(f"chat template {name} argument exceeds {MAX_RANGE}")

    return check


def _pre_join(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    items = _materialize(args[0]) if args else []
    if args:
        args[0] = items
    separators = len(str(_arg(args, kwargs, 1, "d", ""))) * max(len(items) - 1, 0)
    budget.require(separators, "joined string")  # checked alone first: _text_size may be costly
    budget.require(separators + _text_size(items, budget.value_limit), "joined string")


def _pre_replace(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    text = _text(budget, args[0]) if args else ""
    old, new = _text(budget, _arg(args, kwargs, 1, "old", "")), _text(budget, _arg(args, kwargs, 2, "new", ""))
    _check_replace(budget, text, old, new, _arg(args, kwargs, 3, "count", None))


def _check_replace(budget: _Budget, text: str, old: str, new: str, count: Any) -> None:
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        hits = min(hits, count)
    budget.require(len(text) + hits * max(len(new) - len(old), 0), "replaced string")


def _pre_format(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    _check_format(_text(budget, args[0]) if args else "", [*args[1:], *kwargs.values()], budget)


def _pre_tojson(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    indent = _arg(args, kwargs, 2, "indent", None)
    width = len(indent) if isinstance(indent, str) else _int_arg(indent)
    budget.require(_text_size(args[0] if args else None, budget.value_limit, indent=width), "JSON string")


def _pre_stringify(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    budget.require(_text_size(args[0] if args else None, budget.value_limit), "string")


def _pre_sum(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    items = _materialize(args[0]) if args else []
    if args:
        args[0] = items
    # A sum of sequences (lists, or an attribute of each item) is no longer than all their elements
    # together, which the printed size of the items bounds.
    budget.require(_text_size([items, _arg(args, kwargs, 2, "start", 0)], budget.value_limit), "sum")


def _pre_wordwrap(budget: _Budget, args: list[Any], kwargs: dict[str, Any]) -> None:
    wrap = _arg(args, kwargs, 4, "wrapstring", None)
    if isinstance(wrap, str):
        text = _text(budget, args[0]) if args else ""
        budget.require(len(text) * (1 + len(wrap)), "wrapped string")


_FILTER_CHECKS: Mapping[str, Callable[[_Budget, list[Any], dict[str, Any]], None]] = {
    "center": _pre_center,
    "indent": _pre_indent,
    "batch": _pre_count_arg(1, "linecount"),
    "slice": _pre_count_arg(1, "slices"),
    "join": _pre_join,
    "replace": _pre_replace,
    "format": _pre_format,
    "tojson": _pre_tojson,
    "pprint": _pre_stringify,
    "string": _pre_stringify,
    "sum": _pre_sum,
    "wordwrap": _pre_wordwrap,
}

# str methods that can amplify without a cheap size estimate and that no chat template needs.
_DENIED_STR_METHODS = frozenset({"expandtabs", "translate", "maketrans"})
_SIZED = (str, bytes, list, tuple)


def _check_result(budget: _Budget, value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict, set)):
        budget.require(len(value), "value")
    return value


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 0 if getattr(func, "jinja_pass_arg", None) is None else 1  # context/env/eval-ctx first
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the context argument
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        if check is not None:
            rest = list(args[offset:])
            check(budget, rest, kwargs)
            args = (*args[:offset], *rest)
        return _check_result(budget, func(*args, **kwargs))

    return guarded


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps, Unicode kept; Jinja's own escapes <>&' for HTML, which would
    # change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: Any) -> None:
    raise TemplateError(_one_line(f"chat template error: {message}"))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _bounded_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise TemplateError(f"chat template range() of {len(r)} items exceeds {MAX_RANGE}")
    return r


class _GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} marks assistant text for training masks; for
    rendering it is a plain block."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment plus step counting and size checks on everything that can grow."""

    intercepted_binops = frozenset({"+", "*", "%", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag],
        )
        self.globals.pop("lipsum", None)  # lipsum(n) generates n paragraphs: useless here, and a size lever
        self.globals["range"] = _bounded_range
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    # Transformers renders the same sandbox with unsafe attributes as Undefined, which fails only when used;
    # failing at the access is stricter and gives a clear message.
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(obj, "__self__", None) is self:
            # Our own ember_* helpers count for themselves; kwargs only carries Jinja's _loop_vars bookkeeping.
            return obj(*args)
        budget = _budget()
        budget.step()
        checked = self._check_call(budget, obj, list(args), kwargs)
        return _check_result(budget, super().call(context, obj, *checked, **kwargs))

    @staticmethod
    def _check_call(budget: _Budget, func: Any, args: list[Any], kwargs: dict[str, Any]) -> list[Any]:
        name = getattr(func, "__name__", None)
        owner = getattr(func, "__self__", None)
        wrapped = getattr(func, "__wrapped__", None)  # the sandbox's wrapper around str.format
        if wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
            owner, name = wrapped.__self__, wrapped.__name__
        if not isinstance(owner, (str, bytes)):
            return args
        if name in _DENIED_STR_METHODS:
            raise SecurityError(f"str.{name} is not available to chat templates")
        if name in ("center", "ljust", "rjust", "zfill"):
            budget.require(_int_arg(_arg(args, kwargs, 0, "width", 0)), "padded string")
        elif name == "join" and args:
            args[0] = _materialize(args[0])
            sep_size = len(owner) * max(len(args[0]) - 1, 0)
            budget.require(sep_size, "joined string")
            budget.require(sep_size + _text_size(args[0], budget.value_limit), "joined string")
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(owner)):
            _check_replace(budget, str(owner), str(args[0]), str(args[1]), _arg(args, kwargs, 2, "count", None))
        elif name in ("format", "format_map") and isinstance(owner, str):
            values = list(args[0].values()) if name == "format_map" and args and isinstance(args[0], Mapping) else args
            _check_format(owner, [*values, *kwargs.values()], budget)
        return args

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        if operator == "*":
            if isinstance(left, _SIZED) and isinstance(right, int):
                budget.require(len(left) * right, "repeated sequence")
            elif isinstance(right, _SIZED) and isinstance(left, int):
                budget.require(len(right) * left, "repeated sequence")
            elif isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise TemplateError("chat template integer product is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right > MAX_INT_BITS or right * left.bit_length() > MAX_INT_BITS:
                    raise TemplateError("chat template power is too large")
        elif operator == "+":
            if isinstance(left, _SIZED) and isinstance(right, _SIZED):
                budget.require(len(left) + len(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            if isinstance(right, tuple):
                values: Iterable[Any] = right
            elif isinstance(right, Mapping):
                values = right.values()
            else:
                values = (right,)
            _check_format(left, values, budget)
        return _check_result(budget, super().call_binop(context, operator, left, right))

    # Helpers the AST rewrite (below) routes template code through. Templates cannot name them:
    # they are reached only via nodes.EnvironmentAttribute, which has no template syntax.
    def ember_iter(self, iterable: Any) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.step()
            yield item

    def ember_concat(self, *parts: Any) -> str:
        budget = _budget()
        budget.step()
        budget.require(sum(_text_size(p, budget.value_limit) for p in parts), "concatenation")
        return "".join(map(str, parts))  # what Jinja's own str_join does without autoescape

    def ember_emit(self, value: Any) -> Any:
        budget = _budget()
        budget.step()
        budget.emitted += _text_size(value, budget.emitted_limit)
        if budget.emitted > budget.emitted_limit:
            raise TemplateError(f"chat template produced more than {budget.emitted_limit} characters of text")
        return value


def _env_call(name: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=lineno)


class _Instrument(NodeTransformer):
    """Routes every for-loop iterable, `~` concatenation and output expression through the environment's
    counters. Calls, filters and operators are already intercepted by the sandbox; loops and output are
    not, and without this `{% for %}` nests and `{% set %}` blocks could run or grow without bound."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = _env_call("ember_iter", [node.iter], node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return _env_call("ember_concat", list(node.nodes), node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [_env_call("ember_emit", [child], child.lineno or node.lineno) for child in node.nodes]
        return node


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The environment's globals; render() refuses extra variables that would shadow them.
_GLOBAL_NAMES = frozenset({"range", "raise_exception", "strftime_now", "namespace", "dict", "cycler", "joiner"})
