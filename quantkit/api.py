"""The public Python API: each CLI command as one typed function, with the same checks and errors.

    quantkit.calibrate(model, scheme=..., algo=..., dataset=..., out=...)  -> CalibrationResult
    quantkit.export(directory, format=..., out=...)                        -> the exporter's result
    quantkit.evaluate(target, reference=...)                               -> EvalReport
    quantkit.validate(directory)                                           -> ValidationReport
    quantkit.inspect(path, out=...)                                        -> InspectReport

Bad input raises `QuantkitError` whose text is the line the CLI prints. Progress reaches an optional
callback as `ProgressEvent`s (the CLI passes its rich renderer instead). Nothing here prints.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

EXPORT_FORMATS = ("gguf", "compressed-tensors", "imatrix", "llama2c")


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of `calibrate`.

    kind: "estimate" (``detail`` describes the memory/disk estimate), "stage" (a stage starts; ``total``
    steps follow, or None), "advance" (one step of stage ``name`` is done), "step" (``done`` of ``total``
    steps inside a block, e.g. SignRound's iterations), "block" (decoder block ``done`` is quantized;
    ``layers`` maps each of its Linears to its metrics).
    """

    kind: str
    name: str = ""
    done: int | None = None
    total: int | None = None
    detail: str = ""
    layers: dict[str, dict] | None = None


def _progress_adapter(callback: Callable[[ProgressEvent], None] | None):
    """The pipeline's `Progress` protocol feeding ``callback`` (a `Progress` object passes through)."""
    from quantkit.run.pipeline import Progress

    if callback is None or isinstance(callback, Progress):
        return callback

    class _Callback(Progress):
        def stage(self, name, total=None):
            callback(ProgressEvent("stage", name, total=total))

        def advance(self, name, detail=""):
            callback(ProgressEvent("advance", name, detail=detail))

        def step(self, name, done, total, detail=""):
            callback(ProgressEvent("step", name, done=done, total=total, detail=detail))

        def block_done(self, index, layers):
            callback(ProgressEvent("block", f"block {index}", done=index, layers=layers))

        def estimate(self, estimate):
            callback(ProgressEvent("estimate", "estimate", detail=estimate.describe()))

    return _Callback()


