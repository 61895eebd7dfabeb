"""tidesim_runtime: torch code for tidesim (needs the `runtime` extra: pip install 'tidesim[runtime]').

Modules: gate (LLaDA2.0 router), model (reference model), generate (block-diffusion decoding),
checkpoint (Hugging Face safetensors load/save), capture (gate hooks -> tidesim Trace).
Nothing is imported here, so `import tidesim_runtime` stays cheap; import the submodules.
"""

__all__: list[str] = []
