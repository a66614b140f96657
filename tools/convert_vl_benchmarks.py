#!/usr/bin/env python
r"""Convert the image benchmarks of the paper's table (spec §7) from the layout they are published
in on the Hugging Face hub to rlsd-eval's rows (examples/benchmarks/vision_language.yaml reads them).

    OUT=examples/benchmarks/vision_language
    python tools/convert_vl_benchmarks.py mmmu MMMU/*/validation-*.parquet --out $OUT/mmmu_validation.parquet
    python tools/convert_vl_benchmarks.py mathvista MathVista/data/testmini-*.parquet \
        --out $OUT/mathvista_testmini.parquet
    python tools/convert_vl_benchmarks.py mathvision MathVision/data/test-*.parquet --out $OUT/mathvision_test.parquet
    python tools/convert_vl_benchmarks.py zerobench zerobench/data/zerobench_subquestions-*.parquet \
        --out $OUT/zerobench_subquestions.parquet
    python tools/convert_vl_benchmarks.py wemath We-Math/testmini.json --image-root We-Math \
        --out $OUT/wemath_testmini.parquet

(The inputs are the dataset repositories' files, e.g. from `huggingface-cli download --repo-type
dataset MMMU/MMMU --local-dir MMMU`; any of .parquet / .json / .jsonl.) Each output row is
`{"id", "question", "answer", "choices", "images", "answer_type", "abs_tol"}`: the question with one
`<image>` placeholder where each image goes (the training data's layout, `data.images`), the images
as `{"bytes", "path"}` (bytes embedded: an image stored as a path is read from `--image-root`),
`choices` the option texts of a multiple-choice row (empty otherwise), and the row's answer type
(rlsd_megatron/eval/answers.py) with a numeric row's tolerance. Published columns:

- MMMU (MMMU/MMMU, one folder per subject; validation 900 rows): `id`, `question`, `options` (a
  Python list written as a string), `image_1` ... `image_7` (Image), `answer` (a letter, or the
  open answer), `question_type` (`multiple-choice` / `open`). `<image k>` tags in the question and
  options become placeholders in order of first mention (a repeated mention stays text, `[image
  k]`; an image never mentioned goes before the question). Multiple choice → `multiple_choice`;
  open → `math` (math-verify); an open answer listing alternatives (`['24/7', '3.429']`) keeps the
  first, as no answer type takes several.
- MathVista (AI4Math/MathVista, testmini 1000 rows): `pid`, `query` (the official prompt: hint,
  question and for multiple choice its `Choices:`), `decoded_image` (Image; `image` its path),
  `choices`, `answer` (an option's text for multiple choice), `question_type` (`multi_choice` /
  `free_form`), `answer_type` (`integer` / `float` / `text` / `list`), `precision` (decimal places
  of a float answer). The question is `<image>` + `query`; multi_choice → `multiple_choice`,
  integer → `numeric` (exact), float → `numeric` within half a unit of the last place (the official
  scorer rounds the answer to `precision` places), text / list → `exact`.
- MathVision (MathLLMs/MathVision, test 3040 / testmini 304 rows): `id`, `question` (with an
  `<image1>` tag), `options` (letters, or empty for free-form), `decoded_image` (Image; `image` its
  path), `answer`. With options → `multiple_choice`, else `math`.
- ZeroBench (jonathan-roberts1/zerobench; splits `zerobench` 100 and `zerobench_subquestions` 334
  rows): `question_id`, `question_text`, `question_images_decoded` (a list of Images; no tags: the
  images go before the question), `question_answer`. A numeric answer → `math`, else `exact`.
- WeMath (We-Math/We-Math, testmini 1740 rows): `ID`, `question`, `option` (`"A. ...; B. ..."`),
  `answer` (a letter), `image_path` (an Image, or a path under `--image-root`). All
  `multiple_choice`; the image goes before the question. (WeMath's own four-dimensional scores
  are not computed: rlsd-eval reports accuracy over its problems.)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from rlsd_megatron.data.images import IMAGE_PLACEHOLDER
from rlsd_megatron.data.readers import read_rows
from rlsd_megatron.eval.answers import parse_number

__all__ = ["CONVERTERS", "convert", "main"]


class ImageSource:
    """Turns a published image cell into a `{"bytes", "path"}` entry with its bytes embedded: an
    HF Image cell keeps its bytes; a path (a string, or a cell without bytes) is read from `root`."""

    def __init__(self, root: Path | None):
        self.root = root

    def __call__(self, cell: Any) -> dict[str, Any]:
        if isinstance(cell, dict) and cell.get("bytes"):
            return {"bytes": cell["bytes"], "path": cell.get("path")}
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not isinstance(path, str) or not path:
            raise ValueError(f"an image cell holds neither bytes nor a path: {str(cell)[:80]!r}")
        file = Path(path) if Path(path).is_absolute() or self.root is None else self.root / path
        if not file.is_file():
            raise ValueError(f"image {str(file)!r} does not exist (pass --image-root, the folder the dataset's image "
                             "paths start from)")
        return {"bytes": file.read_bytes(), "path": path}


def _row(id_: Any, question: str, answer: str, images: list[dict], answer_type: str, *,
         choices: list[str] | None = None, abs_tol: float | None = None) -> dict[str, Any]:
    return {"id": str(id_), "question": question, "answer": answer, "choices": list(choices or []),
            "images": images, "answer_type": answer_type, "abs_tol": abs_tol}


def _images_first(question: str, count: int) -> str:
    """The question with `count` placeholders before it (images shown first, as the benchmarks' own prompts do)."""
    return IMAGE_PLACEHOLDER * count + ("\n" if count else "") + question


_MMMU_TAG = re.compile(r"<image (\d+)>")


def mmmu(record: dict[str, Any], image: ImageSource) -> dict[str, Any]:
    options = ast.literal_eval(record["options"]) if record.get("options") else []
    stored = {k: record.get(f"image_{k}") for k in range(1, 8) if record.get(f"image_{k}") is not None}
    order: list[int] = []

    def place(match: re.Match) -> str:
        k = int(match.group(1))
        if k in order or k not in stored:
            return f"[image {k}]"
        order.append(k)
        return IMAGE_PLACEHOLDER

    question = _MMMU_TAG.sub(place, record["question"])
    options = [_MMMU_TAG.sub(place, str(o)) for o in options]  # after the question: the prompt's reading order
    unmentioned = [k for k in sorted(stored) if k not in order]
    question = _images_first(question, len(unmentioned))
    images = [image(stored[k]) for k in unmentioned + order]
    answer = str(record["answer"]).strip()
    if record.get("question_type") == "multiple-choice" and options:
        return _row(record["id"], question, answer, images, "multiple_choice", choices=options)
    if answer.startswith("["):
        alternatives = ast.literal_eval(answer)
        answer = str(alternatives[0]) if alternatives else answer
    return _row(record["id"], question, answer, images, "math")


def mathvista(record: dict[str, Any], image: ImageSource) -> dict[str, Any]:
    cell = record.get("decoded_image") or record.get("image")
    question = _images_first(record["query"], 1)
    answer = str(record["answer"]).strip()
    if record["question_type"] == "multi_choice":
        return _row(record["pid"], question, answer, [image(cell)], "multiple_choice", choices=record["choices"])
    kind = record["answer_type"]
    if kind == "integer":
        return _row(record["pid"], question, answer, [image(cell)], "numeric", abs_tol=0.0)
    if kind == "float":
        precision = record.get("precision")
        tol = 0.5 * 10 ** -int(precision) if precision is not None else None
        return _row(record["pid"], question, answer, [image(cell)], "numeric", abs_tol=tol)
    return _row(record["pid"], question, answer, [image(cell)], "exact")  # text, list


_MATHVISION_TAG = re.compile(r"<image\d+>")


def mathvision(record: dict[str, Any], image: ImageSource) -> dict[str, Any]:
    cell = record.get("decoded_image") or record.get("image")
    question, tags = _MATHVISION_TAG.subn(IMAGE_PLACEHOLDER, record["question"], count=1)
    question = _MATHVISION_TAG.sub("", question)  # every row has one image: later tags name it again
    question = question if tags else _images_first(question, 1)
    options = list(record.get("options") or [])
    answer = str(record["answer"]).strip()
    if options:
        return _row(record["id"], question, answer, [image(cell)], "multiple_choice", choices=options)
    return _row(record["id"], question, answer, [image(cell)], "math")


def zerobench(record: dict[str, Any], image: ImageSource) -> dict[str, Any]:
    cells = list(record.get("question_images_decoded") or record.get("question_images") or [])
    answer = str(record["question_answer"]).strip()
    return _row(record["question_id"], _images_first(record["question_text"], len(cells)), answer,
                [image(c) for c in cells], "math" if parse_number(answer) is not None else "exact")


_WEMATH_OPTION = re.compile(r"(?:^|;\s*)([A-Z])\.\s*")


def wemath(record: dict[str, Any], image: ImageSource) -> dict[str, Any]:
    text = str(record["option"])
    marks = list(_WEMATH_OPTION.finditer(text))
    letters = "".join(m.group(1) for m in marks)
    if len(marks) < 2 or letters != "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(marks)]:
        raise ValueError(f"option {text[:80]!r} is not 'A. ...; B. ...'")
    choices = [text[m.end():(marks[i + 1].start() if i + 1 < len(marks) else len(text))].strip()
               for i, m in enumerate(marks)]
    return _row(record["ID"], _images_first(record["question"], 1), str(record["answer"]).strip(),
                [image(record["image_path"])], "multiple_choice", choices=choices)


CONVERTERS: dict[str, Callable[[dict[str, Any], ImageSource], dict[str, Any]]] = {
    "mmmu": mmmu, "mathvista": mathvista, "mathvision": mathvision, "zerobench": zerobench, "wemath": wemath}


def convert(benchmark: str, inputs: list[str | Path], image_root: str | Path | None = None) -> Iterator[dict]:
    """The rows of the published files `inputs` of `benchmark` in rlsd-eval's layout (module
    docstring). Raises ValueError naming the file and row a published row cannot be converted at."""
    to_row, image = CONVERTERS[benchmark], ImageSource(Path(image_root) if image_root else None)
    for path in inputs:
        for raw in read_rows(path):
            if raw.problem:
                raise ValueError(f"{raw.where}: {raw.problem}")
            try:
                yield to_row(raw.record, image)
            except (KeyError, ValueError, SyntaxError) as exc:
                message = f"missing column {exc}" if isinstance(exc, KeyError) else str(exc)
                raise ValueError(f"{raw.where}: {message} (is it a {benchmark} file?)") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=sorted(CONVERTERS))
    p.add_argument("inputs", nargs="+", help="the published .parquet / .json / .jsonl files")
    p.add_argument("--out", required=True, help="output .parquet")
    p.add_argument("--image-root", default=None, help="folder that images stored as paths are relative to")
    args = p.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = list(convert(args.benchmark, args.inputs, args.image_root))
    except ValueError as exc:
        print(f"convert_vl_benchmarks: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    types = Counter(row["answer_type"] for row in rows)
    print(f"{out}: {len(rows)} rows ({', '.join(f'{k} {v}' for k, v in sorted(types.items()))}), "
          f"{sum(len(row['images']) for row in rows)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
