"""Losses, log-probabilities and logit parity, for HF models and GGUFs."""
from __future__ import annotations

import math
from typing import Any


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


def log_softmax(x: Any) -> Any:
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def gguf_logprobs(llm: Any, rows: list[dict[str, Any]]) -> list:
    import numpy as np

    out = []
    for r in rows:
        ids = r["input_ids"]
        llm.reset()
        llm.eval(ids)
        out.append(log_softmax(np.array(llm.scores[: len(ids)])))
    return out


def completion_ppl(logprobs: list, rows: list[dict[str, Any]]) -> float:
    """exp(mean NLL) over the loss-bearing tokens (labels != -100), as evaluate measures loss."""
    nll, n = 0.0, 0
    for lp, r in zip(logprobs, rows):
        for pos in range(len(r["input_ids"]) - 1):
            tgt = r["labels"][pos + 1]
            if tgt != -100:
                nll -= float(lp[pos, tgt])
                n += 1
    return math.exp(min(nll / max(n, 1), 50.0))


def distribution_parity(ref: list, got: list) -> dict[str, float]:
    """Mean/max KL(ref || got) per position and the share of positions with the same top token."""
    import numpy as np

    kl = np.concatenate([(np.exp(p) * (p - q)).sum(-1) for p, q in zip(ref, got)])
    top1 = np.concatenate([p.argmax(-1) == q.argmax(-1) for p, q in zip(ref, got)])
    return {"positions": int(kl.size), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float(top1.mean())}


def hf_completion_loss(model, rows: list[dict[str, Any]]) -> float:
    """Mean NLL over loss-bearing tokens (labels != -100), summed over rows, in nats/token."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits.float()[0, :-1]
            tgt = labels[0, 1:]
            mask = tgt != -100
            if mask.any():
                lp = torch.log_softmax(logits[mask], -1)
                nll -= float(lp.gather(1, tgt[mask].unsqueeze(1)).sum())
                n += int(mask.sum())
    return nll / max(n, 1)


def gguf_completion_loss(llm, rows: list[dict[str, Any]]) -> float:
    import numpy as np

    nll, n = 0.0, 0
    for r in rows:
        ids, labels = r["input_ids"], r["labels"]
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        for pos in range(len(ids) - 1):
            tgt = labels[pos + 1]
            if tgt == -100:
                continue
            row = scores[pos]
            m = row.max()
            nll -= row[tgt] - (m + math.log(np.exp(row - m).sum()))
            n += 1
    return nll / max(n, 1)
