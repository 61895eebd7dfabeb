"""The reference model: an exact LLaDA2.0 in plain torch (model, gate), its Hugging Face
checkpoints, block-diffusion decoding by the official `generate` rules, the gate hooks that capture
a tidesim Trace, and the prompts (token ids, or text through the checkpoint's tokenizer and chat
template). It knows nothing of the executor or of timing; nothing is imported here, so importing
the package stays cheap: import the submodules.
"""

__all__: list[str] = []
