"""tidesim_runtime: torch code for tidesim (needs the `runtime` extra: pip install 'tidesim[runtime]').

Three parts, one subpackage each (docs/runtime.md): `reference` (the LLaDA2.0 reference model,
checkpoints, decoding, capture, prompts), `engine` (the executor that runs a Schedule on a GPU or
the CPU playing it, with its kernels, copy streams, slots and CPU worker pool) and `measure`
(calibrate, validate and the live decodes, made with the engine). Nothing is imported here, so
`import tidesim_runtime` stays cheap; import the submodules.
"""

__all__: list[str] = []
