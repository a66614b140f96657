"""Image benchmarks in rlsd-eval (issue 19; the paper's MMMU / MathVista / MathVision / ZeroBench /
WeMath, spec §7):

- benchmark rows with images (parquet, two generated PNGs in a row) become the prompt ids and
  pixel patches an independent reference builds (the chat template on a content list, each image
  pad repeated t·h·w/4 times; transformers' processor with the model's preprocessor_config.json);
- bad rows (unreadable / empty image, placeholders that do not match the images) fail naming
  the row, or with ``bad_rows: skip`` are counted by kind;
- a tiny random Qwen2.5-VL HF directory evaluated end to end by ``rlsd-eval`` on the embedded
  engine: greedy responses equal transformers' own ``generate`` on the reference inputs, which
  differ when an image differs (so the images reached the model); the skipped bad row is in the
  result file;
- MathVista's mixed answer types, converted from its published columns by
  ``tools/convert_vl_benchmarks.py`` and read with the shipped YAML's settings, graded on
  hand-made answers as its official scorer rounds; MMMU's, MathVision's, ZeroBench's and WeMath's
  published layouts;
- ``train.eval_sets`` of a vision-language file run: a benchmark row's prompt and pixels equal a
  training row's of the same question and images; a text run refuses image benchmarks.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

from rlsd_megatron.data import DataError, MATH_STUDENT_TEMPLATE
from rlsd_megatron.eval.benchmarks import BenchmarkRow, BenchmarkSpec, load_benchmark_specs, read_benchmark
from tests.data.conftest import build_vl_tokenizer
from tests.data.test_images import PIXELS, png, reference, write_parquet
from tests.hf_models import random_hf_vision_language_model, tiny_vision_language_model

# The model's own processor settings (normalisation unlike the processor's defaults, so a reader
# that ignored the file would give other pixel values).
PREPROCESSOR = {"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.2, 0.4, 0.6],
                "image_std": [0.3, 0.3, 0.3]}
VL_YAML = Path(__file__).parents[2] / "examples" / "benchmarks" / "vision_language.yaml"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    """An HF directory: the test VL tokenizer, its preprocessor_config.json, and (``model``) a tiny
    random Qwen2.5-VL whose image token is the tokenizer's and whose video token it never makes."""
    from rlsd_megatron.data import load_chat_tokenizer

    root = build_vl_tokenizer(tmp_path_factory.mktemp("vl_hf"))
    (root / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    tokenizer = load_chat_tokenizer(root)
    model = tiny_vision_language_model(vocab_size=len(tokenizer) + 1)
    model = dataclasses.replace(model, vision=dataclasses.replace(
        model.vision, image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"), video_token_id=len(tokenizer)))
    return root, tokenizer, model


def processed(images: list[bytes]):
    """transformers' processor with the model's settings: pixel patches and grids."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Qwen2VLImageProcessorPil(**PREPROCESSOR, **PIXELS)(
        images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def prompter_for(vl_dir):
    from rlsd_megatron.eval.model_source import Prompter
    from rlsd_megatron.data.teacher_context import hf_chat_renderer

    root, tokenizer, model = vl_dir
    return Prompter(hf_chat_renderer(tokenizer, image_placeholder="<image>"), tokenizer.decode,
                    [tokenizer.eos_token_id], vision=model.vision, processor_dir=root)


def test_image_rows_become_the_prompts_and_pixels_of_the_reference(tmp_path, vl_dir):
    _, tokenizer, model = vl_dir
    a, b = png(16, 24, seed=1), png(40, 40, seed=2, mode="L")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "c.png").write_bytes(png(24, 16, seed=3))
    rows = [{"question": "Compare <image> with <image>.", "answer": "2", "images": [{"bytes": a, "path": None},
                                                                                   {"bytes": b, "path": None}]},
            {"question": "What is 1+1?", "answer": "2", "images": []},
            {"question": "<image> What is shown?", "answer": "3", "images": [{"bytes": None, "path": "pics/c.png"}]}]
    spec = BenchmarkSpec(name="v", file=str(write_parquet(tmp_path / "v.parquet", rows)), image_key="images",
                         prompt_template=MATH_STUDENT_TEMPLATE, answer_type="exact", **PIXELS)
    prompter = prompter_for(vl_dir)
    reader = prompter.image_reader(spec)
    got, skipped = read_benchmark(spec, reader)
    assert skipped == {} and [len(r.images) for r in got] == [2, 0, 1]
    for row, images in ((got[0], [a, b]), (got[2], [(tmp_path / "pics" / "c.png").read_bytes()])):
        ids, x = prompter.prompt(row.user_text(spec.template(row.answer_type)), reader, row.images, row.base_dir)
        want_ids, _, want_grids = reference(tokenizer, model.vision, row.question, images)
        pixels, grids = processed(images)
        assert ids == want_ids and x.image_grid_thw.tolist() == want_grids.tolist() == grids.tolist()
        torch.testing.assert_close(x.pixel_values, pixels, rtol=0, atol=0)
    assert got[0].images and x.image_grid_thw.tolist() == [[1, 6, 4]]
    ids, x = prompter.prompt(got[1].user_text(spec.template("exact")), reader)
    assert x is None and model.vision.image_token_id not in ids
    with pytest.raises(ValueError, match="has images .* but the model's prompts take none"):
        dataclasses.replace(prompter, vision=None).image_reader(spec)


def test_bad_image_rows_fail_or_are_counted(tmp_path, vl_dir):
    good = {"bytes": png(16, 16), "path": None}
    rows = [{"question": "<image> ok", "answer": "1", "images": [good]},
            {"question": "<image> unreadable", "answer": "1", "images": [{"bytes": b"not an image", "path": None}]},
            {"question": "<image> empty", "answer": "1", "images": [{"bytes": b"", "path": None}]},
            {"question": "<image> and <image>", "answer": "1", "images": [good]},
            {"question": "text only", "answer": "1", "images": []}]
    spec = BenchmarkSpec(name="v", file=str(write_parquet(tmp_path / "v.parquet", rows)), image_key="images",
                         answer_type="exact", **PIXELS)
    reader = prompter_for(vl_dir).image_reader(spec)
    with pytest.raises(DataError, match=r"v.parquet, row 2: an image cannot be read .*bad_rows: skip"):
        read_benchmark(spec, reader)
    kept, skipped = read_benchmark(dataclasses.replace(spec, bad_rows="skip"), reader)
    assert [r.question for r in kept] == ["<image> ok", "text only"]
    assert skipped == {"bad_image": 2, "image_count": 1}
    # Without the model's reader (train.eval_sets' start-up check) placeholders are still counted.
    assert read_benchmark(dataclasses.replace(spec, bad_rows="skip"))[1] == {"image_count": 1}


def hf_greedy(hf, ids: list[int], pixels, grids, image_token: int, new_tokens: int) -> list[int]:
    batch = torch.tensor([ids])
    extra = {} if pixels is None else dict(pixel_values=pixels, image_grid_thw=grids,
                                           mm_token_type_ids=(batch == image_token).int())
    out = hf.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False,
                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **extra)
    return out[0, len(ids):].tolist()


def test_rlsd_eval_runs_an_image_benchmark_on_the_embedded_engine(tmp_path, vl_dir):
    from rlsd_megatron.eval.cli import main

    root, tokenizer, model = vl_dir
    hf = random_hf_vision_language_model(model, seed=3)
    with torch.no_grad():  # image embeddings large next to the text's, so that greedy answers depend on them
        for name, param in hf.named_parameters():
            if ".merger." in name:
                param.mul_(8.0)
    hf.save_pretrained(root, safe_serialization=True)
    sizes = {0: [(16, 24), (24, 24)], 1: [(24, 16)], 3: []}  # image heights x widths of the good rows
    pictures = {i: [png(h, w, seed=10 * i + k) for k, (h, w) in enumerate(hw)] for i, hw in sizes.items()}
    rows = [{"question": "Compare <image> with <image>.", "answer": "2", "images": pictures[0]},
            {"question": "What is <image>?", "answer": "3", "images": pictures[1]},
            {"question": "<image> bad", "answer": "1", "images": [b"\x89PNG truncated"]},
            {"question": "What is 1+1?", "answer": "2", "images": pictures[3]}]
    write_parquet(tmp_path / "v.parquet", rows)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump([{
        "name": "v", "file": "v.parquet", "image_key": "images", "bad_rows": "skip", "max_new_tokens": 5,
        "temperature": 0.0, "answer_type": "exact", "prompt_template": MATH_STUDENT_TEMPLATE, **PIXELS}]))
    assert main(["--model", str(root), "--benchmarks", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "out"),
                 "--backend", "embedded", "--no-progress"]) == 0
    result = json.loads((tmp_path / "out" / "v.json").read_text())
    assert result["skipped_rows"] == {"bad_image": 1} and result["metrics"]["problems"] == 3
    got = [s["response"] for s in result["samples"]]

    want, changed = [], []
    with torch.no_grad():
        for i in (0, 1, 3):
            if pictures[i]:
                ids, _, _ = reference(tokenizer, model.vision, rows[i]["question"], pictures[i])
                pixels, grids = processed(pictures[i])
            else:
                text = MATH_STUDENT_TEMPLATE.format(question=rows[i]["question"])
                rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                         add_generation_prompt=True)
                ids = tokenizer.encode(rendered, add_special_tokens=False)
                pixels = grids = None
            new = hf_greedy(hf, ids, pixels, grids, model.vision.image_token_id, 5)
            want.append(tokenizer.decode(new, skip_special_tokens=True))
            if pictures[i]:  # other pictures of the same sizes: the same prompt ids, other pixels
                others, _ = processed([png(h, w, seed=100 + k) for k, (h, w) in enumerate(sizes[i])])
                changed.append(hf_greedy(hf, ids, others, grids, model.vision.image_token_id, 5) != new)
    assert got == want and all(want)
    assert any(changed), "the reference does not depend on the images: the test could not see them missing"


def mathvista_published(pid: str, question_type: str, answer_type: str, answer: str, *, choices=None,
                        precision=None) -> dict:
    """A row in AI4Math/MathVista's published columns (its query: hint + question + choices)."""
    query = f"Hint: answer it.\nQuestion: problem {pid}?" + (
        "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)) if choices else "")
    return {"pid": pid, "question": f"problem {pid}?", "image": f"images/{pid}.jpg",
            "decoded_image": {"bytes": png(16, 16, seed=int(pid)), "path": f"{pid}.jpg"}, "choices": choices,
            "unit": None, "precision": precision, "answer": answer, "question_type": question_type,
            "answer_type": answer_type, "metadata": {"source": "test"}, "query": query}


def official_mathvista(extracted: str, row: dict) -> bool:
    """MathVista's scorer on an extracted answer: the option's text, an int, a float rounded to
    its precision, or the text (independent of rlsd-eval's grading)."""
    if row["question_type"] == "multi_choice":
        return row["choices"][ord(extracted) - 65] == row["answer"]
    if row["answer_type"] == "integer":
        return str(int(float(extracted))) == row["answer"] and float(extracted) == int(float(extracted))
    if row["answer_type"] == "float":
        return str(round(float(extracted), int(row["precision"]))) == row["answer"]
    return extracted.lower() == row["answer"].lower()


def test_mathvista_mixed_answer_types_are_graded_as_its_scorer_does(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlsd_megatron.eval.grading import ResponseGrader
    from tools.convert_vl_benchmarks import main

    published = [mathvista_published("1", "multi_choice", "text", "6 cm", choices=["3 cm", "6 cm", "9 cm"]),
                 mathvista_published("2", "free_form", "integer", "3"),
                 mathvista_published("3", "free_form", "float", "1.45", precision=2.0),
                 mathvista_published("4", "free_form", "float", "0.8", precision=1.0),
                 mathvista_published("5", "free_form", "text", "Bob")]
    pq.write_table(pa.Table.from_pylist(published), tmp_path / "testmini-00000-of-00001.parquet")
    assert main(["mathvista", str(tmp_path / "testmini-00000-of-00001.parquet"), "--out",
                 str(tmp_path / "mathvista_testmini.parquet")]) == 0
    (spec,) = [s for s in load_benchmark_specs(VL_YAML) if s.name == "mathvista_testmini"]
    spec = dataclasses.replace(spec, file=str(tmp_path / "mathvista_testmini.parquet"))
    rows, skipped = read_benchmark(spec)
    assert skipped == {} and [r.answer_type for r in rows] == ["multiple_choice", "numeric", "numeric", "numeric",
                                                               "exact"]
    assert [r.abs_tol for r in rows] == [None, 0.0, pytest.approx(0.005), pytest.approx(0.05), None]
    assert rows[0].question.startswith("<image>\nHint: answer it.") and rows[0].question.endswith("(C) 9 cm")
    assert "Options:" not in spec.template("multiple_choice") and "[NUMERICAL Tasks]" in spec.template("numeric")
    answers = {0: ["B", "A", "C"], 1: ["3", "3.4", "4"], 2: ["1.449", "1.45", "1.4", "1.46", "1.4549"],
               3: ["0.83", "0.8", "0.86", "0.74"], 4: ["bob", "Bob", "Alice"]}
    cases = [(i, text) for i, texts in answers.items() for text in texts]
    with ResponseGrader(num_workers=1) as grader:
        graded = grader.grade(spec, [rows[i] for i, _ in cases], [f"<thought>x</thought><answer>{t}</answer>"
                                                                  for _, t in cases])
    got = [g.score == 1.0 for g in graded]
    want = [official_mathvista(text, published[i]) for i, text in cases]
    assert got == want and sum(want) == 9, list(zip(cases, got, want))


def test_mmmu_mathvision_zerobench_and_wemath_published_layouts(tmp_path):
    from tools.convert_vl_benchmarks import ImageSource, mathvision, mmmu, wemath, zerobench

    image = ImageSource(None)
    pic = {k: {"bytes": f"img{k}".encode(), "path": None} for k in (1, 2, 3)}
    row = mmmu({"id": "validation_Art_1", "question": "See <image 2>. Which of these matches <image 2>?",
                "options": "['<image 1>', 'none', '<image 3>']", "answer": "C", "question_type": "multiple-choice",
                "image_1": pic[1], "image_2": pic[2], "image_3": pic[3]}, image)
    # Image 2 first (the question mentions it first), then the options' 1 and 3; the repeat is text.
    assert row["question"] == "See <image>. Which of these matches [image 2]?"
    assert row["choices"] == ["<image>", "none", "<image>"] and row["answer_type"] == "multiple_choice"
    assert [i["bytes"] for i in row["images"]] == [b"img2", b"img1", b"img3"]
    shown = BenchmarkRow(row["question"], row["answer"], row["choices"], "w").user_text("{question}\n{choices}")
    assert shown == "See <image>. Which of these matches [image 2]?\n(A) <image>\n(B) none\n(C) <image>"
    open_row = mmmu({"id": "v2", "question": "How many?", "options": "[]", "answer": "['24/7', '3.429']",
                     "question_type": "open", "image_1": pic[1]}, image)
    assert open_row["question"] == "<image>\nHow many?" and open_row["answer"] == "24/7"
    assert open_row["answer_type"] == "math" and open_row["choices"] == []
    row = wemath({"ID": "3steps_1", "question": "Which is larger?", "option": "A. 2 cm; B. 3 cm; C. No correct answer",
                  "answer": "B", "image_path": pic[1]}, image)
    assert row["choices"] == ["2 cm", "3 cm", "No correct answer"] and row["question"] == "<image>\nWhich is larger?"
    row = mathvision({"id": "2", "question": "Which bike is most expensive?\n<image1>", "options": ["A", "B", "C"],
                      "image": "images/2.jpg", "decoded_image": pic[1], "answer": "A"}, image)
    assert row["question"] == "Which bike is most expensive?\n<image>" and row["answer_type"] == "multiple_choice"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(b"jpeg")  # an image stored as a path: its bytes are embedded
    row = mathvision({"id": "1", "question": "Which number is missing?", "options": [], "image": "images/1.jpg",
                      "decoded_image": None, "answer": "60"}, ImageSource(tmp_path))
    assert row["question"] == "<image>\nWhich number is missing?" and row["answer_type"] == "math"
    assert row["images"] == [{"bytes": b"jpeg", "path": "images/1.jpg"}]
    with pytest.raises(ValueError, match="images/9.jpg' does not exist .*--image-root"):
        ImageSource(tmp_path)("images/9.jpg")
    rows = [zerobench({"question_id": "1_1", "question_text": "How many?", "question_answer": answer,
                       "question_images_decoded": [pic[1], pic[2]]}, image) for answer in ("11.90", "blue")]
    assert rows[0]["question"] == "<image><image>\nHow many?" and [r["answer_type"] for r in rows] == ["math", "exact"]
    with pytest.raises(ValueError, match="is not 'A. ...; B. ...'"):
        wemath({"ID": "x", "question": "q", "option": "2 cm or 3 cm", "answer": "A", "image_path": pic[1]}, image)


def test_training_eval_sets_prompt_image_benchmarks_as_the_training_rows(tmp_path, vl_dir):
    """train.eval_sets on a vision-language file run: a benchmark row and a training row of the same
    question and images give the same prompt ids and pixels; a text run refuses image benchmarks."""
    from rlsd_megatron.config import DataConfig
    from rlsd_megatron.data import FilePromptDataset
    from rlsd_megatron.eval.in_training import TrainingBenchmarks

    root, tokenizer, model = vl_dir
    rows = [{"question": "Compare <image> with <image>.", "answer": "2", "images": [png(16, 24, seed=1),
                                                                                   png(24, 24, seed=2)]},
            {"question": "<image> broken", "answer": "1", "images": [b"not an image"]}]
    path = write_parquet(tmp_path / "v.parquet", rows)
    (tmp_path / "e.yaml").write_text(yaml.safe_dump([{
        "name": "v", "file": "v.parquet", "image_key": "images", "bad_rows": "skip", "answer_type": "exact",
        "prompt_template": MATH_STUDENT_TEMPLATE, **PIXELS}]))
    data = DataConfig(tokenizer_dir=str(root), bad_rows="skip", **PIXELS)
    dataset = FilePromptDataset([str(path)], data, tokenizer, vision=model.vision)
    bench = TrainingBenchmarks(str(tmp_path / "e.yaml"), dataset, dp_rank=0, dp_size=1, hosts_engine=False)
    (spec,) = bench.specs
    (row,) = bench.rows["v"]
    ids, x = bench.prompter.prompt(row.user_text(spec.template(row.answer_type)), bench.prompter.image_reader(spec),
                                   row.images, row.base_dir)
    trained = dataset[0]
    assert ids == trained.prompt_ids
    torch.testing.assert_close(x.pixel_values, trained.images.pixel_values, rtol=0, atol=0)
    torch.testing.assert_close(x.pixel_values, processed(rows[0]["images"])[0], rtol=0, atol=0)  # the model's own
    text_tokenizer_run = FilePromptDataset([str(path)], dataclasses.replace(data, bad_rows="skip"), tokenizer)
    with pytest.raises(ValueError, match="has images .* but the model's prompts take none"):
        TrainingBenchmarks(str(tmp_path / "e.yaml"), text_tokenizer_run, dp_rank=0, dp_size=1, hosts_engine=False)
    # The trainer's input checks (before the model is built) read the images with the same reader.
    from rlsd_megatron.config import Config, TrainConfig
    from rlsd_megatron.eval.in_training import eval_sets_problems

    run = Config(model=model, data=dataclasses.replace(data, train_files=[str(path)]),
                 train=TrainConfig(eval_sets=str(tmp_path / "e.yaml")))
    assert eval_sets_problems(run) == []  # the broken image is a counted skip (bad_rows: skip)
    (problem,) = eval_sets_problems(dataclasses.replace(run, model=dataclasses.replace(model, vision=None)))
    assert "has images (image_key='images') but the model's prompts take none" in problem
    (tmp_path / "strict.yaml").write_text((tmp_path / "e.yaml").read_text().replace("bad_rows: skip", "bad_rows: error"))
    (problem,) = eval_sets_problems(dataclasses.replace(run, train=TrainConfig(eval_sets=str(tmp_path / "strict.yaml"))))
    assert "v.parquet" in problem and "image" in problem


def test_the_processor_settings_travel_with_a_checkpoints_assets(tmp_path, vl_dir):
    """A converted checkpoint's hf_assets (and an export's folder) carry the processor files, so
    rlsd-eval's reader of a checkpoint uses the model's normalisation, not the defaults."""
    from rlsd_megatron.checkpoint.hf_files import copy_tokenizer_files
    from rlsd_megatron.data.images import ImageReader

    root, _, model = vl_dir
    (tmp_path / "assets").mkdir()
    assert {"preprocessor_config.json", "tokenizer_config.json"} <= set(copy_tokenizer_files(root, tmp_path / "assets"))
    reader = ImageReader(model.vision, BenchmarkSpec(name="v", file="f", **PIXELS).image_settings(),
                         str(tmp_path / "assets"))
    assert list(reader.processor.image_mean) == PREPROCESSOR["image_mean"]
