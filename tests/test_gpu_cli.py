"""`acttail calibrate` and `acttail generate` on a CUDA GPU, end to end, as a user runs them (skipped without one).

No real model travels to a lent GPU, so this writes a random Llama with Llama-2-7B layer shapes (2 layers, dim
4096, 11008, 32 heads; a small trained tokenizer) as an HF folder, plans 50% sparsity, calibrates it on the GPU,
then generates with the kernel backend (Triton, fp16 and bf16, CUDA graphs), dense, and with the float32
reference backend. On a GPU machine: `pytest -s tests/test_gpu_cli.py` (prints each command's output).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from runtime_tiny import synthetic_analysis, write_hf_model, write_text

from acttail.allocation import plan_from_analysis
from acttail.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    print("$ acttail", " ".join(map(str, args)), f"-> exit {r.exit_code}\n", r.stdout.strip(), "\n",
          r.stderr.strip()[-1500:], flush=True)
    assert r.exit_code == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_cli")
    folder = root / "model"
    write_hf_model(folder, "llama", layers=2, tie=False, scale=None, hidden=4096, inter=11008, heads=32,
                   kv_heads=32)  # Llama-2-7B layer shapes
    plan_from_analysis(synthetic_analysis(folder), 0.5, method="alpha-map").save(root / "plan.json")
    text = write_text(root / "cal.txt", 20000, seed=7)
    cli("calibrate", folder, root / "plan.json", "--text", text, "--tokens", "4096", "--ctx", "256",
        "--device", "cuda", "-o", root / "calibrated.json")
    return folder, root / "calibrated.json"


@pytest.mark.parametrize("extra", [["--device", "cuda"], ["--device", "cuda", "--dtype", "bfloat16"],
                                   ["--device", "cuda", "--no-plan"],
                                   ["--device", "cuda", "--backend", "reference", "--prefill", "none"]],
                         ids=["kernels fp16", "kernels bf16", "kernels dense", "reference fp32"])
def test_generate_on_the_gpu(calibrated, extra):
    folder, plan = calibrated
    with_plan = [] if "--no-plan" in extra else ["--plan", plan]
    r = cli("generate", folder, *with_plan, "--prompt", "the cat sat on the mat and", "--max-new-tokens", "64",
            *[a for a in extra if a != "--no-plan"])
    assert r.stdout.strip()
