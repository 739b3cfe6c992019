"""LoRA adapters folded into base weights: read the adapter, merge shard-wise or with peft."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from qlora_kit.config import Recipe
from qlora_kit.errors import MergeError
from qlora_kit.weights.safetensors_io import ST_DTYPES, libc_trim, read_st_header, read_st_tensor, tensor_shapes, weight_shards, write_index


ADAPTER_PREFIX = "base_model.model."


# peft options that change the merge formula (or what is trained) beyond W += alpha/r * B @ A
UNSUPPORTED = {"use_dora": "DoRA", "use_rslora": "rsLoRA (alpha / sqrt(r) scaling)", "lora_bias": "lora_bias",
               "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
               "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
               "layer_replication": "layer_replication", "use_qalora": "QA-LoRA",
               # LoRA variants whose forward is not W x + s B A x
               "arrow_config": "Arrow", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA",
               "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA"}




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
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors' SafetensorError (a bad header), OSError
        raise MergeError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); rerun "
                         "`qlora-kit train`") from None
    for key, t in tensors.items():
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
    the base with dtype=qlora.compute_dtype), quantize with the recipe's type and double quant and
    bitsandbytes' default block size 64 (what transformers uses), dequantize."""
    import torch
    from bitsandbytes import functional as bnbf

    q = recipe.qlora
    x = w.to(getattr(torch, q.compute_dtype)).contiguous()
    packed, state = bnbf.quantize_4bit(x, blocksize=64, compress_statistics=q.double_quant,
                                       quant_type=q.quant_type, quant_storage=torch.uint8)
    return bnbf.dequantize_4bit(packed, state)


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
    trim = libc_trim()
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


def load_base_for_merge(recipe: Recipe, path: Path, dtype: Any = None):
    """The base as training saw it: the original weights, or the 4-bit model dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_kit.sources.model_safety import check

    check(path, recipe.model)  # no pickle weights, no model-shipped code unless the recipe opts in
    dtype = dtype or getattr(torch, recipe.merge.dtype)
    common = dict(trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=not recipe.model.allow_pickle or None)
    if recipe.merge.base == "original":
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **common)
    q = recipe.qlora
    if q.bits != 4:
        raise MergeError(f"merge.base nf4-roundtrip needs qlora.bits 4 (got {q.bits})")
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
