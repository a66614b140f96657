"""The built-in task behind the dataset interface reproduces the task module's own prompts."""

from rlsd_megatron.data import PromptLoader, ReversedAdditionPrompts
from rlsd_megatron.data import reversed_addition as task


def test_rows_and_prompts_match_the_task():
    tokenizer = task.CharTokenizer()
    train = ReversedAdditionPrompts("train")
    assert len(train) == 1_000_000
    problem = task.AdditionProblem(123, 456)
    row = train[123 * 1000 + 456]
    assert (row.question, row.answer, row.reference_solution) == ("321+654", "9750", None)
    assert row.prompt_ids == task.student_prompt(tokenizer, problem)
    response = task.answer_ids(tokenizer, problem.answer)
    teacher = train.teacher_context.build(row.question, row.answer, response)
    assert teacher.input_ids == task.teacher_prompt(tokenizer, problem, problem.answer) + response
    assert teacher.response_start == len(task.teacher_prompt(tokenizer, problem, problem.answer))
    assert train.decode(response) == "9750" and train.eos_id == tokenizer.eos_id and train.pad_id == tokenizer.pad_id


def test_validation_split_is_the_demo_set_and_loader_works():
    val = ReversedAdditionPrompts("val")
    expected = task.sample_problems(256, seed=10**6)
    assert [(val[i].question, val[i].answer) for i in range(len(val))] == [(p.question, p.answer) for p in expected]
    loader = PromptLoader(ReversedAdditionPrompts("train"), global_batch_size=16, seed=1234)
    rows = loader.next_batch()
    assert len({r.index for r in rows}) == 16 and all(r.prompt_ids[-1] == task.CharTokenizer().ids["="] for r in rows)
