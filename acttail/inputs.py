"""What the API verbs take, made into what the stages work on.

A model is a folder (or .safetensors) path, opened as our decoder with the folder's tokenizer, BOS rule and
checkpoint fingerprint, or a model in memory: our decoder (``acttail.load``, which carries its tokenizer) or
a stock transformers causal LM (pass its tokenizer). A text is a fetched name (``c4``, ``wiki``:
``acttail.text``), a ``pathlib.Path`` to a UTF-8 file, the text itself (a string, or strings joined by blank
lines), or token ids (taken as they are). Text becomes token windows in one place (``text_windows``, BOS
first when the tokenizer asks for it: ``tokens.bos_id``), and one text is split into calibration and
held-out windows in one place (``split_windows``). An analysis or a plan is a path or the object.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch

from .analysis import Analysis
from .config import DEVICE
from .errors import ActTailError
from .outputs import check_outputs, same_file
from .plan import Plan
from .sidecar import named_tensors_file, tensors_path
from .runtime import open_model
from .runtime.hf import from_transformers, is_transformers_model
from .runtime.model import Transformer
from .runtime.tokens import bos_id, check_ids, load_tokenizer, text_tokens, tokenizer_bos, windows
from .text import SOURCES, cached_text, read_text

# The files of a model folder that acttail or transformers read (with its safetensors shards).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
               "chat_template.jinja", "model.safetensors.index.json")


def is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


class ModelInput:
    """A model as the verbs use it: ``net`` (our decoder; a transformers model is converted when first
    asked), ``ckpt`` (the checkpoint, when opened from a path), ``device`` (where it runs: ``device`` for a
    path, else where its weights are) and its tokenizer (``tokenizer()``)."""

    def __init__(self, model, device: str | None = None, stream: bool = False, tokenizer=None):
        self.given, self.ckpt, self.folder, self._net = model, None, None, None
        self._tokenizer, self._tok = tokenizer, None
        if is_path(model):
            self.device = device or DEVICE
            self.ckpt, self._net = open_model(model, device=self.device, stream=stream)
            self.folder = self.ckpt.path if self.ckpt.path.is_dir() else self.ckpt.path.parent
            return
        if not (isinstance(model, Transformer) or is_transformers_model(model)):
            raise ActTailError(f"expected a model folder, a transformers causal LM or an acttail model, not "
                               f"{type(model).__name__}")
        if stream:
            raise ActTailError("streaming (one decoder block in memory at a time) needs a model folder")
        self._net = model if isinstance(model, Transformer) else None
        self.device = str(self._weight().device)

    def _weight(self) -> torch.Tensor:
        """A weight that is in memory (the LM head of our decoder, streamed or not)."""
        return next(self.given.parameters()) if self.hf else self.net.output.weight

    @property
    def net(self) -> Transformer:
        if self._net is None:
            self._net = from_transformers(self.given)
        return self._net

    @property
    def hf(self) -> bool:
        """Whether the model is a transformers model (which ``evaluate`` runs as it is)."""
        return self.ckpt is None and is_transformers_model(self.given)

    @property
    def dtype(self) -> str:
        """The dtype of the weights, as eval results name it (float32)."""
        return str(self._weight().dtype).removeprefix("torch.")

    def tokenizer(self) -> tuple:
        """(tokenizer or None, the BOS id every text starts with or None): the tokenizer given (its BOS as
        it encodes), the model folder's (``tokens.bos_id``), or the one ``acttail.load`` gave the model."""
        if self._tok is None:
            if self._tokenizer is not None:
                self._tok = (self._tokenizer, tokenizer_bos(self._tokenizer))
            elif self.folder is not None:
                self._tok = (load_tokenizer(self.folder), bos_id(self.folder))
            else:
                self._tok = (getattr(self.given, "tokenizer", None), getattr(self.given, "bos_id", None))
        return self._tok

    @property
    def vocab_size(self) -> int:
        """How many token ids the model's embedding holds: every id it is given must be below."""
        if self.hf:
            return self.given.get_input_embeddings().num_embeddings
        return self.net.args.vocab_size

    @property
    def fingerprint(self) -> str | None:
        """The checkpoint's fingerprint (opened from a path, or by ``acttail.load``), else None."""
        return self.ckpt.fingerprint if self.ckpt is not None else getattr(self.given, "fingerprint", None)

    def check(self, doc, where: str) -> None:
        """Refuse an analysis made for other weights than the checkpoint opened from a path (a model in memory
        is trusted, as ``acttail.apply`` trusts it: shapes are checked, not fingerprints), and one whose layer
        count or projection shapes are not the model's (an edited file keeps its fingerprint)."""
        if self.ckpt is not None:
            doc.check_model(self.ckpt.fingerprint, where)
        args = self.net.args
        if doc.model["num_layers"] != args.n_layer:
            raise ActTailError(f"{where} is for {doc.model['num_layers']} layers, the model has {args.n_layer}")
        for r in doc.projections:
            got = (args.in_features(r["kind"]), args.out_features(r["kind"]))
            said = (r["in_features"], r["out_features"])
            if got != said:
                raise ActTailError(f"{where}: {r['key']} is {got} (in, out) in the model but {said} in the analysis")

    def plan(self, plan) -> Plan | None:
        """A Plan as given, or read from a path and checked against the checkpoint opened from a path."""
        if plan is None or isinstance(plan, Plan):
            return plan
        return Plan.load(plan, expect_fingerprint=self.ckpt.fingerprint if self.ckpt is not None else None)

    def max_ctx(self, ctx: int) -> int:
        """The longest window the model takes (a transformers config without one: ``ctx``)."""
        if self.hf:
            return getattr(self.given.config, "max_position_embeddings", ctx)
        return self.net.args.max_seq_len

    @property
    def eos_id(self) -> int | None:
        config = self.ckpt.config if self.ckpt is not None else getattr(self.given, "config", None)
        eos = config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None)
        return eos[0] if isinstance(eos, list) else eos

    def ref(self) -> dict:
        """The model as an eval result names it: path, fingerprint, architecture."""
        if self.ckpt is not None:
            return {"path": str(self.given), "fingerprint": self.ckpt.fingerprint,
                    "architecture": self.ckpt.architecture}
        config = getattr(self.given, "config", None)
        arch = (getattr(config, "architectures", None) or [type(self.given).__name__])[0]
        return {"path": None, "fingerprint": self.fingerprint, "architecture": arch}


