"""Issue 14 benchmark: K-quant files from calibration against llama.cpp's own (with and without its
importance matrix), every file measured by llama.cpp itself on SmolLM2-135M.

    python benchmarks/bench_kquant_calibration.py --llama-cpp-bin DIR [--types Q4_K_M,Q3_K_M,Q2_K] [--windows 8]
        [--autoround-python /work/peers-venv/bin/python --autoround-iters 50]
        [--algorithms imatrix,gptq,gptq:true_sequential=false,signround:imatrix:50] [--no-round-trip]
        [--time-pairs N] [--time-pairs-only]

DIR holds llama.cpp's ``llama-imatrix`` and ``llama-quantize`` (the cmake build of the llama.cpp source that
llama-cpp-python vendors); llama-cpp-python computes the logits. Rows per file type T, all on the same float
model and the same calibration tokens (the first half of the bundled Alice as one document, so that
llama-imatrix's 512-token chunks and quantkit's 32 x 512 samples are the same token windows):
  llama.cpp T             llama-quantize of our F16 export, no importance matrix
  llama.cpp T + imatrix   llama-imatrix on the calibration text (-c 512 --chunks 32), then llama-quantize --imatrix
  quantkit imatrix (b)    quantkit calibrate --scheme gguf:T --algo imatrix (llama.cpp's weighted search on our
                          statistics), then quantkit export --format gguf
  quantkit gptq (c)       quantkit calibrate --scheme gguf:T --algo gptq (that grid, codes by GPTQ), then export
  quantkit signround ...  with --algorithms signround:INIT:ITERS: the initial algorithm's K grid, codes learned
                          block by block (issue 16's SignRound), then export
  AutoRound T             auto-round's own gguf export (signround, --autoround-iters steps per block of
                          --autoround-batch samples) for --autoround-types, when --autoround-python names a
                          Python with auto-round installed (its defaults, 200 steps of 8, take hours on 2 cores)
and, for the first type, the round trip through llama.cpp's tools: quantkit's imatrix, recorded with
--imatrix-from float (the float model's statistics, what llama-imatrix measures) and with the default
(the quantized propagation's), compared tensor by tensor with llama-imatrix's and fed to llama-quantize
--imatrix, whose files are compared with the one it makes from llama-imatrix's. Reported: llama.cpp's perplexity, top-1 agreement and KL against the float model
(transformers fp32) on held-out windows, the file size, and the wall time of each route. With --time-pairs N,
N alternating timings of llama-imatrix + llama-quantize and the first export: route follow (the time goal);
--time-pairs-only runs just those (the files' quality rows are skipped).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import common
from bench_llama_cpp import perplexity, torch_logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-cpp-bin", type=Path, required=True)
    parser.add_argument("--types", default="Q4_K_M,Q3_K_M,Q2_K")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--autoround-python")
    parser.add_argument("--autoround-iters", type=int, default=50)
    parser.add_argument("--autoround-batch", type=int, default=4)
    parser.add_argument("--autoround-types", default="Q4_K_M")
    parser.add_argument("--algorithms", default="imatrix,gptq",
                        help="quantkit rows: comma-separated ALGO, ALGO:KEY=VALUE[:KEY=VALUE] (its --algo-option's) or "
                             "signround:INIT:ITERS (e.g. signround:imatrix:50): calibrate then export; prefixed "
                             "export: (export:gptq) the one command quantkit export FLOAT --type T --algo ...; a "
                             "part --FLAG=VALUE is a flag of the quantkit command (gptq:--propagate=float)")
    parser.add_argument("--no-round-trip", action="store_true", help="skip the imatrix round trip rows")
    parser.add_argument("--time-pairs-only", action="store_true",
                        help="only the --time-pairs timings (the F16 file and the calibration text are still made)")
    parser.add_argument("--time-pairs", type=int, default=0,
                        help="then N alternating timings of llama-imatrix + llama-quantize and the first export: "
                             "route (the first type), each pair back to back, and their ratios")
    args = parser.parse_args()
    common.in_workdir(args.workdir, "bench-kquant-cal-", lambda d: run(d, args))


def _timed(command: list[str]) -> float:
    return common.run_tool(command)[1]


def _llama_imatrix(binaries: Path, f16: Path, calibration: Path, out: Path) -> float:
    """llama-imatrix on the calibration windows (-c 512 --chunks 32, 2 threads): its seconds."""
    return _timed([str(binaries / "llama-imatrix"), "-m", str(f16), "-f", str(calibration), "-o", str(out), "-c", "512",
                   "--chunks", "32", "-t", "2", "--no-ppl"])


def _llama_quantize(binaries: Path, f16: Path, out: Path, file_type: str, imatrix: Path | None = None) -> float:
    """llama-quantize F16 -> file_type (with --imatrix when given, 2 threads): its seconds."""
    return _timed([str(binaries / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else []), str(f16),
                   str(out), file_type, "2"])


def _quantkit_export(directory: Path, out: Path, *flags: str) -> float:
    return _timed([sys.executable, "-m", "quantkit", "export", str(directory), "--out", str(out), "--overwrite",
                   "--quiet", *flags])


def run(workdir: Path, args) -> None:
    from quantkit.exporters.gguf import export_gguf

    binaries = args.llama_cpp_bin
    source = common.demo_model()
    halves, windows, protocol = common.alice_split(workdir, source, args.windows, 32, 512)
    calibration = workdir / "alice_first_half_one_document.txt"      # no blank line: one document
    calibration.write_text(common.one_document(halves.read_text()))
    f16 = workdir / "f16.gguf"
    export_gguf(source, f16, ggml_type="F16", overwrite=True)
    data = ["--dataset", str(calibration), "--num-samples", "32", "--seq-len", "512"]
    if args.time_pairs_only:
        time_pairs(args, workdir, f16, calibration, source, data)
        return
    float_logits = torch_logits(common.float_model(), windows)
    rows = []

    def measure(label: str, path: Path, seconds: float | None, note: str = "") -> None:
        logits = common.llama_cpp_logits(path, windows)
        top1, kl = common.next_token_agreement(float_logits, logits)
        rows.append((label, perplexity(logits, windows), top1, kl, path.stat().st_size, seconds, note))
        print(rows[-1], flush=True)

    measure("F16", f16, None)
    lc_imatrix = workdir / "llama.imatrix.gguf"
    imatrix_seconds = _llama_imatrix(binaries, f16, calibration, lc_imatrix)
    for index, file_type in enumerate(args.types.split(",")):
        plain = workdir / f"llama-{file_type}.gguf"
        seconds = _llama_quantize(binaries, f16, plain, file_type)
        measure(f"llama.cpp {file_type}", plain, seconds)
        weighted = workdir / f"llama-imatrix-{file_type}.gguf"
        seconds = _llama_quantize(binaries, f16, weighted, file_type, lc_imatrix)
        measure(f"llama.cpp {file_type} + imatrix", weighted, imatrix_seconds + seconds,
                f"llama-imatrix {imatrix_seconds:.0f} s + llama-quantize {seconds:.0f} s")
        for algorithm in args.algorithms.split(","):
            label, flags = _algorithm_flags(algorithm.removeprefix("export:"))
            if algorithm.startswith("export:"):         # one command: quantkit export FLOAT --type T --algo ...
                gguf = workdir / f"qk-export-{label.replace(' ', '-')}-{file_type}.gguf"
                seconds = _timed([sys.executable, "-m", "quantkit", "export", str(source), "--format", "gguf",
                                  "--type", file_type, *flags, *data, "--out", str(gguf), "--overwrite", "--quiet"])
                measure(f"quantkit {label} {file_type}, one command", gguf, seconds, "quantkit export --algo")
                continue
            directory = workdir / f"qk-{label.replace(' ', '-')}-{file_type}"
            summary = common.run_quantkit(directory, "--scheme", f"gguf:{file_type.lower()}", *flags, *data)
            gguf = workdir / f"qk-{label.replace(' ', '-')}-{file_type}.gguf"
            export_seconds = _quantkit_export(directory, gguf, "--format", "gguf")
            measure(f"quantkit {label} {file_type}", gguf, summary["wall_s"] + export_seconds,
                    f"calibrate {summary['wall_s']:.0f} s + export {export_seconds:.0f} s")
        if args.autoround_python and file_type in args.autoround_types.split(","):
            autoround_row(args, workdir, source, calibration, file_type, measure)
        if index == 0 and not args.no_round_trip:
            round_trip(workdir, binaries, f16, lc_imatrix, weighted, file_type, data, measure)
    if args.time_pairs:
        time_pairs(args, workdir, f16, calibration, source, data)
    print(f"SmolLM2-135M; {protocol}; float (transformers) ppl {perplexity(float_logits, windows):.3f}")
    print("| file | llama.cpp ppl | top-1 vs float | KL vs float | MiB | wall s | note |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, ppl, top1, kl, size, seconds, note in rows:
        print(f"| {label} | {ppl:.3f} | {top1:.2%} | {kl:.4f} | {size / 2**20:.1f} | "
              f"{'' if seconds is None else f'{seconds:.0f}'} | {note} |")


def time_pairs(args, workdir: Path, f16: Path, calibration: Path, source: Path, data: list[str]) -> None:
    """The time goal's check: llama-imatrix + llama-quantize --imatrix against the one command quantkit export
    FLOAT --algo ... (the first export: route), on the same calibration windows, alternating so that both see
    the VM in the same state; prints every pair and the ratios quantkit / llama.cpp."""
    routes = [a.removeprefix("export:") for a in args.algorithms.split(",") if a.startswith("export:")]
    if not routes:
        raise SystemExit("--time-pairs times the first export: route of --algorithms; give one")
    label, flags = _algorithm_flags(routes[0])
    file_type, binaries = args.types.split(",")[0], args.llama_cpp_bin
    ratios = []
    for pair in range(args.time_pairs):
        llama = _llama_imatrix(binaries, f16, calibration, workdir / "pair.imatrix.gguf")
        llama += _llama_quantize(binaries, f16, workdir / "pair-llama.gguf", file_type, workdir / "pair.imatrix.gguf")
        ours = _timed([sys.executable, "-m", "quantkit", "export", str(source), "--format", "gguf", "--type", file_type,
                       *flags, *data, "--out", str(workdir / "pair-quantkit.gguf"), "--overwrite", "--quiet"])
        ratios.append(ours / llama)
        print(f"time pair {pair + 1}: llama.cpp {llama:.1f} s, quantkit {label} {ours:.1f} s, ratio {ratios[-1]:.3f}",
              flush=True)
    ratios.sort()
    print(f"time pairs ({file_type}, quantkit {label} / llama.cpp): min {ratios[0]:.3f}, "
          f"median {ratios[len(ratios) // 2]:.3f}, max {ratios[-1]:.3f}")


def _algorithm_flags(algorithm: str) -> tuple[str, list[str]]:
    """'gptq' -> ('gptq', --algo gptq); 'signround:INIT:ITERS' -> ('signround INIT ITERS', its options);
    'ALGO:KEY=VALUE[:KEY=VALUE...]' -> ('ALGO KEY=VALUE ...', --algo ALGO and those --algo-option's); a part
    '--FLAG=VALUE' is passed on as the flag (labelled FLAG=VALUE)."""
    name, *rest = algorithm.split(":")
    flags = [part for part in rest if part.startswith("--")]
    rest = [part for part in rest if not part.startswith("--")]
    if name == "signround" and len(rest) == 2 and "=" not in "".join(rest):
        rest = [f"init={rest[0]}", f"iters={rest[1]}"]
    label = " ".join([name, *(part.split("=", 1)[1] if name == "signround" else part for part in rest),
                      *(flag.removeprefix("--") for flag in flags)])
    return label, ["--algo", name, *(flag for part in rest for flag in ("--algo-option", part)),
                   *(piece for flag in flags for piece in flag.split("=", 1))]


def round_trip(workdir, binaries, f16, lc_imatrix, lc_file, file_type, data, measure) -> None:
    """quantkit's imatrix (float statistics, and the default quantized propagation's) against llama-imatrix's,
    and llama-quantize --imatrix fed each."""
    for source_kind in ("float", "quantized"):
        directory = workdir / f"qk-imatrix-from-{source_kind}"
        common.run_quantkit(directory, "--scheme", f"gguf:{file_type.lower()}", "--algo", "imatrix", "--imatrix-from",
                            source_kind, "--dtype", "float32", *data)
        ours = workdir / f"quantkit-{source_kind}.imatrix.gguf"
        _quantkit_export(directory, ours, "--format", "imatrix")
        print(f"imatrix from {source_kind} vs llama-imatrix:", imatrix_agreement(lc_imatrix, ours), flush=True)
        fed = workdir / f"llama-qk-{source_kind}-imatrix-{file_type}.gguf"
        _llama_quantize(binaries, f16, fed, file_type, ours)
        measure(f"llama.cpp {file_type} + quantkit's imatrix ({source_kind})", fed, None,
                f"llama-quantize --imatrix quantkit export --format imatrix; {same_tensors(fed, lc_file)} "
                "tensors byte-identical to llama.cpp's imatrix file")


def imatrix_agreement(theirs_path: Path, ours_path: Path) -> str:
    """Per tensor, the largest relative difference of the importance (sum / count) between llama-imatrix's
    file and ours: the median and the worst tensor, the worst of block 0, and whether the counts agree."""
    import statistics

    from quantkit.exporters.gguf_imatrix import read_imatrix

    theirs, ours = read_imatrix(theirs_path), read_imatrix(ours_path)
    worst = {}
    for name in ours.sums:
        a, b = ours.importance(name), theirs.importance(name)
        if b is not None:
            worst[name] = float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())
    counts = all(float(ours.counts[n][0]) == float(theirs.counts[n][0]) for n in worst)
    block0 = max(v for n, v in worst.items() if n.startswith("blk.0."))
    name = max(worst, key=worst.get)
    return (f"{len(worst)} tensors; max relative difference per tensor: median {statistics.median(worst.values()):.2e}, "
            f"block 0 worst {block0:.2e}, worst {worst[name]:.2e} ({name}); token counts equal: {counts}")


def same_tensors(a: Path, b: Path) -> str:
    return "{}/{}".format(*common.identical_tensors(a, b))


def autoround_row(args, workdir, source, calibration, file_type, measure) -> None:
    """AutoRound's gguf export on the same calibration token ids (its learned rounding, then its own packing)."""
    import json

    from safetensors.torch import save_file

    from quantkit.calibrate.datasets import DatasetSpec, calibration_tokens
    from quantkit.model.checkpoint import Checkpoint

    tokenizer = Checkpoint(source).tokenizer()
    ids = calibration_tokens(DatasetSpec(str(calibration)), tokenizer, len(tokenizer), 32, 512, seed=0)
    save_file({"ids": ids.contiguous()}, str(workdir / "calibration_ids.safetensors"))
    out = workdir / f"autoround-{file_type}"
    script = str(Path(__file__).parent / "peers" / "run_autoround_gguf.py")
    done = subprocess.run([args.autoround_python, script, str(source), str(workdir / "calibration_ids.safetensors"),
                           str(out), f"gguf:{file_type.lower()}", str(args.autoround_iters), str(args.autoround_batch)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"AutoRound {file_type} failed: {done.stderr.strip()[-800:]}", flush=True)
        return
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["gguf"]:
        print(f"AutoRound {file_type} wrote no .gguf file", flush=True)
        return
    measure(f"AutoRound {file_type} (iters {args.autoround_iters}, batch {args.autoround_batch})", Path(report["gguf"][0]),
            report["seconds"],
            f"auto-round {report['format']}")


if __name__ == "__main__":
    main()
