"""Checkpoint reader: HF model folders and bare safetensors files, streamed one tensor at a time.

A ``Checkpoint`` knows the model's architecture and its linear projections (q/k/v/o/gate/up/down of every
decoder layer) and loads any one of them on demand through ``safetensors.safe_open``, so peak memory stays
near the largest single matrix whatever the model size. Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
are split into q/k/v and gate/up using the head counts in config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ActTailError
from .files import MAX_CONFIG, MAX_JSON, file_sha256, open_regular, read_json, regular_file
from .layout import ARCHITECTURES, HF_FUSED, HF_MODULES, KINDS, key
from .validation import check_schema

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_LAYER_RE = re.compile(r"^(.*?layers)\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_MAX_HEADER = 100 * 1024 * 1024
# bytes per element of each safetensors dtype (sub-byte and unknown dtypes: only their offsets are checked)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_GATES = {HF_MODULES["gate"], *(module for module, kinds in HF_FUSED.items() if "gate" in kinds)}  # an MLP's mark


@dataclass(frozen=True)
class Projection:
    """One linear projection of one decoder layer: y = W x with W of shape (out_features, in_features)."""

    layer: int
    kind: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def key(self) -> str:
        return key(self.layer, self.kind)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def read_header(path: Path) -> tuple[bytes, dict]:
    """Read and validate a safetensors header: returns (raw bytes, parsed JSON) or raises ActTailError.

    Every tensor entry must have a dtype, a shape of sizes >= 0 and data offsets inside the file that
    hold exactly the bytes its dtype and shape need; a FIFO or device is refused before it is opened."""
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ActTailError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):  # the length field is not echoed: it may be any file's bytes
                raise ActTailError(f"{path} has a corrupt or truncated safetensors header (its length field "
                                   "exceeds the file or 100 MiB)")
            raw = f.read(n)
        except OSError as e:
            raise ActTailError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ActTailError(f"{path} has a garbage safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ActTailError(f"{path} has a garbage safetensors header (not a JSON object)")
    data_len = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, data_len)
    return raw, header


def _check_entry(path: Path, name: str, info, data_len: int) -> None:
    """One tensor's header entry: its dtype, shape and data offsets, in the ``data_len`` bytes after the header."""
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    ok = isinstance(info, dict) and isinstance(info.get("dtype"), str) and _sizes(info.get("shape")) \
        and _sizes(info.get("data_offsets")) and len(info["data_offsets"]) == 2
    if not ok:
        raise ActTailError(f"{path}: malformed header entry for tensor {shown} (needs a dtype, a shape and two "
                           "data offsets, sizes >= 0)")
    start, end = info["data_offsets"]
    if end > data_len or start > end:
        raise ActTailError(f"{path} is truncated: tensor {shown} ends at byte {end} of {data_len}")
    width = _DTYPE_BYTES.get(info["dtype"])
    if width is not None and _elements(info["shape"], end - start) * width != end - start:
        shape = info["shape"] if len(info["shape"]) <= 8 else f"of {len(info['shape'])} dimensions"
        raise ActTailError(f"{path}: tensor {shown} holds {end - start} bytes, not what its shape {shape} of "
                           f"{info['dtype']} needs")


def _elements(shape: list[int], bound: int) -> int:
    """The number of elements of ``shape``, or ``bound + 1`` once it exceeds ``bound`` (no huge products)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > bound:
            return bound + 1
    return n


def _sizes(x) -> bool:
    return isinstance(x, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in x)


def decoder_prefix(names) -> str | None:
    """The prefix of the decoder layers' tensor names (``model.layers``), or None. A multimodal checkpoint
    (Gemma 3) also holds a vision encoder's layers, with q/k/v but no MLP gate: the decoder's have one."""
    found: dict[str, set] = {}
    for name in names:
        m = _LAYER_RE.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(f"{m.group(3)}.{m.group(4)}")
    gated = [p for p, modules in found.items() if modules & _GATES]
    return (gated or list(found) or [None])[0]


def read_config(cfg_path: Path) -> dict:
    """A model folder's config.json, checked against schemas/config.schema.json, with a multimodal model's
    ``text_config`` merged in (and checked again)."""
    if not os.path.lexists(cfg_path):
        raise ActTailError(f"{cfg_path.parent} has no config.json (not an HF model folder)")
    config = read_json(cfg_path, "config", MAX_CONFIG)
    check_schema(config, "config", str(cfg_path))
    config = _text_config(config)
    check_schema(config, "config", f"{cfg_path} (text_config)")
    return config


def _text_config(config: dict) -> dict:
    """Multimodal configs (Gemma 3) nest the decoder's settings in ``text_config``."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


