"""llama.cpp's file types as calibration plans: ``--scheme q4_k_m`` (or ``gguf:q4_k_m``, and a recipe rule
or default with such a scheme) gives every block Linear the ggml type ``llama-quantize`` would give its
GGUF tensor (`formats.ggml_mixes`), as a weight grid our algorithms find codes on; the GGUF export then
carries those codes. K-quant grids on rows that are not a multiple of 256 fall back as llama.cpp does
(Q4_K -> Q5_0, ...), whichever way they were asked for.
"""
from __future__ import annotations

import dataclasses

from quantkit.algorithms.registry import base_algorithm, validate_grid
from quantkit.errors import QuantkitError
from quantkit.formats import ggml_mixes
from quantkit.formats.ggml_blocks import min_type as ggml_min_type
from quantkit.formats.ggml_blocks import symmetric_type as ggml_symmetric_type
from quantkit.formats.schemes import ggml_scheme
from quantkit.model.architectures import Architecture
from quantkit.model.gguf_names import GGUFNames, model_shape
from quantkit.run.recipe import LayerAssignment


def resolve_ggml_types(plan: dict[str, LayerAssignment | None], shapes: dict[str, tuple[int, int]],
                       arch: Architecture, config) -> tuple[dict[str, LayerAssignment | None], dict[str, str]]:
    """Each file-type assignment turned into its tensor's ggml type, and K grids on rows that do not fit
    turned into llama.cpp's fallback: (plan, {layer left in float: why}). ``shapes``: layer -> (out, in)."""
    names = model = None
    resolved, ignored = dict(plan), {}
    for layer, assignment in plan.items():
        if assignment is None:
            continue
        row_length = shapes[layer][1]
        if assignment.file_type is not None:
            if names is None:     # only file types need the GGUF names (and an architecture that has them)
                names, model = GGUFNames.of(arch, config.num_hidden_layers), model_shape(arch, config, tied=False)
            gguf_name, _ = names.linear_weight(layer)
            ggml_type, why = ggml_mixes.tensor_type(assignment.file_type, gguf_name, row_length, model)
        elif assignment.scheme.weight.k_format is not None:
            ggml_type, why = ggml_mixes.fit(assignment.scheme.weight.k_format.name, row_length)
            if not why:
                continue
        else:
            continue
        if ggml_type == "F16":
            resolved[layer], ignored[layer] = None, f"{assignment.rule}: {why}"
            continue
        resolved[layer] = _with_type(assignment, ggml_type, why)
    return resolved, ignored


def _with_type(assignment: LayerAssignment, ggml_type: str, why: str) -> LayerAssignment:
    algorithm, options, fallback = ggml_type_algorithm(assignment.algorithm, assignment.options, ggml_type)
    why = "; ".join(filter(None, [why, fallback]))
    rule = f"{assignment.rule} -> {ggml_type}" + (f" ({why})" if why else "")
    return dataclasses.replace(assignment, scheme=ggml_scheme(ggml_type), algorithm=algorithm, options=options,
                               rule=rule)


def ggml_type_algorithm(algorithm: str, options: dict, ggml_type: str) -> tuple[str, dict, str]:
    """(algorithm, options, why) a Linear calibrated for ggml type ``ggml_type`` runs: rtn where ``algorithm``
    cannot search that grid (why says so), rtn/gptq with llama.cpp's own rounding / weighted grid of the
    32-value symmetric types (Q4_0/Q5_0/Q8_0), as llama-quantize rounds them, and gptq (also as signround's init)
    with llama.cpp's weighted grid of Q4_1/Q5_1 (rtn keeps its integer zero points there)."""
    weight = ggml_scheme(ggml_type).weight
    why = ""
    try:
        validate_grid(algorithm, options, weight)
    except QuantkitError:     # imatrix: Q8_0 has no search
        algorithm, options, why = "rtn", {}, f"{algorithm} does not search {ggml_type}: rtn"
    base = base_algorithm(algorithm, options, weight)[0]
    # llama.cpp's rounding (rtn) or weighted grid (gptq) of Q4_0/Q5_0/Q8_0, and gptq's of Q4_1/Q5_1 (a float16 minimum)
    if (base in ("rtn", "gptq") and ggml_symmetric_type(weight) is not None) or \
            (base == "gptq" and ggml_min_type(weight) is not None):
        options = {**options, "llama_cpp": True}
    return algorithm, options, why

