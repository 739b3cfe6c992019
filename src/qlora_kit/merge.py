"""Merge stage: fold the LoRA adapter into the base; write a complete Hugging Face model folder.

    qlora-kit merge --recipe tiny          (dvc: merge@tiny)

Reads `models/NAME/base`, `models/NAME/adapter` and the validation rows in `data/NAME/processed`;
writes `models/NAME/merged` and `reports/NAME/merge_parity.json`. The merged folder is a complete
model: the base's safetensors shards and index (same sharding, same tensor names), config.json
(dtype = `merge.dtype`), the tokenizer with a chat template that renders the recipe's inference
prompt (BOS included when the recipe adds one), generation_config.json with the recipe's BOS/EOS/pad
ids, a model card README.md and manifest.json.

Base choice (`merge.base`): `original` merges into the 16/32-bit base weights; `nf4-roundtrip`
merges into the weights the adapter was trained against: every weight bitsandbytes quantized during
training goes through the same NF4/FP4 quantize -> dequantize first (`bitsandbytes.functional`).

Method (`merge.method`):
- `shardwise` (default): one safetensors shard after the other, and inside a shard one tensor
  after the other: read it, add W += (alpha / r) * B @ A where the adapter has a LoRA for it (in
  fp32, cast once to `merge.dtype`), write it, free it. Peak memory is the adapter plus a few
  copies of the largest tensor, less than one shard, so a 13B base (26 GB in fp16, 10 GB shards)
  merges on a 24 GB machine (bench/merge_memory.py measures it against `peft`). Written here
  because peft has no shard-wise merge.
- `peft`: load the whole model, peft's `merge_and_unload()`, written in the base's sharding. For
  cross-checking; needs about 2 bytes x params of RAM.

Parity: the merged model's logits vs base + adapter (unmerged, peft, fp32) on `merge.parity_rows`
held-out rows; the stage fails above `merge.max_rel_error`. The reference needs the whole model in
fp32 in RAM; where it does not fit, the logit check is skipped and says why in merge_parity.json.
Either way the LoRA delta of the first module of every shard is recomputed by peft's own layer
code and compared with ours (`modules` in merge_parity.json).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Recipe

ADAPTER_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# peft options that change the merge formula (or what is trained) beyond W += alpha/r * B @ A
UNSUPPORTED = {"use_dora": "DoRA", "use_rslora": "rsLoRA (alpha / sqrt(r) scaling)", "lora_bias": "lora_bias",
               "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
               "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
               "layer_replication": "layer_replication", "use_qalora": "QA-LoRA",
               # LoRA variants whose forward is not W x + s B A x
               "arrow_config": "Arrow", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
               "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA"}


class MergeError(RuntimeError):
    """The base or the adapter cannot be merged as asked; the message says which file and tensor."""


class MergeParityError(MergeError):
    """The merged model does not reproduce base+adapter within the recipe's threshold."""


# --- the adapter ---------------------------------------------------------------------------------

@dataclass
class LoraFactors:
    a: Any  # Linear: lora_A (r, in); Embedding: lora_embedding_A (r, num_embeddings)
    b: Any  # Linear: lora_B (out, r); Embedding: lora_embedding_B (dim, r)
    kind: str  # "linear" | "embedding"


@dataclass
class Adapter:
    """A PEFT LoRA adapter, keyed by tensor name: the model's parameter names as peft saved them,
    until `to_checkpoint_names` renames them to the base checkpoint's."""

    path: Path
    config: dict[str, Any]
    scale: float
    fan_in_fan_out: bool
    lora: dict[str, LoraFactors] = field(default_factory=dict)  # "<module>.weight" -> factors
    replace: dict[str, Any] = field(default_factory=dict)  # modules_to_save and trained biases

    def delta(self, key: str) -> Any:
        """The fp32 update for base tensor `key` (its shape), as peft's get_delta_weight computes it."""
        f = self.lora[key]
        d = f.b.float() @ f.a.float()
        if f.kind == "embedding":
            d = d.T  # peft: transpose(lora_embedding_B @ lora_embedding_A, True)
        elif self.fan_in_fan_out:
            d = d.T  # Conv1D-style weights are stored (in, out)
        return d * self.scale

    def to_checkpoint_names(self, names: dict[str, str]) -> None:
        """Rename model parameter names to the checkpoint's; refuse names the model does not have."""
        unknown = sorted(k for k in (*self.lora, *self.replace) if k not in names)
        if unknown:
            raise MergeError(f"{self.path}: the adapter updates tensors the base checkpoint does not have: "
                             f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''} (tied embeddings, or an adapter "
                             "for another model)")
        self.lora = {names[k]: v for k, v in self.lora.items()}
        self.replace = {names[k]: v for k, v in self.replace.items()}

    def summary(self) -> dict[str, Any]:
        c = self.config
        return {"r": c["r"], "lora_alpha": c["lora_alpha"], "scale": self.scale, "bias": c.get("bias", "none"),
                "fan_in_fan_out": self.fan_in_fan_out, "lora_modules": len(self.lora),
                "replaced_tensors": sorted(self.replace), "modules_to_save": c.get("modules_to_save") or []}


