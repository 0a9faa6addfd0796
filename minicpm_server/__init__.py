"""MiniCPM API server: the tutorial's POST / contract, OpenAI's and Ollama's APIs, one engine seam."""

import os

# PyTorch places CPU tensors of 2 MB and more on transparent huge pages when this is set, and reads
# it once, before its first allocation: hence here, before anything imports torch. On the 2-core
# test machine it halved the time to pack the full-size model's weights at start-up (13.3 s to
# 6.5 s: first-touch page faults were most of it) without changing the resident size
# (BENCHMARKS.md, issue 26). A user's own setting wins; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
