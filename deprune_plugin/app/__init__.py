"""The ``deprune`` command-line application (prune, inspect, bench and the rest): training loops, data,
plots, benchmarks. It may import every other package; nothing in the library imports it.
"""
