"""Runs benchmarks on an engine and writes their results; resumable per benchmark.

For each benchmark: render every problem's prompt, generate ``n`` samples per problem (in chunks
of problems, with a progress bar), grade the responses by the answer type, compute the metrics
(``eval.metrics``) and write ``<out>/<name>.json``: the settings, the metrics and every sample
(response, extracted answer, score, tokens, finish reason), and the bad rows skipped by kind
(``skipped_rows``, with ``bad_rows: skip``). The file is written atomically when
the benchmark is finished, so a benchmark whose file exists is done: a rerun with the same model,
settings and benchmark file reuses it; a rerun that differs in any of them is refused (the old
numbers would be mixed with new ones). ``<out>/summary.json`` and ``<out>/results.md`` (a markdown
table) cover all benchmarks of the run.

An image benchmark's images are decoded when its rows are read (a bad one is a bad row, before
the engine starts) and processed into pixel patches a chunk of problems at a time, so only one
chunk's patches are held; they go to the engine with the prompts (``generate(..., images=...)``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from rlsd_megatron.eval.benchmarks import BenchmarkRow, BenchmarkSpec, read_benchmark
from rlsd_megatron.eval.grading import ResponseGrader
from rlsd_megatron.eval.metrics import ProblemSamples, benchmark_metrics
from rlsd_megatron.eval.model_source import Prompter
from rlsd_megatron.rollout.engine import RolloutEngine, SamplingParams

__all__ = ["ResultMismatch", "evaluate_benchmark", "generate_samples", "markdown_table", "metrics_from_samples",
           "run_benchmarks"]

RESULT_VERSION = 2  # 2: per-row answer types and images (samples carry answer_type; skipped_rows)


class ResultMismatch(RuntimeError):
    """A finished result file was made with another model, settings or benchmark file."""


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identity(spec: BenchmarkSpec, model_id: str) -> dict[str, Any]:
    return {"version": RESULT_VERSION, "model": model_id, "settings": spec.settings(),
            "file_sha256": _file_digest(spec.file)}


def metrics_from_samples(samples: Sequence[dict[str, Any]], n: int, pass_k: Sequence[int]) -> dict[str, float]:
    """The metrics of a result file's ``samples`` (problem-major, ``n`` per problem): what
    :func:`evaluate_benchmark` reports, recomputable from the file alone."""
    problems = [samples[i:i + n] for i in range(0, len(samples), n)]
    return benchmark_metrics([ProblemSamples([s["score"] for s in p], [s["extracted"] for s in p],
                                             [s["tokens"] for s in p], [s["finish_reason"] == "length" for s in p])
                              for p in problems], pass_k)


def generate_samples(spec: BenchmarkSpec, rows: Sequence[BenchmarkRow], engine: RolloutEngine, prompter: Prompter,
                     grader: ResponseGrader, *, index_offset: int = 0, chunk_prompts: int = 64,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Generate and grade ``spec.n`` samples of each row; one record per sample, problem-major
    (see the module docstring). ``rows`` may be a share of the benchmark starting at problem
    ``index_offset``: problems are numbered and seeded by their index in the whole benchmark
    (``sample_seed(spec.seed, problem, sample)``), so neither chunking nor sharding changes them.
    Each row's prompt is its answer type's template (``spec.template``); an image row's images
    are processed a chunk at a time (module docstring)."""
    from tqdm import tqdm

    images = prompter.image_reader(spec)
    sampling = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                              max_new_tokens=spec.max_new_tokens, stop_token_ids=tuple(prompter.stop_token_ids),
                              seed=spec.seed, presence_penalty=spec.presence_penalty)
    samples: list[dict[str, Any]] = []
    with tqdm(total=len(rows), desc=spec.name, unit="problem", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(rows), chunk_prompts):
            chunk = rows[start:start + chunk_prompts]
            count = len(chunk)
            prompts, pictures = zip(*(prompter.prompt(row.user_text(spec.template(row.answer_type)), images,
                                                      row.images, row.base_dir) for row in chunk))
            # Text-only chunks call generate() without images (engines of text models take none).
            extra = {"images": list(pictures)} if any(x is not None for x in pictures) else {}
            generations = engine.generate(list(prompts), sampling, prompt_offset=index_offset + start, **extra)
            generations.sort(key=lambda g: (g.prompt_index, g.sample_index))
            texts = [prompter.decode(g.token_ids) for g in generations]
            graded = grader.grade(spec, [rows[g.prompt_index - index_offset] for g in generations], texts)
            for g, text, grade in zip(generations, texts, graded):
                row = rows[g.prompt_index - index_offset]
                samples.append({"problem": g.prompt_index, "sample": g.sample_index, "source": row.source,
                                "question": row.question, "answer": row.answer, "answer_type": row.answer_type,
                                "response": text,
                                "extracted": grade.answer, "score": grade.score, "tokens": len(g.token_ids),
                                "finish_reason": g.finish_reason})
            bar.update(count)
    return samples


