"""Serving benchmarks: a load client (serve), the system runner (run), an HF baseline server, plots."""
