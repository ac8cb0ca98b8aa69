"""Fuzz the analysis reader: bytes as an analysis.json (raw, or the tiny model's analysis edited) read by
``Analysis.load``, and as an entry of the analysis cache, which must be served only when it is a valid
analysis of this very model with these settings (``analysis._cached``), and otherwise be recomputed.

    python fuzz/analysis_reader.py -runs=1000000 fuzz/corpus/analysis
"""

import atheris

import common  # first: it sets the environment (a scratch cache, no progress bars) and imports no acttail

with atheris.instrument_imports(include=["acttail"]):
    from acttail import analysis
    from acttail.analysis import Analysis
    from acttail.checkpoint import Checkpoint
    from acttail.errors import ActTailError

CKPT = Checkpoint.open(common.tiny_model(common.SCRATCH / "source"))
PROJS = CKPT.projections()
CFG = analysis.settings(device="cpu")
DOC = analysis.analyze_checkpoint(CKPT, CFG, progress=False, workers=1)
PEAK = analysis.analyze_checkpoint(CKPT, analysis.settings(fit="peak", device="cpu"), progress=False, workers=1)
VALID = [b"\0" + analysis.to_json(DOC).encode()]
SEEDS = VALID + common.json_seeds([DOC, PEAK])


def read(data: bytes) -> bool:
    """True when the input reads as an analysis without error (and a cache entry is served only when it is
    this model's, with these settings), False when it is refused with an ActTailError."""
    path = common.folder("analysis") / "analysis.json"
    path.write_bytes(common.json_input(data, [DOC, PEAK]))
    served = analysis._cached(path, CKPT, CFG, PROJS)
    assert served is None or (served["settings"]["fit"] == CFG["fit"] and served["model"]["fingerprint"]
                              == CKPT.fingerprint and len(served["projections"]) == len(PROJS)), "served another's"
    try:
        Analysis.load(path).to_dict()
        return True
    except ActTailError:
        return False


if __name__ == "__main__":
    common.main(read, SEEDS, VALID)
