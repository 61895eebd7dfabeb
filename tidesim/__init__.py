"""tidesim: predict, plan and check expert offloading for MoE diffusion LLMs on one GPU + CPU."""

__version__ = "0.1.0"
