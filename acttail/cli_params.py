"""The command line's parameter types and its error handling: the click group that turns ``ActTailError``
into one line and exit status 2 (and ``ActTailWarning`` into one ``acttail: warning:`` line), output paths
checked before any work, finite floats, devices, texts."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import click

from .errors import ActTailError, ActTailWarning
from .text import SOURCES as TEXTS


class Group(click.Group):
    """A click group that turns ActTailError and bad options into one clear line and exit status 2, and each
    ActTailWarning into one ``acttail: warning:`` line."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.simplefilter("always", ActTailWarning)
            warnings.showwarning = show_warning(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except ActTailError as e:
                click.echo(f"acttail: error: {e}", err=True)
                sys.exit(2)
            except click.UsageError as e:
                where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
                click.echo(f"acttail: error: {e.format_message()}{where}", err=True)
                sys.exit(2)
            except KeyboardInterrupt:
                click.echo("acttail: interrupted", err=True)
                sys.exit(130)


def show_warning(shown):
    """warnings.showwarning that prints an ActTailWarning as one line and leaves every other to ``shown``."""

    def show(message, category, *args, **kwargs):
        if issubclass(category, ActTailWarning):
            click.echo(f"acttail: warning: {message}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    return show


class Output(click.Path):
    """An output path, checked when the command line is read, before any work: its folder exists (or,
    with ``parents``, will be created) and takes a new file (tried for real), and it is not a folder
    (``folder=True``: not a file; ``None``: either)."""

    def __init__(self, folder: bool | None = False, parents: bool = False):
        super().__init__()
        self.folder, self.parents = folder, parents

    def convert(self, value, param, ctx):
        from .outputs import check_output

        path = super().convert(value, param, ctx)
        try:
            check_output(path, folder=self.folder, parents=self.parents)
        except ActTailError as e:
            self.fail(str(e), param, ctx)
        return path


class Finite(click.FloatRange):
    """A finite float, in a range if one is given (click's FloatRange lets NaN through). Allocation
    bounds are checked by ``acttail.allocate`` itself, with messages that say why."""

    def convert(self, value, param, ctx):
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{x} is not a finite number", param, ctx)
        return x


class Device(click.ParamType):
    """A torch device this machine has: cpu, cuda or cuda:N."""

    name = "device"

    def convert(self, value, param, ctx):
        from .runtime import check_device

        try:
            check_device(value)
        except ActTailError as e:
            self.fail(str(e), param, ctx)
        return value


class Text(click.ParamType):
    """A text: a fetched name (wiki, c4, ...) or a UTF-8 file (a Path for the API)."""

    name = "text"

    def convert(self, value, param, ctx):
        return value if isinstance(value, Path) or value in TEXTS else Path(value)


TOKENS = click.IntRange(min=2)  # a window holds at least 2 tokens
WINDOW = click.IntRange(min=2)
BATCH = click.IntRange(min=1)
DEVICE = Device()
TEXT = Text()
STEPS = click.IntRange(1, 100000)
