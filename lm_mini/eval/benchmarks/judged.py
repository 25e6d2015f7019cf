"""GPT-judged benchmarks: LLaVA-Bench (in the wild), MM-Vet, MSVD-QA, MSRVTT-QA, ActivityNet-QA.

Their official scores come from a GPT judge, which needs an API account this package does not have: these
benchmarks ask their questions as the official scripts do, write the file the official judge reads, and
score only through a judge command the user gives (``--judge CMD``); nothing here makes up a score.

Judge protocol: ``CMD`` is split like a shell command line (``shlex``) and run with one more argument, the
path of the judge input file (:meth:`JudgedBenchmark.write_submission`), and the environment variable
``LM_MINI_BENCHMARK`` set to the benchmark's name. It must exit 0 and print, as the last non-empty line of
its standard output, one JSON object of score names to numbers (``{"accuracy": 47.1, "score": 3.2}``); those
are the scores, as the judge gives them.

Sources (ictnlp/LLaVA-Mini@47da1137f7b503be685ab5faa9f64a88b102e786): ``scripts/llavamini/eval_image/llavabench.sh``
and ``mmvet.sh`` (``model_vqa_loader.py``; ``scripts/convert_mmvet_for_eval.py``),
``llavamini/eval/video/run_inference_video_qa.py`` / ``run_inference_video_qa_act.py`` and ``eval_video_qa.py``
(the judge reads JSON lines ``{"id", "question", "answer", "pred"}``).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from lm_mini.eval.benchmarks.base import BENCHMARKS, Benchmark, BenchmarkResult, PathLike, Question
from lm_mini.eval.benchmarks.common import is_number, load_json, pair_answers, require, write_json, write_jsonl
from lm_mini.eval.benchmarks.video_mc import find_video

log = logging.getLogger(__name__)


def run_judge(command: str, judge_input: Path, benchmark: str) -> Dict[str, float]:
    """Run the user's judge command on ``judge_input`` (protocol in the module docstring); its scores."""
    argv = shlex.split(command) + [str(judge_input)]
    log.info("judging %s: %s", benchmark, " ".join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, LM_MINI_BENCHMARK=benchmark))
    except OSError as e:
        raise RuntimeError(f"{benchmark}: the judge command {argv[0]!r} could not run ({e})") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"{benchmark}: the judge command exited with {proc.returncode}:\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        scores = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        scores = None
    if not isinstance(scores, dict) or not scores or not all(isinstance(k, str) and is_number(v) for k, v in scores.items()):
        last = lines[-1] if lines else "(no output)"
        raise RuntimeError(f"{benchmark}: the judge command must print a JSON object of score names to numbers as "
                           f"its last line, printed {last[:200]!r}")
    return {k: float(v) for k, v in scores.items()}


class JudgedBenchmark(Benchmark):
    """A benchmark scored by a judge command; ``write_submission`` writes the judge's input file."""

    judged = True
    judge_input_name = "judge_input.jsonl"
    judge_json_indent: Optional[int] = None  # a JSON judge input as the official converter dumps it
    missing_answers = "not_counted"
    missing_rule = "the judge scores the answers it is given"

    def judge_rows(self, answers, questions, annotations) -> Any:
        """What the judge input file holds (JSON lines: a list of rows; JSON: an object)."""
        return [dict(a) for a in answers]

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        rows = self.judge_rows(answers, questions, annotations)
        path = Path(out_dir) / self.judge_input_name
        return write_jsonl(path, rows) if path.suffix == ".jsonl" else write_json(path, rows, self.judge_json_indent)

    def score(self, answers, questions=None, annotations=None, judge=None) -> BenchmarkResult:
        if judge is None:
            return BenchmarkResult(self.name, n=0, notes=[f"{self.name} is scored by a GPT judge: give --judge CMD "
                                                         "(the judge input file is written with the answers)"])
        with tempfile.TemporaryDirectory() as tmp:
            path = self.write_submission(answers, tmp, questions, annotations)
            scores = run_judge(judge, path, self.name)
        return BenchmarkResult(self.name, n=len(answers), scores=scores, notes=[f"scores from the judge command {judge!r}"])


@BENCHMARKS.register("llava_bench")
class LLaVABench(JudgedBenchmark):
    """LLaVA-Bench (in the wild): ``questions.jsonl`` asked with ``model_vqa_loader.py`` (prompt = ``text``,
    128 new tokens). Judge input: the answers file itself (LLaVA's answers lines, which
    ``eval_gpt_review_bench.py`` reads with the questions, contexts and GPT-4 reference answers)."""

    name = "llava_bench"
    headline = "overall"


@BENCHMARKS.register("mmvet")
class MMVet(JudgedBenchmark):
    """MM-Vet: ``llava-mm-vet.jsonl`` asked with ``model_vqa_loader.py``. Judge input: ``convert_mmvet_for_eval.py``'s
    file, ``{"v1_<question_id>": text}`` (what MM-Vet's GPT-4 evaluator and its online server read), dumped as the
    script does (``indent=2``)."""

    name = "mmvet"
    headline = "total"
    judge_input_name = "mmvet_results.json"
    judge_json_indent = 2

    def judge_rows(self, answers, questions, annotations) -> Dict[str, str]:
        return {f"v1_{a['question_id']}": a["text"] for a in answers}