def calibrate(model: Any, tokenizer: Any = None, *, scheme: str | None = None, algo: str | None = None,
              algo_options: dict | None = None, recipe: str | Path | None = None, bits: int | None = None,
              group_size: int | None = None, sym: bool | None = None, dataset: str = "dummy",
              data_files: tuple[str, ...] | list[str] = (), text_column: str = "text", num_samples: int = 64,
              seq_len: int = 512, batch_size: int = 8, alpha: float | None = None, smooth: bool | None = None,
              seed: int = 0, out: str | Path | None = None, overwrite: bool = False, dry_run: bool = False,
              resume: bool = False, offload_activations: bool = False, dtype: str = "auto",
              moe_all_experts: bool = True, expert_batch: int = 16, imatrix_from: str = "quantized",
              propagate: str = "quantized", fit_final_norm: bool | None = None, target_bits: float | None = None,
              target_size: str | None = None,
              candidates: str | None = None,
              sensitivity: str = "block", trust_remote_code: bool = False, keep_model: bool = False,
              save_source: str | Path | None = None,
              progress: Callable[[ProgressEvent], None] | None = None):
    """Calibrate and quantize ``model``; write the native output (packed safetensors + quant_manifest.json)
    to ``out``. Every keyword is the `quantkit calibrate` flag of the same name (``algo`` is --algo, ``sym``
    --sym/--asym, ``algo_options`` the --algo-option pairs).

    model: a checkpoint directory, hub id or alias (``"smollm2-135m"``), streamed block by block as the CLI
    does; or an already loaded ``transformers`` causal LM, which is **written out, not quantized in place**:
    its float weights are saved (with ``tokenizer``, needed for any dataset but ``dummy``) to ``save_source``,
    or to a temporary directory beside ``out`` that is deleted afterwards (then `evaluate`/`validate` need an
    explicit reference), and streamed from there; the model object is left unchanged. ``out`` is required then.
    keep_model: also return the quantized model in memory (``result.model``); else reload it with
    `quantkit.load_quantized(result.out)`. A loaded model runs in one process (not under torchrun) and resumes
    only from a kept ``save_source``.
    Returns `quantkit.run.pipeline.CalibrationResult` (out, manifest, model, timings, peak_rss_bytes, estimate).
    """
    from quantkit.run.pipeline import CalibrateConfig
    from quantkit.run.pipeline import calibrate as run_calibration

    if alpha is not None and smooth is False:
        raise QuantkitError("--alpha and --no-smooth contradict each other; give one")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise QuantkitError(f"--alpha is a migration strength in [0, 1], got {alpha}")
    per_layer = {"--scheme": scheme, "--algo": algo, "--bits": bits, "--group-size": group_size,
                 "--sym/--asym": sym, "--algo-option": algo_options or None}
    given = [flag for flag, value in per_layer.items() if value is not None]
    if recipe is not None and given:
        raise QuantkitError(f"--recipe sets every layer's scheme and algorithm; drop {given[0]} (put it in the recipe)")
    automatic = target_bits is not None or target_size is not None
    config = CalibrateConfig(
        model="", scheme=scheme or ("w4a16" if automatic else "w8a8_dynamic"), algorithm=algo or "rtn",
        recipe=None if recipe is None else Path(recipe), options=dict(algo_options or {}), bits=bits,
        group_size=group_size, symmetric=sym, dataset=dataset, data_files=tuple(data_files),
        text_column=text_column, num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, alpha=alpha,
        smooth=smooth, seed=seed, out=None if out is None else Path(out), overwrite=overwrite, dry_run=dry_run,
        resume=resume, offload_activations=offload_activations, dtype=dtype, trust_remote_code=trust_remote_code,
        moe_all_experts=moe_all_experts, expert_batch=expert_batch, imatrix_from=imatrix_from, propagate=propagate,
        fit_final_norm=fit_final_norm, target_bits=target_bits, target_size=target_size, candidates=candidates,
        sensitivity=sensitivity, keep_model=keep_model,
    )
    progress = _progress_adapter(progress)
    if isinstance(model, (str, os.PathLike)):
        return run_calibration(dataclasses.replace(config, model=str(model)), progress)
    return _calibrate_loaded(model, tokenizer, config, None if save_source is None else Path(save_source), progress)


def _calibrate_loaded(model, tokenizer, config, save_source: Path | None, progress):
    """A loaded model: saved (to ``save_source`` or a temporary directory beside ``config.out``), then
    streamed from there as a checkpoint path is; every check on the output runs before the save."""
    from quantkit.files import check_output_path, writing
    from quantkit.run.distributed import from_environment
    from quantkit.run.pipeline import calibrate as run_calibration

    _check_loaded_model(model, tokenizer, config.dataset, config.out)
    if from_environment().world_size > 1:
        raise QuantkitError("a loaded model is calibrated in one process; under torchrun give its checkpoint path")
    if config.resume and save_source is None:
        raise QuantkitError("resume needs the same source checkpoint as the interrupted run: give save_source=DIR "
                            "(kept), or calibrate the checkpoint path")
    check_output_path(config.out, config.overwrite, [] if save_source is None else [save_source])
    if save_source is not None:
        if not (config.resume and (save_source / "config.json").is_file()):
            _save_loaded(model, tokenizer, save_source)
        return run_calibration(dataclasses.replace(config, model=str(save_source)), progress)
    parent = config.out.absolute().parent
    with writing(parent):
        parent.mkdir(parents=True, exist_ok=True)
        source = tempfile.TemporaryDirectory(prefix=".quantkit-source-", dir=parent)
    with source as directory:
        _save_loaded(model, tokenizer, Path(directory))
        return run_calibration(dataclasses.replace(config, model=directory), progress)


