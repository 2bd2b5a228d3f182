"""Reading inputs: tensor references from headers, bytes from read-only maps.

tensorref.py (TensorRef, dtype codes) <- safetensors.py (headers), torchzip.py (`.bin`
without pickle code) <- checkpoint.py (a model directory); mapped.py serves the bytes,
readahead.py pulls the next ones into the page cache, config.py reads config.json.
"""
