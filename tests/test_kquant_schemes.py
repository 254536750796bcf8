"""K-quant grids as calibration schemes: q2_k ... q6_k, llama.cpp's file types as plans (q4_k_m, gguf:q2_k),
the three searches (rtn = llama.cpp's reference, imatrix = llama.cpp's weighted search on our statistics,
gptq = that grid with GPTQ's error feedback), codes carried exactly into GGUF, and the importance matrix
exported in llama-imatrix's format."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_checkpoint, run_cli
from gguf import GGUFReader
from gguf.quants import dequantize

from quantkit.algorithms.gptq import gptq_quantize
from quantkit.algorithms.imatrix import quantize_imatrix
from quantkit.algorithms.rtn import quantize_rtn
from quantkit.errors import QuantkitError
from quantkit.exporters.gguf import export_gguf, rotary_row_permutation
from quantkit.exporters.gguf_imatrix import read_imatrix
from quantkit.formats import kquants
from quantkit.formats.quant_tensor import QuantTensor
from quantkit.formats.schemes import SCHEMES, WeightSpec
from quantkit.native.loader import load_quantized
from quantkit.native.manifest import Manifest
from quantkit.run.pipeline import CalibrateConfig, calibrate

K_SCHEMES = [name.lower() for name in kquants.K_FORMATS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float16 llama with rows of 256 and 512 (every K type fits), 8 layers, 4 query heads per kv head."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    directory = tmp_path_factory.mktemp("kqs") / "model"
    make_checkpoint(directory, "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=1, num_hidden_layers=8, dtype=torch.float16)
    save_byte_level_bpe(directory)
    return directory


def _calibrate(source, out, scheme, algorithm, **extra):
    return calibrate(CalibrateConfig(model=str(source), scheme=scheme, algorithm=algorithm, dataset="dummy",
                                     num_samples=8, seq_len=64, out=str(out), **extra))


def _file_weights(path):
    return {t.name: t for t in GGUFReader(path).tensors}


def _assert_file_holds_the_codes(out_dir, gguf_path, result):
    """Every carried tensor of the file, dequantized by gguf-py, equals load_quantized's weight exactly."""
    model = load_quantized(out_dir, dtype=torch.float32)
    tensors = _file_weights(gguf_path)
    checked = 0
    for record in result.linears:
        if record.status != "exact":
            continue
        tensor = tensors[record.name]
        values = torch.from_numpy(dequantize(np.asarray(tensor.data), tensor.tensor_type).copy()).reshape(record.shape)
        weight = model.get_submodule(record.source).dequantized_weight()
        if record.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = model.config.num_attention_heads if "attn_q" in record.name else model.config.num_key_value_heads
            weight = weight[rotary_row_permutation(weight.shape[0], heads)]
        assert torch.equal(values.float(), weight), record.name
        checked += 1
    return checked


@pytest.mark.parametrize("scheme", K_SCHEMES)
def test_k_scheme_codes_carry_into_gguf_exactly(scheme, tiny, tmp_path):
    _calibrate(tiny, tmp_path / "q", scheme, "gptq")
    manifest = Manifest.load(tmp_path / "q")
    assert {entry.scheme.name for entry in manifest.layers.values()} == {scheme}
    result = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    assert {(r.ggml_type, r.status) for r in result.linears if r.source != "lm_head"} == {(scheme.upper(), "exact")}
    assert _assert_file_holds_the_codes(tmp_path / "q", result.out, result) == 56


def test_rtn_file_type_is_llama_quantizes_file(tiny, tmp_path):
    """--algo rtn is llama.cpp's reference search: the calibrated Q4_K_M file equals the float checkpoint's
    export under Q4_K_M byte for byte (which tests/test_kquants.py checks against llama-quantize itself)."""
    _calibrate(tiny, tmp_path / "q", "q4_k_m", "rtn")
    assert Manifest.load(tmp_path / "q").gguf_file_type == "Q4_K_M"
    ours = export_gguf(tmp_path / "q", tmp_path / "calibrated.gguf")        # the manifest's file type by default
    plain = export_gguf(tiny, tmp_path / "plain.gguf", ggml_type="Q4_K_M")
    assert ours.file_type == plain.file_type == "MOSTLY_Q4_K_M"
    theirs, mine = _file_weights(plain.out), _file_weights(ours.out)
    assert set(theirs) == set(mine)
    for name, tensor in theirs.items():
        assert mine[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(tensor.data)), name


