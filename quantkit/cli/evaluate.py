"""``quantkit eval``: perplexity of a quantized (or float) model, side by side with its reference."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.argument("target")
@click.option("--reference", help="Reference model (default: the source model named in the manifest).")
@click.option("--no-reference", is_flag=True, help="Only evaluate TARGET.")
@click.option("--text", type=click.Path(path_type=Path), help="Plain-text file to score (default: bundled English text).")
@click.option("--dataset", help="Score a dataset instead: gsm8k, text, or a .txt/.jsonl/.parquet path.")
@click.option("--data-files", multiple=True)
@click.option("--text-column", default="text", show_default=True)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--max-windows", default=16, show_default=True, type=int)
@click.option("--batch-size", default=2, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
def evaluate(target, reference, no_reference, text, dataset, data_files, text_column, seq_len, max_windows,
             batch_size, as_json):
    """Perplexity over non-overlapping windows; with a reference also KL and top-1 agreement."""
    from quantkit import api
    from quantkit.cli import render

    def run():
        return api.evaluate(target, reference=reference, compare_reference=not no_reference, text=text,
                            dataset=dataset, data_files=tuple(data_files), text_column=text_column, seq_len=seq_len,
                            max_windows=max_windows, batch_size=batch_size)

    if as_json:
        render.emit_json(run().to_dict())
        return
    with render.stderr.status("evaluating..."):
        report = run()
    render.stdout.print(render.eval_table(report))
