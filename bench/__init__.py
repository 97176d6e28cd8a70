"""MiniVault's benchmark: `make bench` (or `python -m bench.run`)."""