def test_file_type_plan_follows_llama_quantize(tiny, tmp_path):
    """q4_k_m: attn_v and ffn_down get Q6_K on use_more_bits layers (0, 3, 6, 7 of 8), the rest Q4_K."""
    _calibrate(tiny, tmp_path / "q", "gguf:q4_k_m", "gptq")
    layers = Manifest.load(tmp_path / "q").layers
    more = {0, 3, 6, 7}
    for i in range(8):
        for linear in ("self_attn.v_proj", "mlp.down_proj"):
            assert layers[f"model.layers.{i}.{linear}"].scheme.name == ("q6_k" if i in more else "q4_k"), (i, linear)
        assert layers[f"model.layers.{i}.self_attn.q_proj"].scheme.name == "q4_k"
    result = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    carried = [r for r in result.linears if r.status == "exact"]
    assert len(carried) == 56 and _assert_file_holds_the_codes(tmp_path / "q", result.out, result) == 56


def test_rows_that_fit_no_super_block_fall_back_as_llama_cpp(tmp_path):
    """A 288-wide model: q4_k on 288-wide rows becomes Q5_0 (int5 sym g32), as llama-quantize does, and its codes
    carry into the Q5_0 blocks; down_proj's 512-wide rows keep Q4_K."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB, hidden_size=288, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    save_byte_level_bpe(source)
    _calibrate(source, tmp_path / "q", "q4_k", "gptq")
    layers = Manifest.load(tmp_path / "q").layers
    assert layers["model.layers.0.self_attn.q_proj"].scheme.name == "q5_0"
    assert "rows of 288 are not a multiple of 256: Q5_0" in layers["model.layers.0.self_attn.q_proj"].rule
    assert layers["model.layers.0.mlp.down_proj"].scheme.name == "q4_k"     # 512-wide rows
    result = export_gguf(tmp_path / "q", tmp_path / "q.gguf", ggml_type="F16")
    assert {(r.ggml_type, r.status) for r in result.linears if r.source.startswith("model.layers")} == \
        {("Q5_0", "exact"), ("Q4_K", "exact")}


def test_file_types_on_fallback_rows_reproduce_llama_quantize(tmp_path):
    """A 288-wide model under Q4_K_M: the 288-wide tensors fall back to Q5_0 (Q8_0 for attn_v's Q6_K). --algo rtn rounds those with
    llama.cpp's Q5_0 reference and --algo imatrix with its weighted Q5_0 search, so both calibrated files
    equal the float checkpoint's export (with our imatrix file for the second) byte for byte."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB, hidden_size=288, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, dtype=torch.float16)
    save_byte_level_bpe(source)
    for algorithm in ("rtn", "imatrix"):
        _calibrate(source, tmp_path / algorithm, "q4_k_m", algorithm)
        rules = {e.scheme.name: e.rule for e in Manifest.load(tmp_path / algorithm).layers.values()}
        assert set(rules) == {"q5_0", "q8_0", "q4_k", "q6_k"}, rules    # attn_v: Q6_K, on 288 wide Q8_0
        calibrated = export_gguf(tmp_path / algorithm, tmp_path / f"{algorithm}.gguf")
        extra = {}
        if algorithm == "imatrix":
            assert run_cli("export", tmp_path / algorithm, "--format", "imatrix", "--out", tmp_path / "m.imatrix.gguf"
                           ).exit_code == 0
            extra = {"imatrix": tmp_path / "m.imatrix.gguf"}
        plain = export_gguf(source, tmp_path / f"plain-{algorithm}.gguf", ggml_type="Q4_K_M", **extra)
        assert {r.status for r in calibrated.linears if r.source != "lm_head"} == {"exact"}
        theirs, mine = _file_weights(plain.out), _file_weights(calibrated.out)
        for name, tensor in theirs.items():
            assert mine[name].tensor_type == tensor.tensor_type, name
            assert np.array_equal(np.asarray(mine[name].data), np.asarray(tensor.data)), (algorithm, name)


def _correlated_layer(seed=0, n_in=512, n_out=128, tokens=2048):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=generator) * 0.1 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=generator) @ mix * (torch.rand(n_in, generator=generator) * 3)
    w = torch.randn(n_out, n_in, generator=generator) * 0.05
    return x, w


