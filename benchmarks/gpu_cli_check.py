"""`acttail calibrate` and `acttail generate` on a GPU, end to end, as a user runs them.

No real model travels to the lent GPU, so this writes a random Llama with Llama-2-7B layer shapes (2 layers,
dim 4096, 11008, 32 heads; a small trained tokenizer) as an HF folder, plans 50% sparsity, calibrates it on
the GPU, then generates with the kernel backend (Triton, fp16, CUDA graphs) and the float32 reference
backend, and prints both continuations and the measured rates.

    python benchmarks/gpu_cli_check.py --out OUT
"""

import argparse
import json
import tempfile
from pathlib import Path



def cli(*args):
    """Run the CLI in this process (run from the repository root: python benchmarks/gpu_cli_check.py)."""
    from click.testing import CliRunner

    from acttail.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    print("$ acttail", " ".join(map(str, args)), f"-> exit {r.exit_code}", flush=True)
    print(r.stdout.strip(), "\n", r.stderr.strip()[-1500:], flush=True)
    if r.exception and not isinstance(r.exception, SystemExit):
        import traceback
        traceback.print_exception(r.exception)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    from acttail.allocation import plan_from_analysis
    from tests.runtime_tiny import synthetic_analysis, write_hf_model, write_text

    root = Path(tempfile.mkdtemp())
    folder = root / "model"
    write_hf_model(folder, "llama", layers=2, tie=False, scale=None, hidden=4096, inter=11008, heads=32,
                   kv_heads=32)  # Llama-2-7B layer shapes
    plan_from_analysis(synthetic_analysis(folder), 0.5, method="alpha-map").save(root / "plan.json")
    text = write_text(root / "cal.txt", 20000, seed=7)
    results = {}
    r = cli("calibrate", folder, root / "plan.json", "--text", text, "--tokens", "4096", "--ctx", "256",
            "--device", "cuda", "-o", root / "calibrated.json")
    results["calibrate"] = dict(exit=r.exit_code, stdout=r.stdout, stderr=r.stderr[-2000:])
    prompt = "the cat sat on the mat and"
    for label, extra in [("kernels fp16", ["--device", "cuda"]),
                         ("kernels bf16", ["--device", "cuda", "--dtype", "bfloat16"]),
                         ("kernels dense", ["--device", "cuda", "--no-plan"]),
                         ("reference cuda fp32", ["--device", "cuda", "--backend", "reference", "--prefill", "none"])]:
        plan = [] if "--no-plan" in extra else ["--plan", root / "calibrated.json"]
        args = [a for a in extra if a != "--no-plan"]
        r = cli("generate", folder, *plan, "--prompt", prompt, "--max-new-tokens", "64", *args)
        results[label] = dict(exit=r.exit_code, stdout=r.stdout, stderr=r.stderr[-2000:])
    r = cli("generate", folder, "--plan", root / "calibrated.json", "--prompt", prompt, "--device", "cuda",
            "--temperature", "0.5")
    results["bad: sampling on the kernel backend"] = dict(exit=r.exit_code, stdout=r.stdout, stderr=r.stderr[-500:])
    (out / "cli_check.json").write_text(json.dumps(results, indent=1))
    same = results["kernels fp16"]["stdout"] == results["reference cuda fp32"]["stdout"]
    print(f"kernel fp16 and reference fp32 continuations identical: {same}")


if __name__ == "__main__":
    main()
