"""What the numbers mean, as pure functions and frozen values: where a tensor sits
(layers.py), the gradient's ratios (ratios.py), what an adapter changes (adapters.py),
and how inputs combine (methods/)."""
