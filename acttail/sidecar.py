"""Where a plan's tensors live (its sidecar: plan.json -> plan.safetensors beside it) and how they are read.

The plan names its sidecar file and the sidecar's sha256; the pair is written as one unit (``Plan.save``
through ``outputs.write_files``) and read back only if the sha256 matches.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from pathlib import Path

import torch

from .errors import ActTailError
from .files import read_bytes, read_json
from .outputs import same_file


def tensors_path(plan_path: str | Path) -> Path:
    """Where a plan's tensors go: beside it, its name with the suffix .safetensors (plan.json: plan.safetensors).
    A plan path that is that file itself is refused."""
    beside = Path(plan_path).with_suffix(".safetensors")
    if same_file(plan_path, beside):
        raise ActTailError(f"plan {plan_path} would be its own tensors file: give the plan a .json name")
    return beside


def free_tensors_path(plan_path: str | Path) -> Path:
    """``tensors_path(plan_path)``, refused in one line where writing tensors there would break something: a
    folder in its place, or another plan beside it that names that file as its own (plan-0.5 and plan-0.6
    both have plan-0.safetensors; the second save would leave the first plan's sha256 unmatched)."""
    beside = tensors_path(plan_path)
    if beside.is_dir():
        raise ActTailError(f"plan {plan_path}'s tensors file {beside} is a folder: give the plan another name")
    if not os.path.lexists(beside):
        return beside
    for other in sorted(beside.parent.glob(glob.escape(beside.stem) + ".*")):
        if other.suffix == ".safetensors" or same_file(other, plan_path):
            continue
        if named_tensors_file(other) == beside:
            raise ActTailError(f"plan {plan_path}'s tensors file {beside} is that of plan {other}, which saving would "
                               f"break: give the plan a name of its own (such as {Path(plan_path).name}.json)")
    return beside


def named_tensors_file(plan_path: str | Path) -> Path | None:
    """The tensors file a plan file names beside it, read leniently: None for a file that is no readable plan
    or names none (a bad plan is refused when it is loaded, not here)."""
    with contextlib.suppress(ActTailError, TypeError, AttributeError):
        named = read_json(plan_path, "plan").get("tensors") or {}
        if isinstance(named.get("file"), str):
            return Path(plan_path).parent / named["file"]
    return None


def read_tensors(path: Path, sha256: str, where: str) -> dict[str, torch.Tensor]:
    """The plan's tensors file, checked against the sha256 the plan names."""
    from safetensors.torch import load as from_bytes

    if not path.exists():
        raise ActTailError(f"{where} names tensors file {path.name}, which is not beside it")
    data = read_bytes(path, f"{where}: tensors file", limit=None)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ActTailError(f"{where}: {path.name} does not match the sha256 the plan names (changed or replaced)")
    try:
        return from_bytes(data)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ActTailError(f"{where}: cannot read {path.name}: {e}") from None
