"""``quantkit calibrate``: flags -> `CalibrateConfig` -> `pipeline.calibrate`, rendered with rich."""
from __future__ import annotations

import os
from pathlib import Path

import click

from quantkit.cli.choice import Choice


@click.command()
@click.argument("model")
@click.option("--scheme", help="See `quantkit schemes` (default w8a8_dynamic).")
@click.option("--algo", "algorithm", help="Weight algorithm: rtn (default), awq, gptq, hqq, imatrix, signround "
                                             "(docs/algorithms.md).")
@click.option("--algo-option", "algo_options", multiple=True, metavar="KEY=VALUE",
              help="Algorithm option, e.g. act_order=true (GPTQ), samples=32 (AWQ), iterations=40 (HQQ).")
@click.option("--recipe", type=click.Path(path_type=Path), help="YAML recipe: per-layer schemes and algorithms.")
@click.option("--bits", type=click.IntRange(2, 8), help="Override the scheme's weight bits.")
@click.option("--group-size", type=int, help="Override the weight group size (-1: per channel).")
@click.option("--sym/--asym", "symmetric", default=None, help="Override the weight grid's symmetry.")
@click.option("--dataset", default="dummy", show_default=True,
              help="dummy, gsm8k, text (with --data-files), or a .txt/.jsonl/.parquet path.")
@click.option("--data-files", multiple=True, help="Local files for gsm8k/text (offline use).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--num-samples", default=64, show_default=True, type=int)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), help="SmoothQuant migration strength (default 0.5).")
@click.option("--smooth/--no-smooth", default=None,
              help="SmoothQuant before quantizing (default: on when activations are quantized).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default out/<model>-<scheme>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--dry-run", is_flag=True, help="Check every input and print the memory/disk estimate; do no work.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its first unfinished block.")
@click.option("--offload-activations", is_flag=True,
              help="Keep the calibration activations on disk (one batch in memory at a time).")
@click.option("--dtype", default="auto", show_default=True, help="Compute dtype of the calibration passes.")
@click.option("--moe-all-experts/--moe-routed-only", default=True, show_default=True,
              help="MoE: every expert's statistics from every calibration token (the block output keeps the "
                   "true routing), or only from the tokens routed to it.")
@click.option("--expert-batch", default=16, show_default=True, type=int,
              help="MoE: experts whose Hessians (GPTQ) are collected at once; bounds memory.")
@click.option("--imatrix-from", type=Choice(["quantized", "float"]), default="quantized", show_default=True,
              help="The importance statistics recorded for llama.cpp (export --format imatrix): each Linear's input "
                   "as calibration propagates it (earlier blocks quantized), or the float model's own, as "
                   "llama-imatrix measures it (one more forward pass per block; not with smoothing/AWQ).")
@click.option("--propagate", type=Choice(["quantized", "float"]), default="quantized", show_default=True,
              help="Each block's calibration inputs: the outputs of the blocks before it as quantized, or the float "
                   "model's own (AutoRound's --disable_quanted_input): one forward pass per block instead of two, "
                   "and with a one-pass algorithm each block is quantized in a second thread while the next one "
                   "is observed; 10-25% faster, but on coarse grids (int4 g128) later blocks no longer make up for "
                   "earlier blocks' error (measured: +6% perplexity). The importance statistics are then the float "
                   "model's, as llama-imatrix measures them, where no smoothing, AWQ, true-sequential GPTQ or "
                   "all-token MoE statistics change a Linear's input.")
@click.option("--fit-final-norm/--no-fit-final-norm", default=None,
              help="Once every block is quantized, fit the final norm's gain (kept in float by every export) so "
                   "that the quantized model's next-token distributions match the float model's on the calibration "
                   "tokens (about 20 s on SmolLM2; kept only where it lowers the KL). Default: on with "
                   "--algo signround, whose float stream it reads; elsewhere it adds one float forward per block.")
@click.option("--target-bits", type=float, help="Automatic mixed precision: choose each Linear's grid so that the "
              "quantized Linears average at most this many stored bits per weight (codes, scales, zeros).")
@click.option("--target-size", help="Automatic mixed precision under a size for the output's weight files, "
              "embeddings included, e.g. 80MB, 3.2GB, 800MiB.")
@click.option("--candidates", help="Grids the allocation chooses from, comma-separated: intB[-gG|-ch][-sym|-asym] "
              "or weight-only scheme names (default int2..int8 at groups 32/64/128/256 and per channel).")
@click.option("--sensitivity", type=Choice(["block", "layer"]), default="block", show_default=True,
              help="How a grid's harm is measured: the block output error it causes, or the Linear's own output error.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code (off by default).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--quiet", is_flag=True, help="No progress or tables.")
def calibrate(model, scheme, algorithm, algo_options, recipe, bits, group_size, symmetric, dataset, data_files,
              text_column, num_samples, seq_len, batch_size, alpha, smooth, seed, out, overwrite, dry_run, resume,
              offload_activations, dtype, moe_all_experts, expert_batch, imatrix_from, propagate, fit_final_norm,
              target_bits, target_size, candidates, sensitivity, trust_remote_code, as_json, quiet):
    """Calibrate MODEL (a checkpoint directory, hub id or alias such as smollm2-135m) and write a
    quantized model: packed safetensors plus quant_manifest.json."""
    from quantkit import api
    from quantkit.cli import render

    def run(progress=None):
        return api.calibrate(
            model, scheme=scheme, algo=algorithm, algo_options=parse_algo_options(algo_options) or None, recipe=recipe,
            bits=bits, group_size=group_size, sym=symmetric, dataset=dataset, data_files=tuple(data_files),
            text_column=text_column, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, alpha=alpha,
            smooth=smooth, seed=seed, out=out, overwrite=overwrite, dry_run=dry_run, resume=resume,
            offload_activations=offload_activations, dtype=dtype, moe_all_experts=moe_all_experts,
            expert_batch=expert_batch, imatrix_from=imatrix_from, propagate=propagate, fit_final_norm=fit_final_norm,
            target_bits=target_bits, target_size=target_size,
            candidates=candidates, sensitivity=sensitivity, trust_remote_code=trust_remote_code, progress=progress)

    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: only rank 0 reports
        run()
        return
    if quiet or as_json or dry_run:
        result = run()
    else:
        with render.RichProgress() as progress:
            result = run(progress)
            progress.finish()
    if dry_run:
        summary = {"out": str(result.out), "estimate": result.estimate.to_dict()}
        render.emit_json(summary) if as_json else render.stderr.print(f"dry run: nothing written; {result.estimate.describe()}")
        return
    if as_json:
        render.emit_json(render.calibration_json(result))
    elif not quiet:
        render.stderr.print(render.calibration_table(result))
        if render.notes_line(result.manifest):
            render.stderr.print(render.notes_line(result.manifest), markup=False)
        render.stderr.print(f"wrote {result.out}")


def parse_algo_options(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs; values are read as YAML scalars (true, 32, 0.01, text)."""
    import yaml

    from quantkit.errors import QuantkitError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QuantkitError(f"--algo-option expects KEY=VALUE, got '{pair}'")
        options[key.strip()] = yaml.safe_load(value)
    return options