def _check_loaded_model(model, tokenizer, dataset: str, out) -> None:
    from torch import nn

    if not isinstance(model, nn.Module) or not hasattr(model, "save_pretrained"):
        raise QuantkitError(f"model must be a checkpoint path, an alias or a loaded transformers model, "
                            f"got {type(model).__name__}")
    if out is None:
        raise QuantkitError("give out= when calibrating a loaded model (there is no checkpoint name to derive it from)")
    if tokenizer is None and dataset != "dummy":
        raise QuantkitError(f"dataset '{dataset}' is text: pass the model's tokenizer (tokenizer=...)")


def _save_loaded(model, tokenizer, directory: Path) -> None:
    """The loaded model's float weights and config (and tokenizer) as a safetensors checkpoint; a full or
    read-only disk is one line naming the directory."""
    from quantkit.files import writing

    if directory.exists() and any(directory.iterdir()):
        raise QuantkitError(f"save_source {directory} is not empty; the loaded model's checkpoint goes into a new "
                            "or empty directory")
    with writing(directory):
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def export(directory: str | Path, *, format: str, out: str | Path, type: str | None = None,
           imatrix: str | Path | None = None, target_size: str | None = None, candidates: str | None = None,
           dataset: str | None = None, data_files: tuple[str, ...] = (), text_column: str = "text",
           num_samples: int = 64, seq_len: int = 512, algo: str | None = None, algo_options: dict | None = None,
           propagate: str = "quantized", overwrite: bool = False,
           progress: Callable[[ProgressEvent], None] | None = None):
    """`quantkit export`: a quantkit output directory (for GGUF also a float checkpoint) as ``format``:
    "gguf" (llama.cpp), "compressed-tensors" (vLLM), "imatrix" (llama-imatrix's .gguf) or "llama2c"
    (llama2.c's int8 ``runq`` file). ``type``, ``imatrix``, ``target_size`` and ``candidates`` are GGUF's
    options (`quantkit export --help`); with ``target_size``, ``dataset`` (and ``data_files``, ``text_column``,
    ``num_samples``, ``seq_len``, as `calibrate` takes them) measures each block Linear's sensitivity to each
    candidate type on that calibration data (`calibrate --target-bits`'s measure) instead of its weight error,
    reporting the pass to ``progress``. ``algo`` (with ``algo_options``, GGUF of a float checkpoint, needs
    ``dataset``): once the block Linears' types are chosen, a calibration run on ``dataset`` quantizes each on
    its type's grid with that algorithm (`calibrate --recipe`, in a directory beside ``out`` that is removed
    afterwards; ``propagate`` as calibrate's --propagate) and the file holds those codes. Returns the exporter's
    result (``to_dict()`` is the CLI's --json)."""
    directory, out = Path(directory), Path(out)
    if format not in EXPORT_FORMATS:
        import difflib

        close = difflib.get_close_matches(format, EXPORT_FORMATS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {', '.join(EXPORT_FORMATS)}"
        raise QuantkitError(f"unknown export format '{format}'; {hint}")
    if (type is not None or imatrix is not None or target_size is not None) and format != "gguf":
        raise QuantkitError("--type, --imatrix and --target-size apply to --format gguf only")
    if candidates is not None and target_size is None:
        raise QuantkitError("--candidates lists the types --target-size chooses from; give --target-size")
    if (algo is not None or algo_options) and format != "gguf":
        raise QuantkitError("--algo applies to --format gguf of a float checkpoint only")
    if algo_options and algo is None:
        raise QuantkitError("--algo-option sets an option of --algo; give --algo")
    if propagate != "quantized" and algo is None:
        raise QuantkitError("--propagate sets what --algo's calibration feeds each block; give --algo")
    if algo is not None and dataset is None:
        raise QuantkitError(f"--algo {algo} quantizes on calibration data; give --dataset")
    if (dataset is not None or data_files) and target_size is None and algo is None:
        raise QuantkitError("--dataset measures the sensitivities --target-size chooses GGUF types by (or the "
                            "calibration --algo quantizes on); give --target-size or --algo (and --format gguf)")
    if format == "gguf":
        from quantkit.exporters import gguf_budget
        from quantkit.exporters.gguf import export_gguf
        from quantkit.run.budget import parse_size

        types = gguf_budget.parse_candidates(candidates)
        size = None if target_size is None else parse_size(target_size)
        data = _CalibrationData(dataset, tuple(data_files), text_column, num_samples, seq_len, propagate)
        sensitivities = None
        if dataset is not None and target_size is not None:
            def sensitivities(importance):
                return _gguf_sensitivities(directory, types, data, progress, importance)
        with _GGUFCodes(directory, out, algo, algo_options or {}, data, progress) as codes:
            return export_gguf(directory, out, ggml_type=type.upper() if type else None, overwrite=overwrite,
                               imatrix=None if imatrix is None else Path(imatrix), target_size=size,
                               candidates=types, sensitivities=sensitivities, codes=codes.run if algo else None,
                               codes_by=algo or "")
    if format == "compressed-tensors":
        from quantkit.exporters.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(directory, out, overwrite=overwrite)
    if format == "imatrix":
        from quantkit.exporters.gguf_imatrix import export_imatrix

        return export_imatrix(directory, out, overwrite=overwrite)
    from quantkit.exporters.llama2c import export_llama2c

    return export_llama2c(directory, out, overwrite=overwrite)


@dataclass(frozen=True)
class _CalibrationData:
    """The calibration flags export shares with calibrate."""

    dataset: str | None
    data_files: tuple[str, ...]
    text_column: str
    num_samples: int
    seq_len: int
    propagate: str = "quantized"

    def config(self, directory: Path, **settings):
        from quantkit.run.pipeline import CalibrateConfig

        return CalibrateConfig(model=str(directory), dataset=self.dataset, data_files=self.data_files,
                               text_column=self.text_column, num_samples=self.num_samples, seq_len=self.seq_len,
                               propagate=self.propagate, **settings)


class _GGUFCodes:
    """export --algo: calibrates a float checkpoint on the GGUF types the exporter chose, one recipe rule per
    type, into a directory created beside the output (on the same disk the file goes to) and removed on exit."""

    def __init__(self, directory: Path, out: Path, algo: str | None, options: dict, data: _CalibrationData,
                 progress):
        self.directory, self.out, self.algo, self.options = directory, out, algo, options
        self.data, self.progress = data, progress
        self.workdir: Path | None = None

    def __enter__(self):
        if self.algo is not None:
            from quantkit.algorithms.registry import check_options, get_algorithm

            get_algorithm(self.algo)                   # bad names and options stop before any work
            check_options(self.algo, self.options)
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self, types: dict[str, str]) -> Path:
        import yaml

        from quantkit.run.mixes import ggml_type_algorithm
        from quantkit.run.pipeline import calibrate as run_calibration

        self.workdir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.codes-", dir=self.out.parent))
        rules = []
        for ggml_type in sorted(set(types.values())):    # each type's grid run as a llama.cpp file type runs it
            algorithm, options, _ = ggml_type_algorithm(self.algo, self.options, ggml_type)
            rules.append({"match": sorted(name for name, t in types.items() if t == ggml_type),
                          "scheme": ggml_type.lower(), "algorithm": algorithm,
                          **({"options": dict(options)} if options else {})})
        recipe = self.workdir / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"rules": rules, "smooth": False}, sort_keys=False))
        # The directory goes away with the export: no block needs to leave the state --resume restarts from, and
        # the per-tensor table reports the file's own weight SQNR, so no output-SQNR figures are measured (with
        # --propagate float that pass was an eighth of the calibration's work on SmolLM2).
        config = self.data.config(self.directory, recipe=recipe, out=self.workdir / "codes", resumable=False,
                                  metric_samples=0)
        return run_calibration(config, _progress_adapter(self.progress)).out