VIDEO_QA_PROMPT = """Answer the question based on the video. Provide a complete sentence that directly mirrors the phrasing of the question and focuses on giving a clear, relevant answer.

For example:
For the question 'Who is driving a car?', answer with 'A man is driving a car.' or 'A person without clear face is driving a car.'
For the question 'What is the man doing?', answer with 'The man is driving a car.' or 'The man is walking.'
For the question 'Who is the man talking to while driving?', answer with 'The man is talking to a woman while driving.' or 'The man is talking to a friend while driving.'
For the question 'Where is the boy standing when the cat jumps onto the table?', answer with 'The boy is standing next to the door when the cat jumps onto the table.' or 'The boy is standing in the kitchen when the cat jumps onto the table.'
For the question 'What is the dog in?', answer with 'The dog is in a box.' or 'The dog is in the car.'
For the question 'what does the man evade the clutches of?', answer with 'The man evade the clutches of gangster.' or 'The man evade the clutches of an eagle.'
For the question 'What does the man do 2 times?', answer with 'The man jumps 2 times.' or 'The man waves 2 times.'
For the question 'What does the woman who is standing next to the window do before picking up the phone?', answer with 'The woman who is standing next to the window looks outside before picking up the phone.' or 'The woman who is standing next to the window adjusts the curtains before picking up the phone.'

Answer the question with one complete sentence:
"""


class _VideoQA(JudgedBenchmark):
    """Open-ended video QA (``run_inference_video_qa.py``): questions from the script's ``--gt_file_question``
    (a JSON list of ``{"video_name", "question_id", "question"}``), the video ``<video_name>`` with the first of
    .mp4/.avi/.mov/.mkv that exists; prompt: the script's fixed instructions and examples, then the question;
    1024 new tokens; the answers line's ``prompt`` is the bare question. Judge input: ``eval_video_qa.py``'s
    ``merge.jsonl`` lines ``{"id", "question", "answer", "pred"}``, the reference answers from
    ``--annotations`` (``--gt_file_answers``, ``[{"answer", ...}]``, paired by position as the script does)."""

    modality = "video"
    max_new_tokens = 1024
    needs_questions = True
    headline = "accuracy"
    video_prefix = ""  # ActivityNet's files are v_<video_name>.mp4
    judge_input_name = "merge.jsonl"

    def read_questions(self, path: PathLike) -> List[Question]:
        data = load_json(path, "the video QA question file (a JSON list of {'video_name', 'question_id', 'question'})")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{'video_name', 'question_id', 'question'}}")
        out = []
        for number, rec in enumerate(data, 1):
            missing = [k for k in ("video_name", "question_id", "question") if k not in rec]
            if missing:
                raise ValueError(f"{path}: question {number} has no {', '.join(repr(k) for k in missing)}")
            out.append(Question(rec["question_id"], rec["question"], f"{self.video_prefix}{rec['video_name']}",
                                True, None, dict(rec, position=number - 1)))
        return out

    def prompt(self, question: Question) -> str:
        return VIDEO_QA_PROMPT + question.text

    def media_path(self, question: Question, folder: PathLike) -> Path:
        return find_video(Path(folder), str(question.media))

    def write_submission(self, answers, out_dir, questions=None, annotations=None) -> Optional[Path]:
        if questions is None or annotations is None:
            return None  # the judge input needs the questions and the reference answers
        return super().write_submission(answers, out_dir, questions, annotations)

    def judge_rows(self, answers, questions, annotations) -> List[Dict[str, Any]]:
        questions = require(questions, self, "the question file (--questions: test_q.json)")
        gt = load_json(require(annotations, self, "--annotations (the reference answers, test_a.json)"),
                       "the reference answers ([{'answer', ...}])")
        if not isinstance(gt, list) or len(gt) != len(questions):
            raise ValueError(f"{annotations}: expected a JSON list of {len(questions)} answers, one per question "
                             "(paired by position, as run_inference_video_qa.py does)")
        pairs, _ = pair_answers(self, answers, questions)
        rows = []
        for a, q in pairs:
            ref = gt[q.record["position"]]
            if "question_id" in ref and ref["question_id"] != q.question_id:
                raise ValueError(f"{annotations}: answer {q.record['position'] + 1} is for question "
                                 f"{ref['question_id']!r}, not {q.question_id!r}")
            rows.append({"id": q.question_id, "question": q.text, "answer": ref["answer"], "pred": a["text"]})
        return rows


@BENCHMARKS.register("msvd_qa")
class MSVDQA(_VideoQA):
    """MSVD-QA (``run_qa_msvd.sh``: ``run_inference_video_qa.py``; judged by ``eval_video_qa.py``)."""

    name = "msvd_qa"


@BENCHMARKS.register("msrvtt_qa")
class MSRVTTQA(_VideoQA):
    """MSRVTT-QA (``run_qa_msrvtt.sh``: ``run_inference_video_qa.py``; judged by ``eval_video_qa.py``)."""

    name = "msrvtt_qa"


@BENCHMARKS.register("activitynet_qa")
class ActivityNetQA(_VideoQA):
    """ActivityNet-QA (``run_inference_video_qa_act.py``: the videos are ``v_<video_name>.<ext>``)."""

    name = "activitynet_qa"
    video_prefix = "v_"