def evaluate_benchmark(spec: BenchmarkSpec, rows: Sequence[BenchmarkRow], engine: RolloutEngine, prompter: Prompter,
                       grader: ResponseGrader, *, chunk_prompts: int = 64, progress: bool = True) -> dict[str, Any]:
    """Generate, grade and measure one benchmark; returns ``{"metrics", "samples"}``."""
    samples = generate_samples(spec, rows, engine, prompter, grader, chunk_prompts=chunk_prompts, progress=progress)
    return {"metrics": metrics_from_samples(samples, spec.n, spec.pass_k), "samples": samples}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def run_benchmarks(specs: Sequence[BenchmarkSpec], out: str | Path, *, model_id: str,
                   make_engine: Callable[[], RolloutEngine], make_prompter: Callable[[BenchmarkSpec], Prompter],
                   grader: ResponseGrader, chunk_prompts: int = 64, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Evaluate every benchmark not finished in ``out`` yet; returns ``{name: metrics}`` for all.

    ``model_id`` identifies the model in the result files (its path); ``make_engine`` is called
    only when some benchmark is left to do (a finished run starts no engine). Raises
    :class:`ResultMismatch` before generating anything when a finished file disagrees.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo, summary = [], {}
    for spec in specs:
        path, identity = out / f"{spec.name}.json", _identity(spec, model_id)
        if path.is_file():
            done = json.loads(path.read_text())
            mine = {k: done.get(k) for k in identity}
            if mine != identity:
                changed = sorted(k for k in identity if mine[k] != identity[k])
                raise ResultMismatch(f"{path} holds benchmark {spec.name!r} evaluated with a different "
                                     f"{', '.join(changed)}; write to another --out directory, or delete the file "
                                     "to redo it.")
            summary[spec.name] = done["metrics"]
            log(f"[{spec.name}] finished before ({path}), not redone")
        else:  # bad rows (and bad images) fail, or are counted, before any generation
            rows, skipped = read_benchmark(spec, make_prompter(spec).image_reader(spec))
            todo.append((spec, path, identity, rows, skipped))
    engine = make_engine() if todo else None
    try:
        for spec, path, identity, rows, skipped in todo:
            types = sorted({row.answer_type for row in rows})
            log(f"[{spec.name}] {len(rows)} problems x {spec.n} samples, T={spec.temperature}, "
                f"answer type{'s' if len(types) > 1 else ''} {', '.join(types)}"
                + (f", {sum(1 for row in rows if row.images)} with images" if spec.image_key else "")
                + (f"; skipped bad rows {skipped}" if skipped else ""))
            result = evaluate_benchmark(spec, rows, engine, make_prompter(spec), grader,
                                        chunk_prompts=chunk_prompts, progress=progress)
            _write_json(path, {**identity, "skipped_rows": skipped, **result})
            summary[spec.name] = result["metrics"]
            log(f"[{spec.name}] " + ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items()))
    finally:
        if engine is not None:
            engine.shutdown()
    ordered = {spec.name: summary[spec.name] for spec in specs}
    _write_json(out / "summary.json", {"model": model_id, "benchmarks": ordered})
    (out / "results.md").write_text(markdown_table(ordered))
    return ordered


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    """One row per benchmark: problems, n, avg@n, maj@n, every pass@k, mean response tokens and
    the truncated share, then the mean avg@n over benchmarks."""
    lines = ["| benchmark | problems | n | avg@n | maj@n | pass@k | mean tokens | truncated |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    averages = []
    for name, m in summary.items():
        n = m["samples"] // m["problems"]
        averages.append(m[f"avg@{n}"])
        pass_k = ", ".join(f"@{k.split('@')[1]} {v:.3f}" for k, v in m.items() if k.startswith("pass@"))
        lines.append(f"| {name} | {m['problems']} | {n} | {m[f'avg@{n}']:.3f} | {m[f'maj@{n}']:.3f} | {pass_k} | "
                     f"{m['mean_response_tokens']:.1f} | {m['truncation_rate']:.1%} |")
    lines.append(f"| **mean** | | | {sum(averages) / len(averages):.3f} | | | | |")
    return "\n".join(lines) + "\n"
