"""The vLLM backend (engine.py): vLLM's scheduler and kernels behind our engine protocol."""
