"""`ember` command line: parse arguments and dispatch to a command module. Nothing else lives here."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from ember import __version__
from ember.cli import bench, perplexity, quantize, store_cmds
from ember.cli import pull as pull_cli
from ember.cli import serve as serve_cli
from ember.errors import EmberError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: run large language models locally.")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    # Accepted after the command too; SUPPRESS keeps a subcommand from resetting `ember --debug run`'s value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
    parser.add_argument("-v", "--version", action="version", version=f"ember version {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a model (one-shot with a prompt or piped input, interactive chat otherwise)",
        description="Run a model. With a PROMPT or piped stdin, print one answer; otherwise start a chat.",
    )
    run.add_argument("model", nargs="?", default="smollm2", metavar="MODEL",
                     help="model name or .gguf path (default: smollm2)")
    run.add_argument("prompt", nargs="*", metavar="PROMPT", help="prompt text; piped stdin is prepended")
    run.add_argument("--verbose", action="store_true", help="print timings after each answer")
    run.add_argument("-n", "--num-predict", type=int, metavar="N", help="maximum tokens to generate (-1: no limit)")
    run.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0: greedy)")
    run.add_argument("--seed", type=int, metavar="S", help="random seed for reproducible sampling")
    run.add_argument("--ctx", type=int, metavar="N", help="context window in tokens")
    run.add_argument("--speculative", choices=("none", "ngram", "draft"), default=None,
                     help="speculative decoding: ngram (prompt lookup) or draft (a draft model); default: draft "
                          "when the model has a DRAFT, else none. Loads the model in this process")
    run.add_argument("--draft", metavar="MODEL", help="draft model (name or .gguf) for --speculative draft")
    run.add_argument("--draft-num-predict", type=int, metavar="N", help="most tokens drafted per step (0..64)")
    run.set_defaults(handler=_run)

    pull_cli.add_parser(sub, parents=[common])

    ls = sub.add_parser("list", aliases=["ls"], parents=[common], help="list models in the local store",
                        description="List models in the local store.")
    ls.set_defaults(handler=_list)

    bench.add_parser(sub, parents=[common])  # its module owns its options (also runnable on its own)
    serve_cli.add_parsers(sub, parents=[common])  # serve, ps, stop
    store_cmds.add_parsers(sub, parents=[common])  # create, show, rm, cp, push
    quantize.add_parser(sub, parents=[common])
    perplexity.add_parser(sub, parents=[common])
    return parser


# Handlers import their module on use, so `ember --help` never pays for more than argparse.
def _run(args: argparse.Namespace) -> int:
    from ember.cli.run import run_command

    return run_command(args)


def _list(args: argparse.Namespace) -> int:
    from ember.cli.list import list_command

    return list_command()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except EmberError as e:
        if args.debug:
            traceback.print_exc()
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`ember run ... | head`); silence the flush at interpreter exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