def read_adapter(path: Path) -> Adapter:
    """Read adapter_config.json + adapter_model.safetensors; refuse what the formula cannot express."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise MergeError(f"{path}: no adapter_config.json; run `qlora-kit train` first")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise MergeError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    bad = [name for key, name in UNSUPPORTED.items() if cfg.get(key) not in (None, False, {}, [], "")]
    if bad:
        raise MergeError(f"{cfg_file}: {', '.join(bad)} not supported by the merge stage "
                         "(it computes W += lora_alpha / r * B @ A only)")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise MergeError(f"{cfg_file}: bias {cfg.get('bias')!r} is not one of none, all, lora_only")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise MergeError(f"{path}: no adapter_model.safetensors (pickled adapters are not read)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    ad = Adapter(path=path, config=cfg, scale=alpha / r, fan_in_fan_out=bool(cfg.get("fan_in_fan_out")))
    parts: dict[str, dict[str, Any]] = {}
    for key, t in load_file(str(weights)).items():
        if not key.startswith(ADAPTER_PREFIX):
            raise MergeError(f"{weights}: tensor {key!r} does not start with {ADAPTER_PREFIX!r}")
        name = key[len(ADAPTER_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            module, which = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            parts.setdefault(module, {})[which] = t
        elif ".lora_" in name:
            raise MergeError(f"{weights}: unsupported LoRA tensor {key!r}")
        else:
            # modules_to_save (saved under the plain module name) and biases trained with bias
            # all / lora_only (a wrapped layer's bias is saved as `<module>.base_layer.bias`)
            ad.replace[name.replace(".base_layer.", ".")] = t
    for module, p in parts.items():
        kind = "embedding" if "lora_embedding_A" in p or "lora_embedding_B" in p else "linear"
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if kind == "embedding" else (
            p.get("lora_A"), p.get("lora_B"))
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise MergeError(f"{weights}: {module}: expected 2-D A (r={r}, in) and B (out, r={r}); got "
                             f"{None if a is None else tuple(a.shape)} and {None if b is None else tuple(b.shape)}")
        ad.lora[f"{module}.weight"] = LoraFactors(a=a, b=b, kind=kind)
    if not ad.lora:
        raise MergeError(f"{weights}: no LoRA tensors")
    return ad


# --- the base ------------------------------------------------------------------------------------

def weight_shards(base: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The base's safetensors files in order, and its index (None for a single file)."""
    base = Path(base)
    if (base / INDEX).is_file():
        index = json.loads((base / INDEX).read_text(encoding="utf-8"))
        files = list(dict.fromkeys(index["weight_map"].values()))
        missing = [f for f in files if not (base / f).is_file()]
        if missing:
            raise MergeError(f"{base / INDEX} names shards that are not there: {missing}")
        return files, index
    if (base / SINGLE).is_file():
        return [SINGLE], None
    raise MergeError(f"{base}: no {SINGLE} or {INDEX}; merge.method shardwise reads safetensors only "
                     "(a pickle-only base can be merged with merge.method: peft)")