class Checkpoint:
    """A model checkpoint on disk: config, tensor index, projections, and lazy tensor loading."""

    def __init__(self, path: Path, config: dict, files: list[Path], index: dict[str, Path], headers: dict):
        self.path = path
        self.config = config
        self.files = files
        self._index = index  # tensor name -> file
        self._headers = headers  # file -> parsed header
        self._handles: dict[Path, object] = {}
        self.architecture = self._architecture()
        self.model_type = config.get("model_type") or ARCHITECTURES[self.architecture].model_type
        self.rotation = (config.get("acttail_rotation") or {}).get("kind")  # a checkpoint acttail rotate wrote
        self._fused = ARCHITECTURES[self.architecture].fused
        self.prefix = self._layer_prefix()
        self.num_layers = self._num_layers()
        self.fingerprint = self._fingerprint()

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Open an HF model folder (config.json + safetensors) or a bare ``.safetensors`` file."""
        path = Path(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ActTailError(f"model path not found: {path}") from None
        except OSError as e:
            raise ActTailError(f"cannot read model path {path}: {e.strerror}") from None
        if stat.S_ISDIR(mode):
            config, files = read_config(path / "config.json"), _safetensors_files(path)
        elif path.suffix != ".safetensors":
            raise ActTailError(f"{path} is neither a model folder nor a .safetensors file")
        else:
            regular_file(path, "safetensors file")
            files, config = [path], {}
        headers = {f: read_header(f)[1] for f in files}
        index = {name: f for f, h in headers.items() for name in h if name != "__metadata__"}
        return cls(path, config, files, index, headers)

    def _architecture(self) -> str:
        archs = self.config.get("architectures")
        if not archs:  # a bare safetensors file: recognise the Llama naming, or give up clearly
            if any(_LAYER_RE.match(n) for n in self._index) and self._has(0, "q"):
                return "LlamaForCausalLM"
            raise ActTailError(f"{self.path}: no config.json architectures and no Llama-style tensor names")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ActTailError(f"unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")
        return arch

    def _layer_prefix(self) -> str:
        prefix = decoder_prefix(self._index)
        if prefix is None:
            raise ActTailError(f"{self.path}: no decoder-layer weights (model.layers.N.*) found")
        return prefix

    def _num_layers(self) -> int:
        found = {int(m.group(2)) for n in self._index if (m := _LAYER_RE.match(n)) and m.group(1) == self.prefix}
        n = self.config.get("num_hidden_layers", max(found) + 1)
        if max(found) >= n:
            raise ActTailError(f"{self.path}: config says {n} layers but the weights have layers up to {max(found)}")
        if len(found) != n:
            missing = list(islice((i for i in range(n) if i not in found), 5))
            raise ActTailError(f"{self.path}: config says {n} layers but weights are missing for layers {missing}")
        return n

    def _fingerprint(self) -> str:
        """sha256 over the sha256 of every byte of every safetensors file, in file order: any change to
        any weight (or header) changes it. Per-file hashes are cached (``files.file_sha256``)."""
        h = hashlib.sha256()
        for f in self.files:
            try:
                h.update(bytes.fromhex(file_sha256(f)))
            except OSError as e:
                raise ActTailError(f"cannot read {f}: {e.strerror}") from None
        return "sha256:" + h.hexdigest()[:32]

    # ---- tensors ----------------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        return list(self._index)

    def _has(self, layer: int, kind: str) -> bool:
        return self._name(layer, kind) in self._index

    def _name(self, layer: int, kind: str) -> str:
        prefix = getattr(self, "prefix", "model.layers")
        return f"{prefix}.{layer}.{HF_MODULES[kind]}.weight"

    def _shape(self, name: str) -> list[int]:
        return self._headers[self._index[name]][name]["shape"]

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor by its name in the checkpoint, in its stored dtype (bf16, fp16 or fp32)."""
        if name not in self._index:
            raise ActTailError(f"{self.path}: tensor {name!r} not found")
        file = self._index[name]
        dtype = self._headers[file][name]["dtype"]
        if dtype not in _DTYPES:
            raise ActTailError(f"{file}: tensor {name!r} has dtype {dtype}; only BF16, F16 and F32 are read")
        try:
            if file not in self._handles:
                regular_file(file, "safetensors file")  # safe_open would block on a FIFO put in its place
                self._handles[file] = safe_open(str(file), framework="pt")
            return self._handles[file].get_tensor(name)
        except ActTailError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ActTailError(f"cannot read tensor {name!r} of {file}: {str(e)[:200]}") from None

    # ---- projections ------------------------------------------------------------------------------

    def projections(self) -> list[Projection]:
        """Every q/k/v/o/gate/up/down of every layer, ordered by layer then kind; shapes must agree with
        config.json (``expected_shapes``)."""
        projs = [Projection(layer, kind, *self._proj_shape(layer, kind))
                 for layer in range(self.num_layers) for kind in KINDS]
        self._check_embeddings()
        expected = self.expected_shapes()
        for p in projs:
            want = expected.get(p.kind)
            if want is not None and tuple(p.shape) != want:
                raise ActTailError(f"{self.path}: config.json does not match the weights: {p.key} is "
                                   f"{p.out_features} x {p.in_features}, config.json implies {want[0]} x {want[1]} "
                                   "(hidden_size, intermediate_size, heads, head_dim)")
        return projs

    def _check_embeddings(self) -> None:
        """The token embeddings must be vocab_size x hidden_size, as config.json says (where it says both)."""
        name = self.prefix[: -len("layers")] + "embed_tokens.weight"
        want = [self.config.get("vocab_size"), self.config.get("hidden_size")]
        if name not in self._index or not all(type(d) is int for d in want):
            return
        shape = list(self._shape(name))
        if shape != want:
            raise ActTailError(f"{self.path}: config.json does not match the weights: {name} is "
                               f"{' x '.join(map(str, shape))}, "
                               f"config.json says vocab_size {want[0]}, hidden_size {want[1]}")

    def expected_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each kind implied by config.json; kinds it cannot tell are absent."""
        c = self.config
        hidden, inter, heads = c.get("hidden_size"), c.get("intermediate_size"), c.get("num_attention_heads")
        out = {}
        if hidden and inter:
            out.update(gate=(inter, hidden), up=(inter, hidden), down=(hidden, inter))
        if hidden and heads:
            hd = c.get("head_dim") or hidden // heads
            kv = (c.get("num_key_value_heads") or heads) * hd
            out.update(q=(heads * hd, hidden), k=(kv, hidden), v=(kv, hidden), o=(hidden, heads * hd))
        return out

    def _proj_shape(self, layer: int, kind: str) -> tuple[int, int]:
        if self._fused_module(kind):
            fused, rows = self._fused_rows(layer, kind)
            return rows.stop - rows.start, self._shape(fused)[1]
        name = self._name(layer, kind)
        if name not in self._index:
            raise ActTailError(f"{self.path}: missing weight {name}")
        shape = self._shape(name)
        if len(shape) != 2:
            raise ActTailError(f"{self.path}: {name} has shape {shape}, expected a matrix")
        return shape[0], shape[1]

    def _fused_module(self, kind: str) -> str | None:
        """The fused module holding ``kind`` (Phi-3's qkv_proj and gate_up_proj), or None: stored alone."""
        return next((m for m, kinds in HF_FUSED.items() if kind in kinds), None) if self._fused else None

    def _fused_rows(self, layer: int, kind: str) -> tuple[str, slice]:
        """Phi-3: the fused tensor holding ``kind`` and which of its rows, from the sizes config.json implies."""
        module = self._fused_module(kind)
        name, kinds = f"{self.prefix}.{layer}.{module}.weight", HF_FUSED[module]
        if name not in self._index:
            raise ActTailError(f"{self.path}: missing fused weight {name}")
        expected = self.expected_shapes()
        if not all(k in expected for k in kinds):
            raise ActTailError(f"{self.path}: config.json lacks the sizes that split {name} (hidden_size, "
                               "intermediate_size, num_attention_heads)")
        sizes = {k: expected[k][0] for k in kinds}
        total = self._shape(name)[0]
        if total != sum(sizes.values()):
            raise ActTailError(f"{self.path}: {name} has {total} rows but config.json implies "
                               f"{' + '.join(str(sizes[k]) for k in kinds)} = {sum(sizes.values())}")
        start = sum(sizes[k] for k in kinds[:kinds.index(kind)])
        return name, slice(start, start + sizes[kind])

    def load(self, proj: Projection) -> torch.Tensor:
        """The weight matrix of ``proj``, shape (out_features, in_features), as stored."""
        if self._fused_module(proj.kind):
            name, rows = self._fused_rows(proj.layer, proj.kind)
            return self.tensor(name)[rows]
        return self.tensor(self._name(proj.layer, proj.kind))


def _safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: the index's shards, or the single model.safetensors; each
    must be a regular file (a FIFO or device would hang the reader)."""
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        weight_map = read_json(index, "safetensors index", MAX_JSON)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ActTailError(f"{index} is not a valid safetensors index (no weight_map of file names)")
        files = sorted({_shard(folder, f, index) for f in weight_map.values()})
        missing = [f.name for f in files if not os.path.exists(f)]
        if missing:
            raise ActTailError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
    elif os.path.lexists(folder / "model.safetensors"):
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ActTailError(f"{folder} has no safetensors weights (model.safetensors or an index)")
    for f in files:
        regular_file(f, "safetensors file")
    return files


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _shard(folder: Path, name: str, index: Path) -> Path:
    """The path of a shard named in the index, which must stay inside the model folder: a relative name
    without '..', and no symlink out of the folder (except into the blobs of an HF hub cache, whose
    snapshot folders are made of such links)."""
    shown = repr(name) if len(name) <= 80 else repr(name[:77] + "...")
    if "\0" in name or not _encodable(name):
        raise ActTailError(f"{index}: shard {shown} is no file name (a NUL or an unpaired surrogate in it)")
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ActTailError(f"{index}: shard {shown} is outside the model folder")
    path, root = folder / name, folder.resolve()
    real = path.resolve()
    hub_blobs = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if not (real.is_relative_to(root) or hub_blobs):
        raise ActTailError(f"{index}: shard {shown} links outside the model folder")
    return path
