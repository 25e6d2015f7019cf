"""Paper benchmarks in their own file formats, with the official scorers (one module per benchmark family).

Importing this package registers every benchmark in :data:`lm_mini.eval.benchmarks.base.BENCHMARKS`:
``vqav2``, ``gqa``, ``vizwiz``, ``textvqa`` (:mod:`.vqa`), ``scienceqa``, ``pope``, ``mme``, ``mmbench``,
``mmbench_cn``, ``mmbench_cn_llava15``, ``seed_bench``, ``mvbench``, ``mlvu``, ``egoschema`` (:mod:`.video_mc`)
and the GPT-judged ``llava_bench``, ``mmvet``, ``msvd_qa``, ``msrvtt_qa``, ``activitynet_qa`` (:mod:`.judged`).
:func:`~lm_mini.eval.benchmarks.scoring.score_answers` scores an answers file.
"""
from lm_mini.eval.benchmarks.base import BENCHMARKS, Answer, Benchmark, BenchmarkResult, Question  # noqa: F401
from lm_mini.eval.benchmarks import judged, mmbench, mme, pope, scienceqa, seed, video_mc, vqa  # noqa: F401,E402
