"""The ``acttail`` command line: parse arguments, call one function per stage, print.

Every ``ActTailError`` becomes one line on stderr and exit status 2; no traceback for bad input.
"""

from __future__ import annotations

import sys

import click

from .errors import ActTailError


class _Group(click.Group):
    """A click group that turns ActTailError into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActTailError as e:
            click.echo(f"acttail: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("acttail: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="acttail")
def main():
    """ActTail: allocate per-projection activation sparsity from weight-spectrum heavy tails."""


# ---- stage 1: checkpoints (fetch, convert-gguf) and the ESD analysis (analyze) ----------------------


# ---- stage 2: allocation, plans and exporters (allocate, plan, export) -------------------------------


# ---- stage 3: calibration, evaluation and generation (calibrate, eval, generate) ---------------------


# ---- stage 4: reports (report) ------------------------------------------------------------------------


if __name__ == "__main__":
    main()
