"""Benchmarks: each prints a table and writes benchmarks/results/*.json and a plot."""