def _gguf_sensitivities(directory: Path, types: tuple[str, ...], data: _CalibrationData, progress, importance
                        ) -> dict[str, dict[str, float]]:
    """Block Linear -> GGUF type -> its block sensitivity (`run.allocate`), each type's weights as the file will
    hold them: llama.cpp's reference search, or, for the Linears ``importance`` names (the --imatrix vectors the
    exporter searches them with), its importance-weighted search with that vector."""
    from quantkit.run.pipeline import measure_sensitivities

    config = data.config(directory, scheme="w4a16", algorithm="rtn", target_bits=32.0,
                         candidates=",".join(t.lower() for t in types))
    layers = measure_sensitivities(config, _progress_adapter(progress), importance)
    return {name: dict(zip(types, layer.loss(config.sensitivity))) for name, layer in layers.items()}


def evaluate(target: str | Path, *, reference: str | Path | None = None, compare_reference: bool = True,
             text: str | Path | None = None, dataset: str | None = None, data_files: tuple[str, ...] = (),
             text_column: str = "text", seq_len: int = 512, max_windows: int | None = 16, batch_size: int = 2):
    """`quantkit eval`: perplexity of ``target`` (a quantkit output or any model) over non-overlapping
    windows of ``text`` (default: the bundled English text) or ``dataset``; with a reference (default: the
    manifest's source) also KL and top-1 agreement. Returns `quantkit.check.evaluate.EvalReport`."""
    from quantkit.check.evaluate import EvalConfig, run_eval

    if text is not None and dataset is not None:
        raise QuantkitError("give --text or --dataset, not both")
    return run_eval(EvalConfig(
        target=str(target), reference=None if reference is None else str(reference),
        compare_reference=compare_reference, text=None if text is None else Path(text), dataset=dataset,
        data_files=tuple(data_files), text_column=text_column, seq_len=seq_len, max_windows=max_windows,
        batch_size=batch_size))


