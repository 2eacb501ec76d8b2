"""The benchmarks: ``efficacy`` (what an erasure of the built-in model did, by its judge)
and ``speed`` (this engine's loop against an ESD-style loop, in one run)."""
