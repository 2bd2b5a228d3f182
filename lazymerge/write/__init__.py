"""Writing: safetensors.py puts bytes at offsets in one shard file; output.py owns the
output directory (manifest.py says what lazymerge.json holds)."""
