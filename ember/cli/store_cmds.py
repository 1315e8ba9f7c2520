"""Store commands: `ember create`, `show`, `rm`, `cp`, `push` (pull lives in pull.py, list in list.py).

| command                                   | does                                                         |
|-------------------------------------------|--------------------------------------------------------------|
| create NAME [-f Modelfile] [-q TYPE]      | build NAME from a Modelfile (default ./Modelfile), quantizing |
|                                           | the weights to TYPE (Q4_K_M, Q8_0, ...) on the way            |
| show NAME [--modelfile, --parameters,     | describe NAME, or print one part of it                       |
|   --template, --system or --license]      |                                                              |
| rm NAME...                                | delete models (and blobs no other model uses)                |
| cp SRC DST                                | copy a model under a new name                                |
| push NAME [--insecure]                    | upload NAME to its registry (host/namespace/model[:tag], or  |
|                                           | $EMBER_REGISTRY for names without a host)                    |
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    create = sub.add_parser("create", parents=parents, help="create a model from a Modelfile",
                            description="Create a model from a Modelfile (FROM a store model or a .gguf file).")
    create.add_argument("model", metavar="NAME")
    create.add_argument("-f", "--file", default="Modelfile", metavar="MODELFILE",
                        help="path to the Modelfile (default: ./Modelfile)")
    create.add_argument("-q", "--quantize", metavar="TYPE", help="quantize the weights (e.g. Q4_K_M, Q8_0)")
    create.set_defaults(handler=_create)

    show = sub.add_parser("show", parents=parents, help="show information about a model",
                          description="Show a model's details, or one part of it.")
    show.add_argument("model", metavar="NAME")
    part = show.add_mutually_exclusive_group()
    for flag in ("modelfile", "parameters", "template", "system", "license"):
        part.add_argument(f"--{flag}", dest="part", action="store_const", const=flag, help=f"print its {flag}")
    show.set_defaults(handler=_show, part=None)

    rm = sub.add_parser("rm", parents=parents, help="remove models", description="Remove models from the store.")
    rm.add_argument("models", nargs="+", metavar="NAME")
    rm.set_defaults(handler=_rm)

    cp = sub.add_parser("cp", parents=parents, help="copy a model", description="Copy a model to a new name.")
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.set_defaults(handler=_cp)

    push = sub.add_parser("push", parents=parents, help="push a model to a registry",
                          description="Upload a model to its registry (blobs it already has are skipped).")
    push.add_argument("model", metavar="NAME")
    push.add_argument("--insecure", action="store_true", help="use plain HTTP for the registry")
    push.set_defaults(handler=_push)


def _create(args: argparse.Namespace) -> int:
    from ember.cli.pull import ProgressLine, events
    from ember.store.create import create_from_file

    line = ProgressLine(sys.stderr)
    try:
        create_from_file(args.model, args.file, quantize=args.quantize, progress=events(line))
    finally:
        line.finish()
    return 0


def _push(args: argparse.Namespace) -> int:
    from ember.cli.pull import ProgressLine, events
    from ember.store.registry import push

    line = ProgressLine(sys.stderr)
    try:
        push(args.model, insecure=args.insecure, progress=events(line))
    finally:
        line.finish()
    return 0


def _rm(args: argparse.Namespace) -> int:
    from ember.store.create import delete

    for name in args.models:
        delete(name)
        print(f"deleted '{name}'")
    return 0


def _cp(args: argparse.Namespace) -> int:
    from ember.store.create import copy

    copy(args.source, args.destination)
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from ember.store.create import human_count, show

    out = out or sys.stdout
    info = show(args.model)
    if args.part:
        text = info[args.part]
        out.write(text if text.endswith("\n") or not text else text + "\n")
        return 0
    d = info["details"]
    sections: list[tuple[str, list[tuple[str, str]] | list[str]]] = [
        ("Model", [
            ("architecture", d["family"]),
            ("parameters", human_count(info["model_info"]["general.parameter_count"])),
            ("context length", str(info["context_length"])),
            ("embedding length", str(info["embedding_length"])),
            ("quantization", d["quantization_level"]),
        ]),
    ]
    if info["parameters"]:
        sections.append(("Parameters", info["parameters"].splitlines()))
    if info["system"]:
        sections.append(("System", info["system"].splitlines()[:3]))
    if info["license"]:
        sections.append(("License", [ln for ln in info["license"].splitlines() if ln.strip()][:2]))
    for title, rows in sections:
        out.write(f"  {title}\n")
        for row in rows:
            if isinstance(row, tuple):
                out.write(f"    {row[0]:<20}{row[1]}\n")
            else:
                out.write(f"    {row}\n")
        out.write("\n")
    return 0
