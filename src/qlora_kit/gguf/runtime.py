"""Open a GGUF in llama-cpp-python the way the kit always runs it (evaluate, parity tests).

    with open_gguf(path, logits_all=True, n_ctx=512) as llm: ...

llama.cpp's extra CPU buffer types are switched off. On AMX-capable CPUs (seen on this project's
CI machines) llama.cpp at the pinned commit repacks quantized weights into its AMX buffer type
and `llama_decode` then segfaults (f16 is unaffected: AMX takes no f16 weights). `Llama()` has
no switch for it, so the default model params are wrapped while the model loads. The plain CPU
kernels are the reference we want to compare with anyway.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

from qlora_kit.errors import IntegrityError

_LOCK = threading.Lock()


@contextlib.contextmanager
def open_gguf(path: Path, **kw) -> Iterator:
    import llama_cpp
    import llama_cpp.llama as llama_mod

    kw.setdefault("verbose", False)
    kw.setdefault("n_threads", 2)
    with _LOCK:
        default = llama_mod.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_mod.llama_cpp.llama_model_default_params = params
        try:
            llm = llama_cpp.Llama(model_path=str(path), **kw)
        except ValueError as e:  # llama_cpp: "Failed to load model from file"
            raise IntegrityError(f"{path}: llama.cpp cannot load this GGUF ({e}); rerun "
                                 "`qlora-kit quantize`") from None
        finally:
            llama_mod.llama_cpp.llama_model_default_params = default
    try:
        yield llm
    finally:
        llm.close()
