"""Execution: a plan's tensors through their methods, shard by shard, within a memory
budget, on the CPU or a GPU, in this process (merge.py) or on many (batch.py, workers.py)."""