def validate(directory: str | Path, *, backend: str = "auto", device: str = "auto", dtype: str = "auto",
             num_samples: int | None = None, seq_len: int | None = None, sqnr_margin: float = 10.0,
             raise_on_failure: bool = True, on_stage: Callable[[str], None] | None = None):
    """`quantkit validate`: every quantized layer through the kernels on regenerated calibration activations,
    against the pure-torch reference and the float source; writes validation.json and the manifest summary.
    Returns `quantkit.check.validate.ValidationReport`; a failed check raises `QuantkitError` (the CLI's line)
    unless ``raise_on_failure`` is False."""
    if backend == "interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the switch once, when first imported: it cannot be set from here
        raise QuantkitError("backend 'interpreter' needs TRITON_INTERPRET=1 in the environment before Triton is "
                            "imported (the CLI sets it for you)")
    from quantkit.check.validate import ValidateConfig
    from quantkit.check.validate import validate as run_validation

    report = run_validation(ValidateConfig(path=Path(directory), backend=backend, device=device, dtype=dtype,
                                           num_samples=num_samples, seq_len=seq_len, sqnr_margin_db=sqnr_margin),
                            on_stage=on_stage)
    if raise_on_failure and not report.passed:
        raise validation_error(report, directory)
    return report


def validation_error(report, directory: str | Path) -> QuantkitError:
    """The one line a failed validation reports."""
    from quantkit.check.validate import REPORT_NAME

    failures = report.failures
    more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
    return QuantkitError(f"validation failed: {failures[0]}{more}; report in {Path(directory) / REPORT_NAME}")


def inspect(path: str | Path, *, out: str | Path | None = None, overwrite: bool = False):
    """`quantkit inspect`: per-layer weight, activation and error statistics of a checkpoint or a quantkit
    output, as an `InspectReport` and, with ``out``, a self-contained HTML report (figures as embedded PNG)."""
    from quantkit.check.inspect import check_report_output, inspect_model, write_html

    if out is not None:
        check_report_output(Path(out), overwrite, Path(path))
    report = inspect_model(Path(path))
    if out is not None:
        write_html(report, Path(out), overwrite=overwrite)
    return report
