"""`tidesim trace convert`: routing recorded by serving engines -> tidesim traces.

One module per engine reads its files into EnginePass records (tidesim.trace.convert.passes);
`convert` assembles them into a trace with provenance. docs/capture.md shows how to record
routing in each engine; docs/trace-format.md says what each field becomes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.convert import llamacpp, sglang, sglang_request, vllm
from tidesim.trace.convert.passes import EnginePass, Provenance, assemble
from tidesim.trace.schema import Trace

Reader = Callable[[list[Path], ModelSpec, Provenance], list[EnginePass]]

ENGINES: dict[str, Reader] = {
    "sglang": sglang.read,
    "sglang-request": sglang_request.read,
    "vllm": vllm.read,
    "llamacpp": llamacpp.read,
}


def convert(engine: str, inputs: list[str | Path], model: ModelSpec, token_level: bool = True) -> Trace:
    """The trace of an engine's routing record (files in the order given)."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such input file")
    prov = Provenance(engine=engine)
    for path in paths:
        prov.add_input(path)
    passes = ENGINES[engine](paths, model, prov)
    return assemble(passes, model, prov, token_level=token_level)