def tensor_shapes(base: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor, from the safetensors headers (no data read)."""
    from safetensors import safe_open

    out = {}
    for f in weight_shards(base)[0]:
        with safe_open(str(Path(base) / f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _meta_model(base: Path, trust_remote_code: bool):
    """The model class instantiated on the meta device: names and module types, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def checkpoint_names(base: Path, trust_remote_code: bool = False) -> dict[str, str]:
    """Model parameter name -> checkpoint tensor name, as transformers renames keys on load.

    transformers 5 renames some checkpoint keys when it loads them (GPT-NeoX's `embed_out` is
    `lm_head` in the model; conversion_mapping.py), and peft names adapter tensors after the model.
    Same calls as `from_pretrained` (core_model_loading.py); a key that a WeightConverter rebuilds
    (fused experts and the like) cannot be merged tensor by tensor, and is refused.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = _meta_model(base, trust_remote_code)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out: dict[str, str] = {}
    for key in tensor_shapes(base):
        name, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:
            name, converted = rename_source_key(key, [], [], prefix, meta)
        if converted is not None:
            raise MergeError(f"{base}: transformers rebuilds {key} on load ({converted!r}); merge.method shardwise "
                             "merges tensor by tensor and cannot; use merge.method: peft")
        out[name] = key
    return out


def nf4_quantized_weights(base: Path, trust_remote_code: bool = False) -> set[str]:
    """The model parameters transformers' bitsandbytes 4-bit loading quantizes for this model.

    The same selection as `quantizer_bnb_4bit` in this transformers version: every nn.Linear (or
    Conv1D) except `get_keys_to_not_convert` (the output embedding and tied weights) and the model's
    `_keep_in_fp32_modules`, found on a meta-device copy of the model (no weights loaded).
    """
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = _meta_model(base, trust_remote_code)
    skip = list(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
    return {f"{name}.weight" for name, mod in model.named_modules()
            if (type(mod) is torch.nn.Linear or isinstance(mod, Conv1D)) and should_convert_module(name, skip)}


def nf4_roundtrip(w: Any, recipe: Recipe) -> Any:
    """What a weight becomes in a 4-bit bitsandbytes model: cast to the compute dtype (train.py loads
    the base with dtype=quant.compute_dtype), quantize with the recipe's type and double quant and
    bitsandbytes' default block size 64 (what transformers uses), dequantize."""
    import torch
    from bitsandbytes import functional as bnbf

    q = recipe.quant
    x = w.to(getattr(torch, q.compute_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=q.double_quant,
                                       quant_type=q.quant_type, quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state)


# --- shard-wise merge ----------------------------------------------------------------------------

def merged_tensor(key: str, t: Any, adapter: Adapter, roundtrip: set[str], recipe: Recipe, dtype: Any) -> Any:
    """One output tensor: replaced, NF4-round-tripped and/or LoRA-updated, cast to `dtype`."""
    if key in adapter.replace:
        new = adapter.replace[key]
        if tuple(new.shape) != tuple(t.shape):
            raise MergeError(f"{adapter.path}: {key} has shape {tuple(new.shape)}, the base {tuple(t.shape)}")
        t = new
    elif key in roundtrip:
        t = nf4_roundtrip(t, recipe)
    if key in adapter.lora:
        d = adapter.delta(key)
        if tuple(d.shape) != tuple(t.shape):
            raise MergeError(f"{adapter.path}: LoRA update for {key} has shape {tuple(d.shape)}, the base tensor "
                             f"{tuple(t.shape)}")
        t = t.float() + d
    return t.to(dtype) if t.is_floating_point() else t


def peft_delta(adapter: Adapter, key: str) -> Any:
    """The same update computed by peft's own LoRA layer (`get_delta_weight`), for cross-checking."""
    import torch
    from peft import LoraConfig
    from peft.tuners import lora

    f = adapter.lora[key]
    cfg = LoraConfig.from_pretrained(str(adapter.path))
    cfg.init_lora_weights, cfg.lora_dropout = False, 0.0
    kw = dict(config=cfg, r=f.a.shape[0], lora_alpha=cfg.lora_alpha)
    with torch.device("meta"):  # the base weight itself is not needed, only its shape
        if f.kind == "embedding":
            layer = lora.Embedding(torch.nn.Embedding(f.a.shape[1], f.b.shape[0]), "default", **kw)
        else:
            shape = (f.b.shape[0], f.a.shape[1])
            layer = lora.Linear(torch.nn.Linear(shape[1], shape[0], bias=False), "default", **kw)
    if f.kind == "embedding":
        layer.lora_embedding_A["default"] = torch.nn.Parameter(f.a.float())
        layer.lora_embedding_B["default"] = torch.nn.Parameter(f.b.float())
    else:
        layer.lora_A["default"].weight = torch.nn.Parameter(f.a.float())
        layer.lora_B["default"].weight = torch.nn.Parameter(f.b.float())
    with torch.no_grad():
        return layer.get_delta_weight("default")


# safetensors files, one tensor at a time. Written here, not with the safetensors package,
# because of memory: `safe_open` maps the file and every page read stays resident in this process
# until the file is closed, and `save_file` takes a dict of the whole shard, so merging one shard
# with them holds it two or three times (measured: bench/merge_memory.py). Llama-2-13B ships 10 GB
# shards, which would not fit on a 24 GB machine. The format is a little-endian u64 header length,
# a JSON header (dtype, shape, data_offsets relative to the data) and the raw bytes.
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _libc_trim():
    """glibc's malloc_trim, or a no-op. Tensors under glibc's mmap threshold (up to 32 MiB) come
    from the heap, which keeps freed pages: a merge that frees one 16-23 MiB temporary after the
    other grew by several hundred MiB of them. Trimming after each tensor keeps the peak at about
    the largest tensor (bench/merge_memory.py)."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


def read_st_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def read_st_tensor(f: Any, data_start: int, spec: dict[str, Any]) -> Any:
    import torch

    begin, end = spec["data_offsets"]
    dtype = getattr(torch, ST_DTYPES[spec["dtype"]])
    if end == begin:
        return torch.empty(spec["shape"], dtype=dtype)
    buf = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise MergeError(f"{f.name}: truncated tensor data")
    return torch.frombuffer(buf, dtype=dtype).reshape(spec["shape"])


def merge_shardwise(recipe: Recipe, base: Path, adapter: Adapter, out: Path) -> dict[str, Any]:
    """Write the merged safetensors shards (and index) of `base` + `adapter` into `out`, one shard
    after the other and, inside a shard, one tensor after the other (read, merge, write, free)."""
    import sys

    import torch

    if sys.byteorder != "little":
        raise MergeError("safetensors data is little-endian; this machine is not")
    files, index = weight_shards(base)
    dtype = getattr(torch, recipe.merge.dtype)
    st_name = {v: k for k, v in ST_DTYPES.items()}
    trust = recipe.model.trust_remote_code
    names = checkpoint_names(base, trust)
    adapter.to_checkpoint_names(names)
    roundtrip = ({names[k] for k in nf4_quantized_weights(base, trust)}
                 if recipe.merge.base == "nf4-roundtrip" else set())
    shards, checks = [], []
    trim = _libc_trim()
    for name in files:
        header, data_start = read_st_header(base / name)
        metadata = header.pop("__metadata__", None) or {}
        unknown = {v["dtype"] for v in header.values()} - ST_DTYPES.keys()
        if unknown:
            raise MergeError(f"{base / name}: tensor dtypes {sorted(unknown)} are not read by the shard-wise merge")
        keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])  # file order: sequential reads
        plan, offset = {}, 0
        for k in keys:  # the output header up front: same names and shapes, floats in merge.dtype
            t_dtype = getattr(torch, ST_DTYPES[header[k]["dtype"]])
            o_dtype = dtype if t_dtype.is_floating_point else t_dtype
            size = math.prod(header[k]["shape"]) * o_dtype.itemsize
            plan[k] = {"dtype": st_name[str(o_dtype).removeprefix("torch.")], "shape": header[k]["shape"],
                       "data_offsets": [offset, offset + size]}
            offset += size
        head = json.dumps({"__metadata__": {**metadata, "format": "pt"}, **plan}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)  # data aligned to 8 bytes, as safetensors writes it
        with open(base / name, "rb") as src, open(out / name, "wb") as dst:
            dst.write(len(head).to_bytes(8, "little") + head)
            for k in keys:
                t = merged_tensor(k, read_st_tensor(src, data_start, header[k]), adapter, roundtrip, recipe, dtype)
                t = t.contiguous()
                if list(t.shape) != plan[k]["shape"] or t.numel() * t.element_size() != (
                        plan[k]["data_offsets"][1] - plan[k]["data_offsets"][0]):
                    raise MergeError(f"{base / name}: {k}: merged tensor {tuple(t.shape)} {t.dtype} does not match "
                                     f"the planned {plan[k]}")
                if t.numel():
                    dst.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if k in adapter.lora and not any(c["shard"] == name for c in checks):
                    ours, theirs = adapter.delta(k), peft_delta(adapter, k)
                    checks.append({"shard": name, "tensor": k, "max_abs_diff": float((ours - theirs).abs().max()),
                                   "max_abs_delta": float(theirs.abs().max())})
                del t
                trim()
        shards.append({"file": name, "tensors": len(keys), "lora_modules": sum(k in adapter.lora for k in keys),
                       "replaced": sum(k in adapter.replace for k in keys),
                       "nf4_roundtrip": sum(k in roundtrip for k in keys)})
    if index is not None:
        write_index(out, index)
    return {"shards": shards, "module_checks": checks, "nf4_roundtrip_tensors": len(roundtrip)}


def write_index(out: Path, index: dict[str, Any]) -> None:
    """The base's index with total_size recomputed for the merged files."""
    from .artifacts import write_json

    total = sum(_tensor_bytes(out / f) for f in dict.fromkeys(index["weight_map"].values()))
    write_json(out / INDEX, {**index, "metadata": {**index.get("metadata", {}), "total_size": total}})


def _tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


# --- peft merge (for checking) -------------------------------------------------------------------

def load_base_for_merge(recipe: Recipe, path: Path, dtype: Any = None):
    """The base as training saw it: the original weights, or the 4-bit model dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .model_safety import check

    check(path, recipe.model)  # no pickle weights, no model-shipped code unless the recipe opts in
    dtype = dtype or getattr(torch, recipe.merge.dtype)
    common = dict(trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not recipe.model.allow_pickle or None)
    if recipe.merge.base == "original":
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **common)
    q = recipe.quant
    if q.bits != 4:
        raise MergeError(f"merge.base nf4-roundtrip needs quant.bits 4 (got {q.bits})")
    compute = getattr(torch, q.compute_dtype)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                            bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=compute)
    # loaded as train.py loads it (dtype = compute dtype), so the 4-bit codes are the trained-against ones
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qc, device_map={"": "cpu"},
                                                 dtype=compute, **common)
    model = model.dequantize()
    return model.to(dtype)


def merge_peft(recipe: Recipe, base: Path, adapter: Path, out: Path) -> dict[str, Any]:
    """peft's merge_and_unload on the whole model, written in the base's sharding."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    files, index = weight_shards(base)
    names = checkpoint_names(base, recipe.model.trust_remote_code)
    model = PeftModel.from_pretrained(load_base_for_merge(recipe, base), str(adapter)).merge_and_unload()
    state = {names[k]: v for k, v in model.state_dict().items() if k in names}  # checkpoint names
    dtype = getattr(torch, recipe.merge.dtype)
    shards = []
    for name in files:
        with safe_open(str(base / name), framework="pt") as st:
            keys, metadata = list(st.keys()), st.metadata() or {}
            # tensors the model does not keep (unused buffers of old checkpoints) pass through
            tensors = {k: (state[k].detach().to(dtype).contiguous() if state[k].is_floating_point()
                           else state[k].contiguous()) if k in state else st.get_tensor(k) for k in keys}
        save_file(tensors, str(out / name), metadata={**metadata, "format": "pt"})
        shards.append({"file": name, "tensors": len(tensors), "from_model": sum(k in state for k in keys)})
    if index is not None:
        write_index(out, index)
    del model, state
    return {"shards": shards}


# --- the rest of the folder ----------------------------------------------------------------------

def hf_chat_template(recipe: Recipe, tok: Any) -> str:
    """templates.chat_template plus the BOS the recipe adds as an id: as text at the start, the way
    Llama-2's own chat template starts with `bos_token`, so apply_chat_template(tokenize=True),
    llama-cpp-python (which tokenizes a rendered template without adding BOS) and llama.cpp's
    server (which strips a leading BOS text when it adds one itself) all get exactly one BOS."""
    from .templates import chat_template

    lead = ""
    if recipe.template.add_bos:
        lead = "{{ '" + tok.bos.replace("\\", "\\\\").replace("'", "\\'") + "' }}"
    return lead + chat_template(recipe.template, bos=tok.bos, eos=tok.eos)


def write_tokenizer(recipe: Recipe, base: Path, out: Path) -> dict[str, Any]:
    """Save the recipe's tokenizer (special-token policy applied) with its chat template and an
    explicit add_bos_token / add_eos_token, which llama.cpp's converter copies into the GGUF; then
    check, on the saved folder, that the chat template tokenizes exactly as training did.

    Sentencepiece (Metaspace) tokenizers are saved with `legacy: true`: transformers 5's default
    (`legacy: false`, Metaspace prepend_scheme "first") gives text right after a special token no
    "▁" prefix, so the chat template's leading BOS text would turn "<s>Below" into [<s>, "Below"]
    where training had [<s>, "▁Below"] (BOS id + the prompt tokenized on its own; sentencepiece,
    the 2023 sources and llama.cpp all put the "▁" there). Text with no special token inside, which
    is all the kit ever tokenizes for training, comes out the same either way.
    """
    from .templates import render_inference
    from .tokenizer import load_tokenizer

    trust = recipe.model.trust_remote_code
    tok = load_tokenizer(base, recipe.template, trust_remote_code=trust)
    tok.hf.chat_template = hf_chat_template(recipe, tok)
    for attr, value in (("add_bos_token", recipe.template.add_bos), ("add_eos_token", False)):
        if hasattr(tok.hf, attr):
            try:
                setattr(tok.hf, attr, value)  # Llama: also rewrites the post-processor
            except (AttributeError, ValueError):
                pass
    tok.hf.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(add_bos_token=recipe.template.add_bos, add_eos_token=False)
    pre = getattr(getattr(tok.hf, "backend_tokenizer", None), "pre_tokenizer", None)
    if type(pre).__name__ == "Metaspace":
        cfg["legacy"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for extra in ("tokenizer.model",):  # llama.cpp's converter reads the sentencepiece model
        if (base / extra).exists() and not (out / extra).exists():
            shutil.copyfile(base / extra, out / extra)

    saved = load_tokenizer(out, recipe.template, trust_remote_code=trust)
    for row in ({"instruction": "Below is 3 + 4?", "input": ""}, {"instruction": "번역하세요", "input": "Good morning"}):
        msg = [{"role": "user", "content": row["instruction"], "input": row["input"]}]
        got = saved.hf.apply_chat_template(msg, tokenize=True, add_generation_prompt=True)
        got = list(got["input_ids"] if hasattr(got, "keys") else got)
        want = ([tok.bos_id] if recipe.template.add_bos else []) + tok.encode(
            render_inference(recipe.template, row, bos=tok.bos, eos=tok.eos))
        if got != want:
            raise MergeError(f"{out}: the chat template tokenizes to {got[:24]}, training would give {want[:24]} "
                             f"(row {row})")
    return {"bos_id": tok.bos_id if recipe.template.add_bos else None, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "bos": tok.bos if recipe.template.add_bos else "", "eos": tok.eos, "add_bos": recipe.template.add_bos}


def write_config(recipe: Recipe, base: Path, out: Path) -> None:
    """The base's config with dtype = merge.dtype (and remote code files, if the recipe trusts them)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(base), trust_remote_code=recipe.model.trust_remote_code)
    cfg.dtype = recipe.merge.dtype
    cfg.save_pretrained(str(out))
    if recipe.model.trust_remote_code:
        for py in base.glob("*.py"):
            shutil.copyfile(py, out / py.name)


def write_generation_config(out: Path, ids: dict[str, Any]) -> dict[str, Any]:
    """Only the token ids: sampling stays the recipe's (eval section, Modelfile), and HF's generate
    must not inherit a base model's sampling defaults (Llama-2-chat ships do_sample with T=0.6)."""
    gen = {k: v for k, v in (("bos_token_id", ids["bos_id"]), ("eos_token_id", ids["eos_id"]),
                             ("pad_token_id", ids["pad_id"])) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    return gen


def _yaml_scalar(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def model_card(recipe: Recipe, ids: dict[str, Any], parity: dict[str, Any], adapter: Adapter,
               base_facts: dict[str, Any], train_facts: dict[str, Any]) -> str:
    """README.md: Hub metadata (front matter) and what a user needs to reproduce and prompt it."""
    from .templates import render_inference

    m, d, src, tpl = recipe.model, recipe.data, recipe.source, recipe.template
    datasets = [d.hub_dataset] if d.source == "hub" and d.hub_dataset else []
    tags = ["qlora-kit", "qlora", "lora", "merged", m.arch.replace("_", "-"), recipe.name]
    front = ["---", f"base_model: {_yaml_scalar(m.name)}", "datasets:" + ("" if datasets else " []")]
    front += [f"- {_yaml_scalar(x)}" for x in datasets]
    front += [f"license: {_yaml_scalar(recipe.merge.license or 'other')}", "library_name: transformers",
              "pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_scalar(t)}" for t in tags] + ["---", ""]

    t = adapter.config.get("target_modules") or []
    # peft stores `all-linear` expanded to full module paths: name the module kinds
    targets = ", ".join(sorted({x.rsplit(".", 1)[-1] for x in t})) if isinstance(t, list) else str(t)
    model_rev = base_facts.get("resolved_commit") or m.revision or ("built from seed "
                                                                    f"{m.tiny.seed}" if m.source == "tiny" else "")
    if d.source == "url":
        data_line = f"`{d.url}` (sha256 `{d.sha256 or 'not pinned'}`)"
    elif d.source == "hub":
        data_line = f"Hub dataset `{d.hub_dataset}` @ `{d.hub_revision or 'main'}`, file `{d.path}`"
    else:
        data_line = {"tiny-sample": "the kit's shipped tiny sample (src/qlora_kit/assets/tiny)"}.get(d.source, d.path)
    L = [f"# {recipe.name} (merged QLoRA fine-tune)", "", recipe.description, "",
         "Built by qlora-kit from `recipes/" + recipe.name + ".yaml`: the LoRA adapter "
         "trained by the recipe, merged into the base weights. Every number below was measured when this "
         "folder was written.", "", "## Provenance", "",
         f"- Source reproduced: " + (f"`{src.repo}@{src.commit}`" if src.repo else "none (kit smoke recipe)"),
         *([f"- Source files: {', '.join('`' + f + '`' for f in src.files)}"] if src.files else []),
         f"- Base model: `{m.name}` ({model_rev or 'revision not pinned'})",
         f"- Data: {data_line}",
         f"- Quantization during training: {recipe.quant.bits}-bit"
         + (f" {recipe.quant.quant_type}, double quant {recipe.quant.double_quant}, compute "
            f"{recipe.quant.compute_dtype}" if recipe.quant.bits == 4 else ""),
         f"- LoRA: r={adapter.config['r']}, alpha={adapter.config['lora_alpha']}, dropout "
         f"{adapter.config.get('lora_dropout')}, bias {adapter.config.get('bias', 'none')}, on {targets}",
         ]
    derived = train_facts.get("derived") or {}
    final = train_facts.get("final") or {}
    if derived:
        L.append(f"- Training: {final.get('global_step', derived.get('total_steps'))} optimizer steps, effective "
                 f"batch {derived.get('effective_batch')}, final train loss "
                 f"{final.get('train_loss') if final.get('train_loss') is None else round(final['train_loss'], 4)}")
    logits = parity.get("logits") or {}
    L += [f"- Merge: `{recipe.merge.method}` into the `{recipe.merge.base}` base weights, saved as "
          f"{recipe.merge.dtype}",
          "- Parity, merged vs base + adapter: " + (
              f"max relative logit error {logits['max_rel_error']:.2e}, mean {logits['mean_rel_error']:.2e}, "
              f"top-1 agreement {logits['top1_agreement']:.1%} on {logits['rows']} "
              f"{'held-out' if parity.get('split') == 'val' else 'training'} rows "
              f"(threshold {recipe.merge.max_rel_error})" if logits.get("checked") else
              f"logits not compared ({logits.get('skipped', 'n/a')})"), ""]

    example = {"instruction": "<instruction>", "input": "", "output": ""}
    prompt = render_inference(tpl, example, bos=ids["bos"], eos=ids["eos"])
    L += ["## Prompt format", "",
          "The tokenizer's chat template renders exactly the recipe's inference prompt (the one the source "
          "prompted with; `qlora-kit render --recipe " + recipe.name + "` shows it per row). One user message; its "
          "`content` is the instruction and an optional `input` key carries the Alpaca input:", "",
          "```python",
          'tok.apply_chat_template([{"role": "user", "content": "...", "input": ""}], tokenize=False)',
          "```", "", "renders (BOS " + (f"`{ids['bos']}` first, as text" if ids["add_bos"] else "none") + "):", "",
          "```", (ids["bos"] if ids["add_bos"] else "") + prompt, "```", "",
          f"EOS: `{ids['eos']}` (id {ids['eos_id']}); pad id {ids['pad_id']}"
          + (f"; BOS `{ids['bos']}` (id {ids['bos_id']})" if ids["add_bos"] else "; no BOS") + ".", ""]
    L += ["## Quirks in force", ""]
    if recipe.quirks:
        L += ["Where the source's code did something its README did not say, the recipe reproduces the code "
              "and names the difference; `fix: true` switches to the corrected behaviour.", "",
              "| quirk | state | what | source |", "|---|---|---|---|"]
        for name, q in recipe.quirks.items():
            cell = lambda s: " ".join(str(s).split()).replace("|", "\\|")  # noqa: E731
            L.append(f"| `{name}` | {'fixed' if q.fix else 'reproduced (as the source did)'} | "
                     f"{cell(q.description)} | {cell(q.cite)} |")
    else:
        L.append("None: this recipe reproduces no source.")
    L.append("")
    return "\n".join(front + L)


# --- parity --------------------------------------------------------------------------------------

def logits_on(model, rows: list[dict[str, Any]]):
    import torch

    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            out.append(model(input_ids=ids).logits.float()[0])
    return out


def parity(a: list, b: list) -> dict[str, float]:
    """max and mean relative logit error of b against a (relative to a's largest |logit|)."""
    max_rel, mean_rel, top1 = 0.0, 0.0, 0.0
    for x, y in zip(a, b):
        scale = x.abs().max().clamp_min(1e-6)
        d = (x - y).abs()
        max_rel = max(max_rel, float(d.max() / scale))
        mean_rel += float(d.mean() / scale)
        top1 += float((x.argmax(-1) == y.argmax(-1)).float().mean())
    n = max(len(a), 1)
    return {"max_rel_error": max_rel, "mean_rel_error": mean_rel / n, "top1_agreement": top1 / n, "rows": len(a)}


def fits_in_memory(n_params: int, bytes_per_param: int = 4, copies: float = 1.25) -> tuple[bool, dict[str, int]]:
    """Whether a whole model of n_params (fp32 by default) fits in the RAM available now."""
    import psutil

    need = int(n_params * bytes_per_param * copies) + (1 << 30)  # + interpreter, activations
    avail = int(psutil.virtual_memory().available)
    return need <= avail, {"need_bytes": need, "available_bytes": avail}


def logit_parity(recipe: Recipe, base: Path, adapter: Path, merged: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merged (fp32) vs base + adapter unmerged (peft, fp32), one model in memory at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    n_params = sum(math.prod(s) for s, _ in tensor_shapes(base).values())
    ok, mem = fits_in_memory(n_params)
    if not ok:
        return {"checked": False, "skipped": f"the fp32 model needs ~{mem['need_bytes'] / 2**30:.1f} GiB, "
                f"{mem['available_bytes'] / 2**30:.1f} GiB available", **mem}
    merged_model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32,
                                                        trust_remote_code=recipe.model.trust_remote_code).eval()
    after = logits_on(merged_model, rows)
    del merged_model
    ref = PeftModel.from_pretrained(load_base_for_merge(recipe, base, torch.float32), str(adapter)).eval()
    before = logits_on(ref, rows)
    del ref
    return {"checked": True, **parity(before, after), "reference": "base + adapter (peft, unmerged, fp32)", **mem}


def parity_rows(processed: Path, n: int) -> tuple[list[dict[str, Any]], str]:
    """The first n validation rows; the first n training rows where the recipe holds none out
    (komt and polyglot-koalpaca train on everything, as their sources did: val_ratio 0)."""
    from .preprocess import read_split
    from .rows import DataError

    rows = read_split(processed, "val")[:n]
    if rows:
        return rows, "val"
    rows = read_split(processed, "train")[:n]
    if not rows:
        raise DataError(f"{processed}: no rows in val.jsonl or train.jsonl to check parity on")
    return rows, "train (no validation rows: preprocess.val_ratio is 0)"


def peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def run(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from . import layout, model_safety
    from .artifacts import StageRun, atomic_dir, write_json
    from .rows import DataError

    paths = layout.paths(recipe.name)
    mg = recipe.merge
    st = StageRun("merge", recipe, overrides)
    model_safety.check(paths.base, recipe.model)  # shardwise reads the base without from_pretrained
    if not (paths.adapter / "adapter_config.json").is_file():
        raise DataError(f"{paths.adapter}: no adapter; run `qlora-kit train --recipe {recipe.name}` first")
    if not (paths.processed / "train.jsonl").is_file():
        raise DataError(f"{paths.processed}: no processed data; run `qlora-kit preprocess --recipe "
                        f"{recipe.name}` first")
    if mg.base == "nf4-roundtrip" and recipe.quant.bits != 4:
        raise MergeError(f"merge.base nf4-roundtrip needs quant.bits 4 (got {recipe.quant.bits})")
    st.add_input("adapter", paths.adapter)
    st.add_input("base", paths.base)
    rows, split = parity_rows(paths.processed, mg.parity_rows)
    adapter = read_adapter(paths.adapter)
    base_facts = _json_or_empty(paths.base / "fetch_manifest.json").get("facts", {}).get("model", {})
    train_facts = _json_or_empty(paths.adapter / "manifest.json").get("facts", {})
    torch.manual_seed(0)
    st.lap("read")

    with atomic_dir(paths.merged) as tmp:
        if mg.method == "shardwise":
            weights = merge_shardwise(recipe, paths.base, adapter, tmp)
        else:
            weights = merge_peft(recipe, paths.base, paths.adapter, tmp)
        weights["peak_rss_mib_after_weights"] = peak_rss_mib()
        st.lap("merge_weights")
        write_config(recipe, paths.base, tmp)
        ids = write_tokenizer(recipe, paths.base, tmp)
        gen = write_generation_config(tmp, ids)
        st.lap("folder")

        checks = weights.get("module_checks", [])
        worst = max((c["max_abs_diff"] / max(c["max_abs_delta"], 1e-12) for c in checks), default=0.0)
        par: dict[str, Any] = {
            "method": mg.method, "base": mg.base, "dtype": mg.dtype, "threshold": mg.max_rel_error,
            "logits": logit_parity(recipe, paths.base, paths.adapter, tmp, rows),
            "modules": {"checked": len(checks), "against": "peft LoRA layer get_delta_weight",
                        "max_rel_diff": worst, "detail": checks},
        }
        lg = par["logits"]
        # top-level numbers as evaluate's report reads them
        par.update({k: lg.get(k) for k in ("max_rel_error", "mean_rel_error", "top1_agreement")},
                   rows=lg.get("rows", 0), split=split)
        par["passed"] = (not lg["checked"] or lg["max_rel_error"] <= mg.max_rel_error) and worst <= 1e-5
        st.lap("parity")
        write_json(paths.reports / "merge_parity.json", par)
        if not par["passed"]:
            why = (f"max relative logit error {lg['max_rel_error']:.3g} > merge.max_rel_error {mg.max_rel_error}"
                   if lg["checked"] and lg["max_rel_error"] > mg.max_rel_error else
                   f"our LoRA update differs from peft's by {worst:.3g} (relative)")
            raise MergeParityError(f"merge parity failed: {why} (see {paths.reports / 'merge_parity.json'})")
        (tmp / "README.md").write_text(model_card(recipe, ids, par, adapter, base_facts, train_facts),
                                       encoding="utf-8")
        st.facts.update(merge={"method": mg.method, "base": mg.base, "dtype": mg.dtype, "adapter": adapter.summary(),
                               **{k: v for k, v in weights.items() if k != "module_checks"}},
                        parity={k: v for k, v in par.items() if k != "modules"} | {
                            "modules": {k: v for k, v in par["modules"].items() if k != "detail"}},
                        special_ids=ids, generation_config=gen, peak_rss_mib=peak_rss_mib())
        write_json(tmp / "manifest.json", st.manifest())
    st.lap("save")
    return st.facts


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