@pytest.mark.parametrize("scheme", K_SCHEMES)
def test_gptq_beats_imatrix_beats_reference_on_k_grids(scheme):
    """The output error ||X (W_q - W)^T||^2 on correlated inputs: llama.cpp's weighted search beats its
    reference search, and GPTQ on the weighted search's grid beats both (measured: about half the
    weighted search's error at every type)."""
    x, w = _correlated_layer()
    spec = SCHEMES[scheme].weight

    def loss(quant: QuantTensor) -> float:
        return float(((x @ (quant.dequantize() - w).t()) ** 2).mean())

    reference = loss(quantize_rtn(w, spec))
    weighted = loss(quantize_imatrix(w, spec, (x * x).mean(0)))
    gptq, _ = gptq_quantize(w, 2 * x.t() @ x / x.shape[0], spec)
    assert loss(gptq) < 0.8 * weighted < 0.8 * reference, (loss(gptq), weighted, reference)
    # the GPTQ codes sit on the weighted search's grid: same super-block and sub-block scales
    searched = quantize_imatrix(w, spec, torch.diag(2 * x.t() @ x / x.shape[0]) / 2)
    assert torch.equal(gptq.scale, searched.scale) and torch.equal(gptq.super_scale, searched.super_scale)


def test_imatrix_export_round_trips_and_drives_the_same_search(tiny, tmp_path):
    """calibrate --algo imatrix records Σx² and token counts per Linear; export --format imatrix writes them
    under the GGUF names; exporting the float checkpoint with that file (llama-quantize --imatrix's search)
    gives the calibrated file byte for byte (no weight changed before the search: weight-only, no smoothing)."""
    _calibrate(tiny, tmp_path / "q", "q4_k_m", "imatrix")
    run = run_cli("export", tmp_path / "q", "--format", "imatrix", "--out", tmp_path / "ours.imatrix.gguf")
    assert run.exit_code == 0, run.output
    matrix = read_imatrix(tmp_path / "ours.imatrix.gguf")
    assert len(matrix.sums) == 56 and matrix.chunk_count == 8 and matrix.chunk_size == 64
    assert float(matrix.counts["blk.0.attn_q.weight"][0]) == 8 * 64
    # block 0's q/k/v see the float model's normed embeddings: an independent reference from transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    captured = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: captured.append(a[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    inputs = torch.cat(captured).reshape(-1, 256).double()
    # calibration ran the float16 checkpoint's forward in its compute dtype, the reference in float32
    assert torch.allclose(matrix.sums["blk.0.attn_q.weight"][0].double(), (inputs * inputs).sum(0), rtol=1e-2)
    calibrated = export_gguf(tmp_path / "q", tmp_path / "calibrated.gguf")
    with_file = export_gguf(tiny, tmp_path / "with_file.gguf", ggml_type="Q4_K_M", imatrix=tmp_path / "ours.imatrix.gguf")
    theirs, mine = _file_weights(with_file.out), _file_weights(calibrated.out)
    for name, tensor in theirs.items():
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(tensor.data)), name


def _exported_imatrix(tmp_path, directory):
    out = tmp_path / f"{directory}.imatrix.gguf"
    assert run_cli("export", tmp_path / directory, "--format", "imatrix", "--out", out).exit_code == 0
    return out


