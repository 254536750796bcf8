"""A click choice whose error names the closest choice, as every other unknown name in quantkit does."""
from __future__ import annotations

import difflib

import click


class Choice(click.Choice):
    """`click.Choice` that adds "did you mean X?" to its one-line error when a choice is close to the value
    (e.g. `--format gguff`)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as error:
            names = [str(choice) for choice in self.choices]
            close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
            if close:
                error.message = f"{error.message.rstrip('.')}; did you mean {close[0]}?"
            raise
