"""`ember run`: one-shot answers and the interactive chat, Ollama-style.

One-shot when a prompt is given or stdin is piped (stdin text first, then the prompt, joined by a space, as
Ollama does); otherwise a chat that keeps the conversation, with `/`-commands to change parameters.
"""
from __future__ import annotations

import argparse
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TextIO

from ember.cli.list import human_bytes
from ember.errors import EmberError, InvalidParameterError

# name -> (type, minimum, maximum); None = unbounded. Ranges are the ones that are meaningful at all; the
# engine may reject more.
_RULES: dict[str, tuple[type, float | None, float | None]] = {
    "temperature": (float, 0.0, None),
    "top_k": (int, 0, None),
    "top_p": (float, 0.0, 1.0),
    "min_p": (float, 0.0, 1.0),
    "repeat_penalty": (float, 0.0, None),
    "repeat_last_n": (int, -1, None),  # -1: the whole context, as in Ollama
    "seed": (int, None, None),
    "num_predict": (int, -1, None),  # -1: no limit
    "num_ctx": (int, 1, None),
    "draft_num_predict": (int, 0, 64),  # speculative decoding: most tokens drafted per step
}


@dataclass
class Parameters:
    """Sampling/runtime parameters the user set explicitly; unset ones (None) keep the model's defaults."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    num_predict: int | None = None
    num_ctx: int | None = None
    draft_num_predict: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name, (kind, lo, hi) in _RULES.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _check(name, value, kind, lo, hi))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameterError("stop sequences must be non-empty strings")

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Parameters)]

    def set(self, name: str, values: list[str]) -> None:
        """`/set parameter NAME VALUE...`: convert, validate, assign (raises InvalidParameterError)."""
        if name not in self.names():
            raise InvalidParameterError(f"unknown parameter '{name}' (known: {', '.join(self.names())})")
        if not values:
            raise InvalidParameterError(f"missing value for parameter '{name}'")
        if name == "stop":
            self.stop = list(values)  # several stop sequences at once, as Ollama's /set parameter stop a b
            return
        if len(values) != 1:
            raise InvalidParameterError(f"parameter '{name}' takes one value")
        kind, lo, hi = _RULES[name]
        setattr(self, name, _check(name, values[0], kind, lo, hi))

    def explicit(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.names() if getattr(self, n) not in (None, [])}

    def options(self, n_ctx: int) -> dict[str, Any]:
        """Keyword arguments for Model.chat, translating Ollama's conventions (-1 = unlimited/whole context)."""
        opts: dict[str, Any] = {}
        for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "draft_num_predict"):
            value = getattr(self, name)
            if value is not None:
                opts[name] = value
        if self.repeat_last_n is not None:
            opts["repeat_last_n"] = n_ctx if self.repeat_last_n == -1 else self.repeat_last_n
        if self.num_predict is not None and self.num_predict >= 0:
            opts["max_tokens"] = self.num_predict
        if self.stop:
            opts["stop"] = list(self.stop)
        return opts


