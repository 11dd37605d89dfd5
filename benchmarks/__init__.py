"""fused_attn benchmark suite (not part of the installed package).

``python -m benchmarks --list`` shows the presets; ``python -m benchmarks.demo`` is ``make demo``.
See benchmarks/README.md.
"""
