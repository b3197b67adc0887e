"""The `dpnas` command line: parsing and dispatch only; the work lives in the library.

Each command is a small class whose docstring is its help.  A user error (bad name,
bad value, unreadable file) prints one line and exits with status 2; a traceback means
a bug in dpnas.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpnas.describe import describe, format_description
from dpnas.models import build_model, count_parameters
from dpnas.registry import MODELS, get_arch
from dpnas.space import ArchConfig, ConfigError, load_arch_file, parse_assignment


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit status 2."""


def resolve_arch(name_or_file: str, assignments: list[str] | None = None) -> ArchConfig:
    """A registry name or a .json/.toml file, with `field=value` overrides applied."""
    if name_or_file in MODELS:
        arch = MODELS[name_or_file].arch
    elif Path(name_or_file).suffix in (".json", ".toml") or Path(name_or_file).exists():
        arch = load_arch_file(name_or_file)
    else:
        arch = get_arch(name_or_file)  # raises with the list of known names
    changes = dict(parse_assignment(a) for a in assignments or [])
    return arch.replace(**changes) if changes else arch


class Command:
    name: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


class Describe(Command):
    """Build an architecture and print its config, parameter count, output shape and Opacus compatibility."""

    name = "describe"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("arch", metavar="NAME_OR_CONFIG_FILE", help="a name from `dpnas models`, or a .json/.toml ArchConfig")
        parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="FIELD=VALUE",
                            help="override one ArchConfig field (repeatable), e.g. --set activation=relu")
        parser.add_argument("--num-classes", type=int, default=10, metavar="N")
        parser.add_argument("--in-channels", type=int, default=3, metavar="C")
        parser.add_argument("--image-size", type=int, default=32, metavar="S", help="square input size in pixels (default 32)")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def run(self, args: argparse.Namespace) -> int:
        arch = resolve_arch(args.arch, args.assignments)
        info = describe(arch, num_classes=args.num_classes, in_channels=args.in_channels, image_size=args.image_size)
        name = args.arch if args.arch in MODELS else None
        if args.json:
            print(json.dumps({"name": name, **info}, indent=2))
        else:
            print(format_description(info, name=name or args.arch))
        return 0 if info["dp_compatible"] else 1


class Models(Command):
    """List the named architectures with their parameter counts (10 classes, 32x32 inputs)."""

    name = "models"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-classes", type=int, default=10, metavar="N")
        parser.add_argument("--json", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        rows = []
        for entry in MODELS.values():
            model = build_model(entry.arch, num_classes=args.num_classes, in_channels=3)
            rows.append({"name": entry.name, "params": count_parameters(model), "source": entry.source})
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        width = max(len(r["name"]) for r in rows)
        print(f"{'name':<{width}}  {'params':>11}  source")
        for r in rows:
            print(f"{r['name']:<{width}}  {r['params']:>11,}  {r['source']}")
        return 0


COMMANDS: list[Command] = [Describe(), Models()]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2, as every other user error
        self.exit(2, f"{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dpnas", description="Neural architecture search for differentially private deep learning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        doc = (command.__doc__ or "").strip()
        command_parser = sub.add_parser(command.name, help=doc.splitlines()[0], description=doc)
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.handler.run(args)
    except (ConfigError, UsageError) as err:
        print(f"dpnas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dpnas {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
