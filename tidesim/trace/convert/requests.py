"""Per-request routing (SGLang's routed_experts, vLLM's prompt/generated routed experts) -> passes.

An engine that returns routing per request gives each token's experts, not how the server batched
the requests; every request becomes one prompt of the trace, decoded alone: its prompt's tokens in
one prefill pass, then one decode pass per further token (docs/trace-format.md).
"""

from __future__ import annotations

import numpy as np

from tidesim.models import ModelSpec
from tidesim.trace.convert.passes import EnginePass, Provenance, check_ids


def request_passes(prompt_ids: np.ndarray, decode_ids: np.ndarray, generated: int, model: ModelSpec,
                   where: str) -> list[EnginePass]:
    """Passes of one request: prompt_ids [P, L, k] in a prefill, decode_ids [D, L, k] one row per
    decode pass; the `generated` output tokens are committed one per pass from the prefill on."""
    prompt_ids = check_ids(prompt_ids, model, f"{where} prompt")
    decode_ids = check_ids(decode_ids, model, f"{where} generated")
    P = prompt_ids.shape[0]
    out: list[EnginePass] = []
    budget = generated
    if P:
        out.append(EnginePass(prompt_ids, "prefill", positions=np.arange(P), commits=min(budget, 1)))
        budget -= min(budget, 1)
    for j in range(decode_ids.shape[0]):
        out.append(EnginePass(decode_ids[j:j + 1], "decode", positions=np.array([P + j]), commits=min(budget, 1)))
        budget -= min(budget, 1)
    return out


def note_requests(prov: Provenance) -> None:
    prov.infer("requests are decoded one after another, each alone (per-request routing does not say how the "
               "server batched them)")
    prov.infer("the prefill commits the first output token and each decode pass one more, up to the output length")
    prov.cannot_derive.append("batching across requests and the server's forward order")
