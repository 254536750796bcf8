"""Regenerate llama_cpp_kquants.safetensors: llama.cpp's own K-quant blocks of a fixed input, the reference
tests/test_kquants.py holds our quantizer to when llama.cpp is not installed.

    python tests/data/make_llama_cpp_kquants.py     (needs llama-cpp-python, which builds llama.cpp)

The input (6 rows x 512) mixes Gaussian rows of several magnitudes with the edge cases the search
handles specially: an all-zero super-block, zero sub-blocks, a constant sub-block, an all-positive
and an all-negative row, one outlier per sub-block, and values near float16's smallest normal.
Each type's bytes come from ggml's ``quantize_row_*_ref`` (what llama-quantize runs without an imatrix),
and, under ``<type>.imatrix``, from ``quantize_*`` with the recorded ``importance`` vector (what
llama-quantize --imatrix runs; a few columns have importance 0; also for the 32-value types Q4_0, Q4_1,
Q5_0 and Q5_1, whose search with an imatrix is llama.cpp's own), called through ctypes in
llama-cpp-python's libggml-base.
"""
import ctypes
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TYPE_SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# llama.cpp's 32-value types, whose importance-weighted search (quantize_q4_0 ... with an imatrix) is recorded too
LEGACY_SIZES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}


def make_input() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(6, 512, generator=generator) * torch.tensor([0.02, 0.5, 3.0, 0.05, 0.05, 1e-4])[:, None]
    x[0, :256] = 0.0                                   # an all-zero super-block
    x[1, 32:48] = 0.0                                  # a zero sub-block (16) and a constant one
    x[1, 64:96] = 0.25
    x[2, ::37] *= 40.0                                 # outliers
    x[3] = x[3].abs() + 0.01                           # all positive
    x[4] = -x[4].abs() - 0.01                          # all negative
    return x.float()


def make_importance() -> torch.Tensor:
    generator = torch.Generator().manual_seed(99)
    importance = torch.rand(512, generator=generator) ** 4 * 10
    importance[:20] = 0.0
    return importance.float()


def _library():
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def llama_cpp_blocks(x: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    data = np.ascontiguousarray(x.numpy())
    if name in LEGACY_SIZES:
        out = np.zeros(data.size // 32 * LEGACY_SIZES[name], dtype=np.uint8)
        weights = np.ascontiguousarray(importance.numpy())
        function = getattr(_library(), f"quantize_{name.lower()}")
        function.restype = ctypes.c_size_t
        pointer = ctypes.c_void_p
        function(data.ctypes.data_as(pointer), out.ctypes.data_as(pointer), ctypes.c_int64(x.shape[0]),
                 ctypes.c_int64(x.shape[1]), weights.ctypes.data_as(pointer))
        return torch.from_numpy(out.reshape(x.shape[0], -1))
    out = np.zeros(data.size // 256 * TYPE_SIZES[name], dtype=np.uint8)
    pointer = ctypes.c_void_p
    if importance is None:
        function = getattr(_library(), f"quantize_row_{name[:2].lower()}_K_ref")
        function(data.ctypes.data_as(pointer), out.ctypes.data_as(pointer), ctypes.c_int64(data.size))
    else:
        weights = np.ascontiguousarray(importance.numpy())
        function = getattr(_library(), f"quantize_{name[:2].lower()}_K")
        function.restype = ctypes.c_size_t
        function(data.ctypes.data_as(pointer), out.ctypes.data_as(pointer), ctypes.c_int64(x.shape[0]),
                 ctypes.c_int64(x.shape[1]), weights.ctypes.data_as(pointer))
    return torch.from_numpy(out.reshape(x.shape[0], -1))


if __name__ == "__main__":
    x, importance = make_input(), make_importance()
    tensors = {"input": x, "importance": importance, **{name: llama_cpp_blocks(x, name) for name in TYPE_SIZES},
               **{f"{name}.imatrix": llama_cpp_blocks(x, name, importance) for name in (*TYPE_SIZES, *LEGACY_SIZES)}}
    save_file(tensors, Path(__file__).with_name("llama_cpp_kquants.safetensors"),
              metadata={"source": "llama-cpp-python 0.3.36, ggml quantize_row_*_ref"})