def _float_input_sum_squares(source):
    """GGUF name -> Σx² of each block Linear's input in transformers' float32 forward of ``source`` on the
    calibration's dummy tokens (8 x 64, seed 0), with hooks: what llama-imatrix measures."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    sums = {}
    hooks = [module.register_forward_hook(lambda m, a, o, name=name: sums.__setitem__(
                 name, sums.get(name, 0) + (a[0].double() ** 2).reshape(-1, a[0].shape[-1]).sum(0)))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    gguf_of = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    return {f"blk.{name.split('.')[2]}.{gguf_of[name.rsplit('.', 1)[1]]}.weight": value for name, value in sums.items()}


def test_imatrix_from_float_is_the_float_models_statistics(tmp_path):
    """--imatrix-from float: every Linear's recorded Σx² is that of the float model's own activations
    (transformers' float32 forward with hooks, every block), not of the quantized propagation."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    save_byte_level_bpe(source)
    _calibrate(source, tmp_path / "float", "gguf:q2_k", "gptq", imatrix_from="float", dtype="float32")
    _calibrate(source, tmp_path / "quantized", "gguf:q2_k", "gptq", dtype="float32")
    for directory in ("float", "quantized"):
        assert run_cli("export", tmp_path / directory, "--format", "imatrix", "--out",
                       tmp_path / f"{directory}.imatrix.gguf").exit_code == 0
    ours, propagated = read_imatrix(tmp_path / "float.imatrix.gguf"), read_imatrix(tmp_path / "quantized.imatrix.gguf")
    for gguf_name, reference in _float_input_sum_squares(source).items():
        assert torch.allclose(ours.sums[gguf_name][0].double(), reference, rtol=1e-4), gguf_name
        assert float(ours.counts[gguf_name][0]) == 8 * 64
    # the quantized propagation differs from block 1 on (block 0's inputs are the same embeddings)
    assert torch.allclose(propagated.sums["blk.0.attn_q.weight"], ours.sums["blk.0.attn_q.weight"], rtol=1e-5)
    assert not torch.allclose(propagated.sums["blk.2.attn_q.weight"], ours.sums["blk.2.attn_q.weight"], rtol=1e-3)


def test_propagate_float_calibrates_every_block_on_the_float_models_inputs(tmp_path):
    """--propagate float: each block is calibrated on the float model's own block inputs (one forward pass per
    block): every Linear's recorded Σx² is the float model's (transformers' float32 forward with hooks), the
    manifest says so, block 0 (the same embeddings either way) gets the default run's codes bit for bit and
    later blocks do not; the run keeps one stream of activations, also with a refinement that learns against
    the float outputs (SignRound)."""
    from test_export_gguf import VOCAB, save_byte_level_bpe

    source = make_checkpoint(tmp_path / "m", "llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    save_byte_level_bpe(source)
    one_pass = {"true_sequential": False}      # true-sequential GPTQ re-observes Linears after quantizing others
    threads = torch.get_num_threads()
    try:    # one thread for both: the float run would otherwise quantize in its second lane, on other thread counts
        torch.set_num_threads(1)
        floated = _calibrate(source, tmp_path / "float", "gguf:q4_k_m", "gptq", propagate="float", dtype="float32",
                             options=one_pass)
        _calibrate(source, tmp_path / "quantized", "gguf:q4_k_m", "gptq", dtype="float32", options=one_pass)
    finally:
        torch.set_num_threads(threads)
    resequenced = _calibrate(source, tmp_path / "resequenced", "gguf:q4_k_m", "gptq", propagate="float")
    assert resequenced.manifest.calibration.imatrix_from is None
    calibration = floated.manifest.calibration
    assert (calibration.propagate, calibration.imatrix_from) == ("float", "float")
    assert Manifest.load(tmp_path / "quantized").calibration.propagate is None
    result = run_cli("export", tmp_path / "float", "--format", "imatrix", "--out", tmp_path / "f.imatrix.gguf", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["notes"] == []
    ours = read_imatrix(tmp_path / "f.imatrix.gguf")
    references = _float_input_sum_squares(source)
    assert len(references) == 21
    for gguf_name, reference in references.items():
        assert torch.allclose(ours.sums[gguf_name][0].double(), reference, rtol=1e-4), gguf_name
    # true-sequential GPTQ re-observes Linears after quantizing others: asked for, llama-imatrix's statistics
    # come from a float pass over the same stream
    _calibrate(source, tmp_path / "both", "gguf:q4_k_m", "gptq", propagate="float", imatrix_from="float",
               dtype="float32")
    assert run_cli("export", tmp_path / "both", "--format", "imatrix", "--out", tmp_path / "b.imatrix.gguf").exit_code == 0
    both = read_imatrix(tmp_path / "b.imatrix.gguf")
    for gguf_name, reference in references.items():
        assert torch.allclose(both.sums[gguf_name][0].double(), reference, rtol=1e-4), gguf_name
    # one pass: the observing pass's statistics are already those, so no float pass runs; the same sums
    _calibrate(source, tmp_path / "both-one-pass", "gguf:q4_k_m", "gptq", propagate="float", imatrix_from="float",
               dtype="float32", options=one_pass)
    one = read_imatrix(_exported_imatrix(tmp_path, "both-one-pass"))
    assert all(torch.equal(one.sums[n], ours.sums[n]) for n in references)
    assert not torch.allclose(read_imatrix(_exported_imatrix(tmp_path, "resequenced")).sums["blk.2.ffn_down.weight"],
                              both.sums["blk.2.ffn_down.weight"], rtol=1e-3)
    a, b = (load_quantized(tmp_path / d, dtype=torch.float32) for d in ("float", "quantized"))
    def weight(model, name):
        return model.get_submodule(name).dequantized_weight()
    for linear in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        assert torch.equal(weight(a, f"model.layers.0.{linear}"), weight(b, f"model.layers.0.{linear}"))
        assert not torch.equal(weight(a, f"model.layers.2.{linear}"), weight(b, f"model.layers.2.{linear}"))
    # one stream of activations: SignRound's targets are the stream itself (the default keeps a second one)
    estimates = {mode: _calibrate(source, tmp_path / f"s-{mode}", "gguf:q4_k_m", "signround", dry_run=True,
                                  propagate=mode).estimate.activations for mode in ("quantized", "float")}
    assert estimates["quantized"] == 2 * estimates["float"] == 2 * 8 * 64 * 256 * 4
    refined = _calibrate(source, tmp_path / "signround", "gguf:q4_k_m", "signround", propagate="float",
                         options={"iters": 2}, dtype="float32")
    assert refined.manifest.calibration.propagate == "float"
    losses = [(e.metrics["block_loss_before"], e.metrics["block_loss_after"]) for e in refined.manifest.layers.values()
              if "block_loss_after" in e.metrics]
    assert len(losses) == 21 and all(after <= before for before, after in losses)


def test_propagate_float_with_awq_says_its_statistics_are_scaled(tiny, tmp_path):
    """--propagate float with AWQ: the run works; its importance statistics are of scaled inputs, which the
    manifest (no imatrix_from float) and the imatrix export's note say; an unknown mode is refused."""
    result = _calibrate(tiny, tmp_path / "awq", "gguf:q4_k_m", "awq", propagate="float")
    assert (result.manifest.calibration.propagate, result.manifest.calibration.imatrix_from) == ("float", None)
    exported = run_cli("export", tmp_path / "awq", "--format", "imatrix", "--out", tmp_path / "a.imatrix.gguf",
                       "--json")
    assert exported.exit_code == 0
    assert any("on the float model's block inputs, after smoothing/AWQ" in n for n in json.loads(exported.output)["notes"])
    with pytest.raises(QuantkitError, match="--propagate is 'quantized' or 'float', got 'floating'"):
        _calibrate(tiny, tmp_path / "x", "q4_k_m", "rtn", propagate="floating")


def test_imatrix_from_float_refuses_what_it_cannot_measure(tiny, tmp_path):
    out = ["--out", str(tmp_path / "x"), "--dataset", "dummy", "--num-samples", "2", "--seq-len", "16",
           "--imatrix-from", "float"]
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "q4_k_m", "--algo", "awq", *out),
                          "--imatrix-from float measures the float model's inputs")


def _llama_quantize() -> str | None:
    return os.environ.get("QUANTKIT_LLAMA_QUANTIZE") or shutil.which("llama-quantize")


def test_llama_quantize_reads_our_imatrix(tiny, tmp_path):
    """llama.cpp's own llama-quantize accepts our imatrix file and makes the file our export makes with it
    (needs a llama-quantize binary: QUANTKIT_LLAMA_QUANTIZE or PATH)."""
    binary = _llama_quantize()
    if binary is None:
        pytest.skip("no llama-quantize binary (set QUANTKIT_LLAMA_QUANTIZE)")
    _calibrate(tiny, tmp_path / "q", "q4_k_m", "imatrix")
    assert run_cli("export", tmp_path / "q", "--format", "imatrix", "--out", tmp_path / "m.imatrix.gguf").exit_code == 0
    export_gguf(tiny, tmp_path / "f16.gguf", ggml_type="F16")
    done = subprocess.run([binary, "--imatrix", str(tmp_path / "m.imatrix.gguf"), str(tmp_path / "f16.gguf"),
                           str(tmp_path / "lc.gguf"), "Q4_K_M"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = export_gguf(tiny, tmp_path / "ours.gguf", ggml_type="Q4_K_M", imatrix=tmp_path / "m.imatrix.gguf")
    theirs, mine = _file_weights(tmp_path / "lc.gguf"), _file_weights(ours.out)
    assert set(theirs) == set(mine)
    for name, tensor in theirs.items():
        assert mine[name].tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(tensor.data)), name


def test_k_grid_misuse_is_one_line(tiny, tmp_path):
    out = ["--out", str(tmp_path / "x"), "--dataset", "dummy", "--num-samples", "2", "--seq-len", "16"]
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "q4_k_m", "--algo", "hqq", *out),
                          "HQQ's fractional zero points do not fit Q4_K's integer mins")
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "q4_k_m", "--bits", "3", *out),
                          "q4_k_m is llama.cpp's Q4_K_M file type")
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "q4_k_x", *out), "did you mean")
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "mxfp4a16", "--algo", "imatrix", *out),
                          "imatrix is llama.cpp's search for K-quant grids")
    assert_one_line_error(run_cli("calibrate", tiny, "--scheme", "q4_k", "--group-size", "64", *out),
                          "no K-quant grid has int4 asym codes in groups of 64")
    _calibrate(tiny, tmp_path / "rtn", "q4_k", "rtn")
    assert_one_line_error(run_cli("export", tmp_path / "rtn", "--format", "imatrix", "--out", tmp_path / "m.gguf"),
                          "no importance statistics")


