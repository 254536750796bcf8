"""Entry point: ``quantkit calibrate | eval | schemes | export | validate | inspect``.

Every user-facing failure is one line on stderr and a non-zero exit: 1 for bad input
(`QuantkitError`), 130 for an interrupt, 3 for an internal error (QUANTKIT_DEBUG=1 shows its traceback).
"""
from __future__ import annotations

import logging
import os

import click

from quantkit.errors import QuantkitError


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except QuantkitError as error:
            click.echo(f"error: {_one_line(error)}", err=True)
            ctx.exit(getattr(error, "exit_code", 1))
        except OSError as error:  # an environment failure no write site caught: still one line, naming the file
            where = f" {error.filename}" if error.filename else ""
            click.echo(f"error: cannot access{where}: {error.strerror or _one_line(error)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written to the output", err=True)
            ctx.exit(130)
        except Exception as error:
            if os.environ.get("QUANTKIT_DEBUG") == "1":
                raise
            click.echo(f"error: internal error {type(error).__name__}: {_one_line(error)[:300]} "
                       "(set QUANTKIT_DEBUG=1 for the traceback)", err=True)
            ctx.exit(3)


@click.group(cls=_Group)
@click.version_option(package_name="quantkit")
def cli() -> None:
    """Offline LLM calibration and quantization."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@cli.command()
def schemes() -> None:
    """List the quantization schemes, one line each, then llama.cpp's file types (per-tensor plans)."""
    from quantkit.formats.ggml_mixes import FILE_TYPE_SCHEMES
    from quantkit.formats.schemes import SCHEMES

    width = max(len(name) for name in [*SCHEMES, *FILE_TYPE_SCHEMES])
    for scheme in SCHEMES.values():
        click.echo(f"{scheme.name:<{width}}  {scheme.summary}")
    for name, file_type in FILE_TYPE_SCHEMES.items():
        click.echo(f"{name:<{width}}  llama.cpp's {file_type} file type: each tensor gets the K grid (or fallback) "
                   "llama-quantize gives it")


def _register_commands() -> None:
    from quantkit.cli import calibrate as calibrate_command
    from quantkit.cli import evaluate as evaluate_command
    from quantkit.cli import export as export_command
    from quantkit.cli import inspect as inspect_command
    from quantkit.cli import validate as validate_command

    cli.add_command(calibrate_command.calibrate)
    cli.add_command(evaluate_command.evaluate)
    cli.add_command(export_command.export)
    cli.add_command(inspect_command.inspect)
    cli.add_command(validate_command.validate)


_register_commands()


def main() -> None:
    cli(prog_name="quantkit")