def analysis_input(analysis, copied: bool = False) -> tuple[Analysis, str]:
    """(the Analysis of a path, an Analysis or its document; a copy when ``copied``, where it came from)."""
    if is_path(analysis):
        return Analysis.load(analysis), str(analysis)
    if isinstance(analysis, dict):
        return Analysis.from_dict(copy.deepcopy(analysis) if copied else analysis), "analysis"
    if isinstance(analysis, Analysis):
        return (Analysis.from_dict(copy.deepcopy(analysis.to_dict())) if copied else analysis), "analysis"
    raise ActTailError(f"expected an analysis (a path or an Analysis), not {type(analysis).__name__}")


def text_ids(model: ModelInput, text, n_tokens: int) -> tuple[torch.Tensor, int | None, str]:
    """(the first ``n_tokens`` token ids of ``text``, the BOS id its windows start with or None, its name), every
    id inside the model's vocabulary (``tokens.check_ids``: token ids given as a tensor of integers)."""
    if torch.is_tensor(text):
        return check_ids(text.flatten()[:n_tokens], model.vocab_size), None, "tokens"
    if isinstance(text, Path) or (isinstance(text, str) and text in SOURCES):
        name, text = str(text), read_text(text)
    elif isinstance(text, str) or (isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
        name, text = "text", text if isinstance(text, str) else "\n\n".join(text)
    else:
        raise ActTailError(f"a text is a name (c4, wiki), a pathlib.Path, a string, a list of strings or a tensor of "
                           f"token ids, not {type(text).__name__}")
    tokenizer, bos = model.tokenizer()
    if tokenizer is None:
        raise ActTailError("text needs a tokenizer: pass tokenizer=... (or token ids)")
    hint = ": is the tokenizer this model's?"
    if bos is not None:
        check_ids([bos], model.vocab_size, "the BOS id", hint)
    ids = text_tokens(tokenizer, text, n_tokens)
    return check_ids(ids, model.vocab_size, f"the token ids of {name}", hint), bos, name


def text_windows(model: ModelInput, text, tokens: int, ctx: int) -> tuple[torch.Tensor, str, int | None]:
    """([n, ctx] windows of the first ``tokens`` tokens of ``text``, its name, the BOS id or None)."""
    ids, bos, name = text_ids(model, text, tokens)
    return windows(ids, ctx, model.max_ctx(ctx), name, bos), name, bos


def split_windows(model: ModelInput, text, tokens: int, held_tokens: int, ctx: int):
    """(calibration windows of the first ``tokens`` tokens of ``text``, held-out windows of the next
    ``held_tokens``, its name): the split ``acttail.tune`` calibrates and judges on."""
    ids, bos, name = text_ids(model, text, tokens + held_tokens)
    if len(ids) < tokens + held_tokens:
        raise ActTailError(f"{name} has {len(ids)} tokens, fewer than the {tokens} calibration + {held_tokens} "
                           "held-out tokens asked for (--tokens + --held-tokens)")
    cal, held = (windows(part, ctx, model.max_ctx(ctx), name, bos) for part in (ids[:tokens], ids[tokens:]))
    return cal, held, name


# ---- the files a verb reads, which its outputs must not replace ---------------------------------------


def refuse_overwrite(outputs, *, model=None, plan=None, analysis=None, text=None, files=()) -> None:
    """Refuse, before any work, an output (what, path) that would replace a file the verb reads: the model's
    files (``model_files``), the plan and its tensors file, the analysis, the text file, and ``files`` (more
    (what, path) pairs: measured greedy or sensitivity files, ...)."""
    inputs = [*model_files(model), *plan_files(plan), *text_files(text), *files]
    if is_path(analysis):
        inputs.append(("the analysis", analysis))
    check_outputs(inputs, outputs)
    refuse_model_files(outputs)


def text_files(text) -> list[tuple[str, Path]]:
    """The file a text stands for: a path given, or a fetched text's cache file (none for text itself)."""
    if isinstance(text, Path) or (isinstance(text, str) and text in SOURCES):
        return [("the text", cached_text(text) if str(text) in SOURCES else text)]
    return []


def refuse_model_files(outputs) -> None:
    """Refuse an output that is a file of a model folder (config.json beside safetensors weights) which the verb
    does not read either: ``acttail allocate ... -o MODEL/config.json`` or ``export --to gemma3n -o
    MODEL/config.json`` would leave that model unreadable."""
    for what, out in outputs:
        if out is None or not (Path(out).parent / "config.json").is_file():
            continue
        folder = Path(out).parent
        found = [f for _, f in model_files(folder)]
        if not any(f.suffix == ".safetensors" for f in found):
            continue  # a config.json without weights beside it: no model
        for f in found:
            if same_file(out, f):
                raise ActTailError(f"{what} {out} would overwrite {f}, a file of the model folder {folder}: choose "
                                   "another output path")


def plan_outputs(out) -> list[tuple[str, Path]]:
    """A plan output as ``refuse_overwrite`` takes it: the plan and the tensors file beside it."""
    return [] if out is None else [("plan", Path(out)), (f"plan {out}'s tensors file", tensors_path(out))]


def model_files(model) -> list[tuple[str, Path]]:
    """The files a model path stands for: a .safetensors or .gguf file and the tokenizer files beside it, or
    a folder's config, tokenizer and generation files, safetensors index and shards (as the checkpoint
    reader finds them)."""
    if not is_path(model):
        return []
    from .checkpoint import _safetensors_files

    path = Path(model)
    folder = path if path.is_dir() else path.parent
    found = [] if path.is_dir() else [path]
    if path.is_dir():
        with contextlib.suppress(ActTailError, OSError):  # a folder the reader refuses is refused when opened
            found += _safetensors_files(path)
    found += [folder / name for name in MODEL_FILES if (folder / name).is_file()]
    return [("model file", f) for f in found]


def plan_files(plan) -> list[tuple[str, Path]]:
    """A plan path and the tensors file it names beside it (when it can be read)."""
    if not is_path(plan):
        return []
    named = named_tensors_file(plan)
    return [("the plan", Path(plan))] + ([("the plan's tensors file", named)] if named is not None else [])
