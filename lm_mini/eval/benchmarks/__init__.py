"""Paper benchmarks in their own file formats, with the official scorers (one module per benchmark family).

Importing this package registers every benchmark in :data:`lm_mini.eval.benchmarks.base.BENCHMARKS`.
"""
from lm_mini.eval.benchmarks.base import BENCHMARKS, Answer, Benchmark, BenchmarkResult, Question  # noqa: F401