def test_k_grid_spec_round_trips_the_fields():
    w = torch.randn(4, 512, generator=torch.Generator().manual_seed(3))
    for name, fmt in kquants.K_FORMATS.items():
        spec = SCHEMES[name.lower()].weight
        blocks = kquants.quantize_reference(w, name)
        quant = QuantTensor.from_k_blocks(blocks, spec)
        again = quant.k_blocks()
        assert torch.equal(again.q, blocks.q) and torch.equal(again.sc, blocks.sc) and torch.equal(again.d, blocks.d)
        assert torch.equal(quant.dequantize(), blocks.dequantize())
        assert spec.k_format == fmt and WeightSpec(**{**spec.__dict__}).k_format == fmt


def test_moe_imatrix_keeps_every_experts_row(qwen3_moe_dir, tmp_path):
    """Stacked expert tensors get one row per expert, in expert order, an expert no token reached a zero row
    with count 0 (llama.cpp's loader gives it importance 1); the starved experts' rtn fallback drops the
    options only gptq reads."""
    out = tmp_path / "q"
    result = run_cli("calibrate", str(qwen3_moe_dir), "--scheme", "w4a16", "--algo", "gptq", "--algo-option",
                     "damp=0.02", "--num-samples", "1", "--seq-len", "8", "--moe-routed-only", "--out", str(out))
    assert result.exit_code == 0, result.output
    layers = Manifest.load(out).layers
    starved = {k for k, v in layers.items() if ".experts." in k and v.metrics["routed_tokens"] == 0}
    assert starved
    assert run_cli("export", out, "--format", "imatrix", "--out", tmp_path / "m.imatrix.gguf").exit_code == 0
    matrix = read_imatrix(tmp_path / "m.imatrix.gguf")
    from transformers import AutoConfig

    experts = AutoConfig.from_pretrained(qwen3_moe_dir).num_experts
    for name in starved:
        block, expert, part = int(name.split(".")[2]), int(name.split(".")[5]), name.rsplit(".", 1)[1]
        gguf_name = f"blk.{block}.ffn_{part.removesuffix('_proj')}_exps.weight"
        assert matrix.sums[gguf_name].shape[0] == experts
        assert float(matrix.counts[gguf_name][expert]) == 0 and not matrix.sums[gguf_name][expert].any()
        assert torch.equal(matrix.importance(gguf_name, expert), torch.ones(matrix.sums[gguf_name].shape[1]))


