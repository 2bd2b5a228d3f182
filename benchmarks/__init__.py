"""Benchmarks: 13B-shaped merges timed against the disk (a plain copy) and mergekit.

The orchestrator (`python -m benchmarks`) never imports torch: every heavy step runs in
a child process whose peak RSS is read with wait4, so the figures are the children's own.
"""
