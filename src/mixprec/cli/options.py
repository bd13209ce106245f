"""The argparse pieces every command shares: the parser class, ``--debug``, one subcommand,
the task / model / size options of ``diagnose`` and ``bench``, and the name lists in helps.

Each command module (:mod:`~mixprec.cli.formats`, :mod:`~mixprec.cli.estimate`,
:mod:`~mixprec.cli.diagnose`, :mod:`~mixprec.cli.bench`) builds its parser from these, so
a usage error, ``--debug`` and a list of names read the same in every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = [
    "DEBUG_ENV",
    "Command",
    "OneLineParser",
    "add_debug",
    "add_source_options",
    "format_choices",
    "names",
    "recipe_names",
    "size_names",
]

DEBUG_ENV = "MIXPREC_DEBUG"  # set to 1 (or true/yes) to print tracebacks


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """``--debug``: print the traceback of an error (only the top parser sets a default,
    so that ``mixprec --debug bench`` and ``mixprec bench --debug`` both work)."""
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help=f"print the full traceback of an error (or set {DEBUG_ENV}=1)",
    )


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its name, what adds its options, what runs it, and its help texts.

    Args:
        name: the word after ``mixprec`` (or after ``mixprec formats``).
        arguments: adds the command's options to its parser.
        run: runs the command; ``main`` exits with what it returns.
        help: one line in the parent's list of commands.
        description: the paragraph of the command's own ``--help``.
    """

    name: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str | None = None

    def add_to(self, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add the parser: the command's options, then ``--debug``."""
        p = sub.add_parser(self.name, help=self.help, description=self.description)
        self.arguments(p)
        add_debug(p)
        p.set_defaults(func=self.run)
        return p


def add_source_options(
    p: argparse.ArgumentParser, *, model_help: str, exclusive: bool = False
) -> None:
    """``--task`` (a built-in task, default gpt) or ``--model`` (the user's factory), and
    ``--size``; ``exclusive``: argparse refuses both ``--task`` and ``--model``."""
    from mixprec.bench.tasks import TASKS

    src = p.add_mutually_exclusive_group() if exclusive else p
    src.add_argument("--task", default="gpt", help=f"built-in task (default gpt): {names(TASKS)}")
    src.add_argument("--model", metavar="PACKAGE.MODULE:FACTORY", help=model_help)
    p.add_argument("--size", default="small", help=f"task size (default small): {size_names()}")


def names(items: Iterable[str]) -> str:
    """The names a help or an error lists: ``"a, b, c"``."""
    return ", ".join(items)


def size_names() -> str:
    """The task sizes, as alternatives: ``"tiny | small | base"``."""
    from mixprec.bench.tasks import SIZES

    return " | ".join(SIZES)


def recipe_names() -> str:
    """Every recipe name, as the helps of ``--recipe`` / ``--recipes`` list them."""
    from mixprec.recipes import recipe_names as all_recipes

    return names(all_recipes())


def format_choices() -> str:
    """What ``--format`` accepts: every format name, an alias or a layout."""
    from mixprec.formats import FORMATS

    return names(FORMATS) + ", an alias (half, e4m3, ...) or a layout such as e3m4"
