"""What a benchmark run reads: :class:`BenchmarkSpec` (a registered benchmark and its local files, from the flags or
a suite entry) and suites (``experiments/benchmarks/*.yaml``: benchmarks with their paths under a root)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, Path]


@dataclass
class BenchmarkSpec:
    """One benchmark run: the registered benchmark ``name`` and its local files (a suite entry or the flags)."""

    name: str
    questions: str
    image_folder: Optional[str] = None
    annotations: Optional[str] = None
    label: Optional[str] = None  # name in MLflow keys and default file names (default: name); e.g. pope_adversarial
    max_new_tokens: Optional[int] = None  # default: the benchmark's (its official script's)
    # the questions the submission file lists when not these (VQAv2: llava_vqav2_mscoco_test2015.jsonl; by default
    # found beside the test-dev file, Benchmark.submission_questions_for)
    submission_questions: Optional[str] = None

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class Suite:
    """``experiments/benchmarks/*.yaml``: benchmarks and their local paths (relative ones under ``root``)."""

    root: str = "."
    benchmarks: List[BenchmarkSpec] = field(default_factory=list)


def load_suite(path: PathLike) -> Suite:
    """A suite YAML -> :class:`Suite` (typed: unknown keys and missing ``name``/``questions`` are refused, naming
    the entry). ``root`` may use ``${oc.env:VAR,default}``; a relative root is relative to the working directory."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--suite {path}: no such file")
    raw = OmegaConf.load(path)
    unknown = set(raw.keys()) - {"root", "benchmarks"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a suite has root and benchmarks")
    entries = []
    for i, entry in enumerate(raw.get("benchmarks") or []):
        try:
            merged = OmegaConf.merge(OmegaConf.structured(BenchmarkSpec(name="", questions="")), entry)
        except OmegaConfBaseException as e:
            raise ValueError(f"{path}: benchmarks[{i}]: {e.msg if hasattr(e, 'msg') else e}") from None
        spec = BenchmarkSpec(**OmegaConf.to_container(merged, resolve=True))
        if not spec.name or not spec.questions:
            raise ValueError(f"{path}: benchmarks[{i}] needs 'name' (a registered benchmark) and 'questions' (its question file)")
        entries.append(spec)
    if not entries:
        raise ValueError(f"{path}: no benchmarks listed")
    labels = [e.key for e in entries]
    twice = sorted({k for k in labels if labels.count(k) > 1})
    if twice:
        raise ValueError(f"{path}: {', '.join(twice)} listed twice; give each run its own 'label'")
    root = str(OmegaConf.to_container(raw, resolve=True).get("root") or ".")
    return Suite(root, [_under(root, e) for e in entries])


def _under(root: str, spec: BenchmarkSpec) -> BenchmarkSpec:
    def place(p: Optional[str]) -> Optional[str]:
        return None if p is None else str(Path(root) / p) if not Path(p).is_absolute() else p

    return BenchmarkSpec(spec.name, place(spec.questions), place(spec.image_folder), place(spec.annotations), spec.label,
                         spec.max_new_tokens, place(spec.submission_questions))


def missing_files(spec: BenchmarkSpec) -> List[str]:
    """The spec's paths that do not exist (``questions``, ``image_folder``, ``annotations``, ``submission_questions``),
    named by key."""
    out = []
    for key in ("questions", "image_folder", "annotations", "submission_questions"):
        value = getattr(spec, key)
        if value is not None and not Path(value).exists():
            out.append(f"{spec.key}.{key}: {value}")
    return out