def _check(name: str, value: Any, kind: type, lo: float | None, hi: float | None) -> Any:
    try:
        if kind is int:
            converted: Any = int(value) if not isinstance(value, float) or value.is_integer() else None
            if converted is None:
                raise ValueError
        else:
            converted = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"parameter '{name}' must be {'an integer' if kind is int else 'a number'}, "
                                    f"got '{value}'") from None
    if kind is float and not math.isfinite(converted):
        raise InvalidParameterError(f"parameter '{name}' must be finite, got '{value}'")
    if (lo is not None and converted < lo) or (hi is not None and converted > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise InvalidParameterError(f"parameter '{name}' must be {bounds}, got {value}")
    return converted


# ---- model access --------------------------------------------------------------------------------------------


def load_model(name: str, n_ctx: int | None, speculative: str | None = None, draft: str | None = None) -> Any:
    """The model from the Ember server on EMBER_HOST when one answers, else loaded here through the public API;
    a seam the tests replace with a fake model. Choosing speculative decoding (how a model is loaded) always
    loads it here."""
    if speculative is None and draft is None:
        from ember.cli.client import connect_model

        remote = connect_model(name, n_ctx)
        if remote is not None:
            return remote
    import ember

    return ember.load(name, n_ctx=n_ctx, speculative=speculative, draft=draft)


def _format_duration(seconds: float) -> str:
    # Go's time.Duration style, as Ollama prints it.
    if seconds >= 1:
        return f"{seconds:.3f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f}ms"
    return f"{seconds * 1e6:.3f}µs"


def format_stats(stats: Any, total_seconds: float, load_seconds: float) -> str:
    """Ollama's --verbose block."""
    prompt_n = stats.prompt_tokens - getattr(stats, "cached_tokens", 0)  # only what was actually computed
    prompt_rate = prompt_n / stats.prompt_seconds if stats.prompt_seconds > 0 else 0.0
    eval_rate = stats.generated_tokens / stats.generate_seconds if stats.generate_seconds > 0 else 0.0
    rows = [
        ("total duration", _format_duration(total_seconds)),
        ("load duration", _format_duration(load_seconds)),
        ("prompt eval count", f"{prompt_n} token(s)"),
        ("prompt eval duration", _format_duration(stats.prompt_seconds)),
        ("prompt eval rate", f"{prompt_rate:.2f} tokens/s"),
        ("eval count", f"{stats.generated_tokens} token(s)"),
        ("eval duration", _format_duration(stats.generate_seconds)),
        ("eval rate", f"{eval_rate:.2f} tokens/s"),
    ]
    drafted = getattr(stats, "draft_tokens", 0)
    if drafted:  # speculative decoding: how much of the drafting paid
        steps = getattr(stats, "spec_steps", 0)
        accepted = getattr(stats, "accepted_tokens", 0)
        rows += [
            ("draft count", f"{drafted} token(s)"),
            ("draft acceptance", f"{100.0 * accepted / drafted:.1f}%"),
            ("tokens per step", f"{(accepted + steps) / steps:.2f}" if steps else "-"),
        ]
    return "\n".join(f"{label + ':':<22}{value}" for label, value in rows)


@dataclass
class Session:
    """One model and one conversation; shared by the one-shot and interactive paths."""

    model_name: str
    params: Parameters
    verbose: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    model: Any = None
    pending_load_seconds: float = 0.0  # reported with the next answer's stats
    speculative: str | None = None
    draft: str | None = None

    def load(self) -> None:
        t0 = time.perf_counter()
        if self.speculative is None and self.draft is None:
            self.model = load_model(self.model_name, self.params.num_ctx)
        else:
            self.model = load_model(self.model_name, self.params.num_ctx, self.speculative, self.draft)
        self.pending_load_seconds = time.perf_counter() - t0

    def conversation(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def answer(self, prompt: str) -> None:
        """Stream the reply to `prompt` and keep both turns; on Ctrl-C or an error keep neither, so the
        conversation never holds a question without its answer."""
        self.messages.append({"role": "user", "content": prompt})
        t0 = time.perf_counter()
        # The load belongs to the first request after it, answered or not (Ollama reports it the same way).
        load_seconds, self.pending_load_seconds = self.pending_load_seconds, 0.0
        pieces: list[str] = []
        stream = None
        try:
            stream = self.model.chat(self.conversation(), stream=True, **self.params.options(self.model.n_ctx))
            for chunk in stream:
                if chunk.text:
                    pieces.append(chunk.text)
                    self.out.write(chunk.text)
                    self.out.flush()
        except BaseException:
            self.messages.pop()
            if stream is not None and hasattr(stream, "close"):
                stream.close()
            if pieces:
                self.out.write("\n")
                self.out.flush()
            raise
        text = "".join(pieces)
        self.out.write("\n" if not text.endswith("\n") else "")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": text})
        total = time.perf_counter() - t0 + load_seconds
        result = getattr(stream, "result", None)
        if self.verbose and result is not None:
            self.err.write(format_stats(result.stats, total, load_seconds) + "\n")
            self.err.flush()


# ---- one-shot ------------------------------------------------------------------------------------------------


def _stdin_is_data(stdin: TextIO) -> bool:
    """True when stdin is a pipe or a file. A terminal means chat; /dev/null or a closed stdin means nothing."""
    try:
        mode = os.fstat(stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def gather_prompt(words: list[str], stdin: TextIO) -> str | None:
    """The one-shot prompt (stdin text, then the words), or None to start a chat."""
    parts = []
    if _stdin_is_data(stdin):
        piped = stdin.read()
        if piped.strip():
            parts.append(piped)
    if words:
        parts.append(" ".join(words))
    return " ".join(parts) if parts else None


def parameters_from_args(args: argparse.Namespace) -> Parameters:
    return Parameters(
        temperature=args.temperature, seed=args.seed, num_predict=args.num_predict, num_ctx=args.ctx,
        draft_num_predict=getattr(args, "draft_num_predict", None),
    )


def run_command(args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    params = parameters_from_args(args)
    prompt = gather_prompt(args.prompt, stdin)
    if prompt is None and not stdin.isatty():
        raise EmberError("no prompt: give one as an argument or pipe it on stdin")
    session = Session(model_name=args.model, params=params, verbose=args.verbose,
                      speculative=getattr(args, "speculative", None), draft=getattr(args, "draft", None))
    session.load()
    if prompt is not None:
        session.answer(prompt)
        return 0
    return Chat(session).run()


# ---- interactive chat ----------------------------------------------------------------------------------------

HELP = '''Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use """ to begin a multi-line message.
'''

SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""

PARAMETER_HELP = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict (-1: no limit)
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter num_ctx <int>          Set the context size (reloads the model)
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions (-1: whole context)
  /set parameter stop <string> <string> ...   Set the stop parameters
"""

SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

_MULTILINE = '"""'


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


class Chat:
    """The `>>> ` loop. `read_line` is `input` on a terminal (readline editing and history); tests pass
    their own."""

    def __init__(self, session: Session, read_line: Callable[[str], str] | None = None) -> None:
        self.session = session
        if read_line is None:
            try:
                import readline  # noqa: F401  (importing it turns on line editing for input())
            except ImportError:
                pass
            read_line = input
        self.read_line = read_line

    def say(self, text: str) -> None:
        self.session.out.write(text if text.endswith("\n") else text + "\n")
        self.session.out.flush()

    def error(self, message: str) -> None:
        self.session.err.write(f"Error: {message}\n")
        self.session.err.flush()

    def run(self) -> int:
        while True:
            try:
                text = self.read_message()
            except EOFError:  # Ctrl-D
                self.say("")
                return 0
            except KeyboardInterrupt:  # Ctrl-C at the prompt only discards the line
                self.say("\nUse Ctrl + d or /bye to exit.")
                continue
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text) == "bye":
                    return 0
                continue
            try:
                self.session.answer(text)
            except KeyboardInterrupt:  # Ctrl-C during generation cancels just this answer
                self.say("")
                continue
            except EmberError as e:
                self.error(str(e))
                continue
            self.say("")

    def read_message(self) -> str:
        line = self.read_line(">>> ")
        stripped = line.lstrip()
        if not stripped.startswith(_MULTILINE):
            return line.strip()
        rest = stripped[len(_MULTILINE):]
        if rest.rstrip().endswith(_MULTILINE):
            return rest.rstrip()[: -len(_MULTILINE)].strip()
        lines = [rest] if rest.strip() else []
        while True:
            line = self.read_line("... ")
            if line.rstrip().endswith(_MULTILINE):
                lines.append(line.rstrip()[: -len(_MULTILINE)])
                return "\n".join(lines).strip("\n")
            lines.append(line)

    # -- slash commands -------------------------------------------------------------------------------------

    def command(self, text: str) -> str | None:
        words = text.split()
        cmd, args = words[0], words[1:]
        if cmd == "/bye":
            return "bye"
        if cmd == "/clear":
            self.session.messages.clear()
            self.say("Cleared session context")
        elif cmd == "/set":
            self.set_command(text, args)
        elif cmd == "/show":
            self.show_command(args)
        elif cmd in ("/?", "/help"):
            topic = args[0] if args else ""
            self.say({"set": SET_HELP, "/set": SET_HELP, "show": SHOW_HELP, "/show": SHOW_HELP}.get(topic, HELP))
        else:
            self.say(f"Unknown command '{cmd}'. Type /? for help")
        return None

    def set_command(self, text: str, args: list[str]) -> None:
        if not args:
            self.say(SET_HELP)
            return
        what = args[0]
        if what == "parameter":
            if len(args) < 2:
                self.say(PARAMETER_HELP)
                return
            self.set_parameter(args[1], args[2:])
        elif what == "system":
            system = text.split(None, 2)[2].strip() if len(args) > 1 else ""
            if len(system) >= 2 and system[0] == system[-1] and system[0] in "\"'":
                system = system[1:-1]
            self.session.system = system or None
            self.say("Set system message." if system else "Cleared system message.")
        elif what in ("verbose", "quiet"):
            self.session.verbose = what == "verbose"
            self.say(f"Set '{what}' mode.")
        else:
            self.say(f"Unknown command '/set {what}'. Type /? for help")

    def set_parameter(self, name: str, values: list[str]) -> None:
        params = self.session.params
        before = getattr(params, name, None)
        try:
            params.set(name, values)
            if name == "num_ctx" and params.num_ctx != getattr(self.session.model, "n_ctx", None):
                self.session.load()  # the KV cache is sized at load time
        except EmberError as e:
            if hasattr(params, name):
                setattr(params, name, before)
            self.error(str(e))
            return
        shown = ", ".join(values) if name == "stop" else values[0]
        self.say(f"Set parameter '{name}' to '{shown}'")

    def show_command(self, args: list[str]) -> None:
        what = args[0] if args else "info"
        session = self.session
        if what == "info":
            info = dict(session.model.info())
            lines = ["  Model"]
            for key, value in info.items():
                if key in ("chat_template", "name", "path"):
                    continue
                if key == "parameters" and isinstance(value, int):
                    value = _human_count(value)
                elif key == "file_size" and isinstance(value, int):
                    value = human_bytes(value)
                lines.append(f"    {key.replace('_', ' '):<20}{value}")
            lines.append(f"    {'file':<20}{info.get('path', getattr(session.model, 'path', ''))}")
            self.say("\n".join(lines) + "\n")
        elif what == "parameters":
            explicit = session.params.explicit()
            if not explicit:
                self.say("No parameters were set for this session.")
            else:
                width = max(len(k) for k in explicit) + 2
                rows = [f"{k:<{width}}{' '.join(map(str, v)) if isinstance(v, list) else v}"
                        for k, v in explicit.items()]
                self.say("Model defined parameters:\n" + "\n".join(rows))
        elif what == "system":
            self.say(session.system or "No system message was specified for this model.")
        elif what == "template":
            self.say(session.model.info().get("chat_template") or "No prompt template was specified for this model.")
        elif what == "license":
            self.say(self._license() or "No license was specified for this model.")
        else:
            self.say(SHOW_HELP)

    def _license(self) -> str | None:
        from ember.store import resolve_model

        try:
            resolved = resolve_model(self.session.model_name)
        except EmberError:
            return None
        if resolved.license_path is None:
            return None
        return resolved.license_path.read_text(encoding="utf-8", errors="replace")