def test_gptq_on_llama_cpps_q4_0_grid_survives_dead_blocks():
    """A 32-column block no token activates has scale 0 on llama.cpp's weighted grid: it keeps the search's
    codes (value 0) and the live columns are still placed by GPTQ, beating the weighted search alone."""
    x, w = _correlated_layer(n_in=256, n_out=32)
    x[:, :32] = 0.0
    hessian = 2 * x.t() @ x / x.shape[0]
    spec = SCHEMES["q4_0"].weight
    gptq, _ = gptq_quantize(w, hessian, spec, llama_cpp=True)
    searched = quantize_imatrix(w, spec, (x * x).mean(0))
    values = gptq.dequantize()
    assert torch.isfinite(values).all() and not values[:, :32].any() and values[:, 32:].abs().sum() > 0
    loss = lambda q: float(((x @ (q.dequantize() - w).t()) ** 2).mean())   # noqa: E731
    assert loss(gptq) < loss(searched)


@pytest.mark.parametrize("scheme", ["q4_1", "q5_1"])
def test_gptq_on_llama_cpps_grid_with_minimums(scheme):
    """llama_cpp=True on Q4_1/Q5_1: GPTQ places its codes on llama.cpp's weighted search's own blocks (every d and
    float16 m of the written blocks equal the search's, bit for bit; the minimum is a fractional zero point) and
    beats that search's own rounding and GPTQ's min/max grid with integer zero points on the output error. A
    dead 32-column block (value 0) and a constant negative block (which the search gives no step) included."""
    from quantkit.exporters import gguf_blocks
    from quantkit.formats import ggml_blocks

    x, w = _correlated_layer(n_in=256, n_out=32)
    x[:, :32], w[:, :32] = 0.0, 0.0        # GPTQ zeroes a dead column's weights before the search
    w[5, 64:96] = -0.03
    hessian = 2 * x.t() @ x / x.shape[0]
    spec = SCHEMES[scheme].weight
    fmt = ggml_blocks.min_type(spec)
    gptq, _ = gptq_quantize(w, hessian, spec, llama_cpp=True)
    searched = quantize_imatrix(w, spec, torch.diag(hessian) / 2)
    search = ggml_blocks.with_steps(ggml_blocks.quantize_weighted_blocks(w, fmt, torch.diag(hessian) / 2))
    assert not searched.integer_zero and (float(search.d[5, 2]), float(search.m[5, 2])) == (float(w[5, 64].half()), 0)
    blocks = gguf_blocks.carry_codes(gptq.codes, gptq.scale, gptq.zero, fmt)
    assert torch.equal(blocks.d, search.d) and torch.equal(blocks.m, search.m)
    carried = gguf_blocks.carry_codes(searched.codes, searched.scale, searched.zero, fmt)     # --algo imatrix's
    assert all(torch.equal(getattr(carried, f), getattr(search, f)) for f in ("q", "d", "m"))
    values = blocks.dequantize()
    assert torch.allclose(gptq.dequantize(), values, rtol=0, atol=1e-6) and not values[:, :32].any()
    loss = lambda q: float(((x @ (q - w).t()) ** 2).mean())   # noqa: E731
    own, _ = gptq_quantize(w, hessian, spec)
    assert own.integer_zero
    assert loss(values) < loss(search.dequantize()) and loss(values) < loss(own.dequantize())


def test_compressed_tensors_refuses_k_grids(tiny, tmp_path):
    _calibrate(tiny, tmp_path / "q", "q4_k", "rtn")
    assert_one_line_error(run_cli("export", tmp_path / "q", "--format", "compressed-tensors", "--out", tmp_path / "ct"),
                          "Q4_K is llama.cpp's grid")
