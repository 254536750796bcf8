"""Regenerate llama_cpp_kquants.safetensors: llama.cpp's own K-quant blocks of a fixed input, the reference
tests/test_kquants.py holds our quantizer to when llama.cpp is not installed.

    python tests/data/make_llama_cpp_kquants.py     (needs llama-cpp-python, which builds llama.cpp)

The input (6 rows x 512) mixes Gaussian rows of several magnitudes with the edge cases the search
handles specially: an all-zero super-block, zero sub-blocks, a constant sub-block, an all-positive
and an all-negative row, one outlier per sub-block, and values near float16's smallest normal.
Each type's bytes come from ggml's ``quantize_row_*_ref`` (what llama-quantize runs without an imatrix),
called through ctypes in llama-cpp-python's libggml-base.
"""
import ctypes
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TYPE_SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


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


def llama_cpp_blocks(x: torch.Tensor, name: str) -> torch.Tensor:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    function = getattr(lib, f"quantize_row_{name[:2].lower()}_K_ref")
    data = np.ascontiguousarray(x.numpy().reshape(-1))
    out = np.zeros(data.size // 256 * TYPE_SIZES[name], dtype=np.uint8)
    function(data.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(data.size))
    return torch.from_numpy(out.reshape(x.shape[0], -1))


if __name__ == "__main__":
    x = make_input()
    tensors = {"input": x, **{name: llama_cpp_blocks(x, name) for name in TYPE_SIZES}}
    save_file(tensors, Path(__file__).with_name("llama_cpp_kquants.safetensors"),
              metadata={"source": "llama-cpp-python 0.3.36, ggml quantize_row_*_ref"})
