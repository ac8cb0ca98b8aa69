"""Fuzz the checkpoint reader: the bytes of a model folder's model.safetensors (``read_header``, then
``Checkpoint.open`` of the folder, its projections and every projection's weights through safetensors), or
of its model.safetensors.index.json (raw, or a valid index edited).

    python fuzz/safetensors_reader.py -runs=1000000 fuzz/corpus/safetensors
"""

import json

import atheris

import common  # first: it sets the environment (a scratch cache, no progress bars) and imports no acttail

with atheris.instrument_imports(include=["acttail"]):
    from acttail.checkpoint import Checkpoint, read_header
    from acttail.errors import ActTailError

SOURCE = common.tiny_model(common.SCRATCH / "source")
CONFIG = (SOURCE / "config.json").read_bytes()
WEIGHTS = (SOURCE / "model.safetensors").read_bytes()
INDEX = [{"metadata": {}, "weight_map": {n: "model.safetensors" for n in common.tiny_tensors()}}]


def _seeds() -> list[bytes]:
    import torch
    from safetensors.torch import save

    half = save({n: t.to(torch.bfloat16) for n, t in common.tiny_tensors().items()})
    odd = save({**common.tiny_tensors(), "extra.int": torch.arange(6).reshape(2, 3), "scalar": torch.tensor(1.0)})
    return [b"\0" + WEIGHTS, b"\0" + half, b"\0" + odd, b"\1\0" + json.dumps(INDEX[0]).encode()]


VALID = _seeds()  # inputs that must read without error
SEEDS = VALID + [b"\1" + s for s in common.json_seeds(INDEX)]


def read(data: bytes) -> bool:
    """True when the input reads without error, False when it is refused with an ActTailError."""
    model = common.folder("model")
    (model / "config.json").write_bytes(CONFIG)
    if not data or data[0] % 2 == 0:
        (model / "model.safetensors").write_bytes(data[1:])
        try:
            read_header(model / "model.safetensors")
        except ActTailError:
            pass
    else:
        (model / "model.safetensors").write_bytes(WEIGHTS)
        (model / "model.safetensors.index.json").write_bytes(common.json_input(data[1:], INDEX))
    try:
        ckpt = Checkpoint.open(model)
        for proj in ckpt.projections():
            ckpt.load(proj)
        return True
    except ActTailError:
        return False


if __name__ == "__main__":
    common.main(read, SEEDS, VALID)
