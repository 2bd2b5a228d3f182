"""lazymerge: streaming LoRA + gradient merges of LLM checkpoints in bounded memory."""

from __future__ import annotations

__version__ = "0.1.0"
