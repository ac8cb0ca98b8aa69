"""Fuzz the plan reader: bytes as a plan.json (raw, or a seed plan edited) read by ``Plan.load`` and shown
as ``acttail plan show`` shows it (``format_summary``), or as the plan's tensors file (the plan naming its
sha256), read by the same ``Plan.load``.

    python fuzz/plan_reader.py -runs=1000000 fuzz/corpus/plan
"""

import hashlib
import json

import atheris

import common  # first: it sets the environment (a scratch cache, no progress bars) and imports no acttail

with atheris.instrument_imports(include=["acttail"]):
    from acttail.errors import ActTailError
    from acttail.layout import KINDS
    from acttail.plan import Plan, PlanEntry, overhead


def _seed_plans() -> tuple[list[dict], bytes]:
    """Plan documents of the tiny model (plain, calibrated, with score weights and biases in a tensors file,
    version 1) and the tensors file's bytes."""
    import torch

    c = common.CONFIG
    hd = c["hidden_size"] // c["num_attention_heads"]
    shape = {"q": (8, 8), "k": (8, hd), "v": (8, hd), "o": (8, 8), "gate": (8, 32), "up": (8, 32), "down": (32, 8)}  # in, out
    entries = [PlanEntry(0, k, shape[k][0], shape[k][1], 0.25 + 0.05 * i, metric=3.0 + i) for i, k in enumerate(KINDS)]
    model = {"fingerprint": "sha256:0123", "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 1,
             "path": "model"}
    plan = Plan(model=model, budget=0.4, method={"name": "acttail", "metric": "alpha", "epsilon": 0.1},
                projections=entries, source={"analysis": "analysis.json", "settings": {"fit": "ks"}})
    calibrated = plan.with_thresholds({e.key: 0.1 * (i + 1) for i, e in enumerate(entries)},
                                      {e.key: {"achieved_sparsity": e.sparsity, "n_tokens": 64} for e in entries},
                                      {"text": "wiki", "tokens": 64, "ctx": 32})
    folder = common.folder("seed-plan")
    calibrated.score, calibrated.compensation = "weight", "learned"
    calibrated.tensors = {f"{e.key}.score": torch.rand(e.in_features) + 0.5 for e in entries}
    calibrated.tensors.update({f"{e.key}.bias": torch.randn(e.out_features) for e in entries})
    for e in calibrated.projections:  # what learned biases cost, as calibration records it
        e.overhead = overhead((e.in_features, e.out_features), "learned")
    calibrated.save(folder / "plan.json")
    with_tensors = json.loads((folder / "plan.json").read_text())
    v1 = plan.to_dict()
    v1["version"] = 1
    for k in ("score", "compensation", "tensors"):
        v1.pop(k)
    for e in v1["projections"]:
        e.pop("overhead"), e.pop("rank")
    return [plan.to_dict(), with_tensors, v1], (folder / "plan.safetensors").read_bytes()


PLANS, TENSORS = _seed_plans()
VALID = [b"\0\0" + json.dumps(p).encode() for p in PLANS] + [b"\1" + TENSORS]
SEEDS = VALID + [b"\0" + s for s in common.json_seeds(PLANS)]


def read(data: bytes) -> bool:
    """True when the input reads without error, False when it is refused with an ActTailError."""
    folder = common.folder("plan")
    if not data or data[0] % 2 == 0:
        (folder / "plan.json").write_bytes(common.json_input(data[1:], PLANS))
        (folder / "plan.safetensors").write_bytes(TENSORS)
    else:
        plan = dict(PLANS[1], tensors={"file": "plan.safetensors", "sha256": hashlib.sha256(data[1:]).hexdigest()})
        (folder / "plan.json").write_text(json.dumps(plan))
        (folder / "plan.safetensors").write_bytes(data[1:])
    try:
        Plan.load(folder / "plan.json").format_summary()
        return True
    except ActTailError:
        return False


if __name__ == "__main__":
    common.main(read, SEEDS, VALID)
