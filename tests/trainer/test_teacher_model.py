"""OPD with a real teacher model (`algorithm.teacher_model`), through the real trainer at TP=2 and
PP=2 over gloo.

The teacher is larger than the student and of another family (a Qwen2-style model with QKV bias
and tied embeddings, 4 layers of width 48, against the demo's 2-layer width-32 Llama student),
written by the HF → Megatron converter. Its log-probs of the student's rollout tokens, in the
student's own prompt (no hint), must equal the same HF model's in one process (fp32, 1e-5); OPD's
advantages are teacher − student log-probs, not zero, and change when the teacher's weights do;
a run saves and resumes with the teacher re-loaded from its path. Missing, unreadable and
wrong-vocabulary teacher checkpoints are refused before any model is built.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlsd_megatron import train
from rlsd_megatron.config import ModelConfig, load_config
from tests.hf_models import tiny_model
from tests.test_train_cli import DEMO, run_main, write_fake_checkpoint
from tests.trainer.scoring_reference import hf_token_log_probs, write_converted_checkpoint
from tests.trainer.test_trainer_step import TINY

TOL = 1e-5  # fp32 log-probs, Megatron at TP=2 / PP=2 against transformers in one process
TEACHER = tiny_model("qwen2", vocab_size=16, hidden_size=48, num_layers=4, ffn_hidden_size=96,
                     max_position_embeddings=64)
OPD = ["algorithm.method=opd", "algorithm.teacher_weights=separate"]


def opd_steps(tmp: str) -> dict:
    """Per layout: one step's rollouts scored by the teacher, again (same rollouts) after the
    teacher's weights changed, then a real update; at TP=2 also a save and a resume."""
    from pathlib import Path

    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    hf_dir, teacher = write_converted_checkpoint(Path(tmp) / "teacher", TEACHER, seed=3)
    results = {"hf_dir": hf_dir}
    for tp, pp in ((2, 1), (1, 2)):
        where = f"{tmp}/tp{tp}pp{pp}"
        cfg = load_config(DEMO, [*TINY, *OPD, f"algorithm.teacher_model={teacher}", f"parallel.tp={tp}",
                                 f"parallel.pp={pp}", f"logging.dir={where}/logs", f"checkpoint.dir={where}/ckpt"])
        with model_parallel(tp=tp, pp=pp, seed=cfg.train.seed):
            trainer = Trainer(cfg)
            trainer.sync_weights()
            trainer.step = 1
            seen, update = {}, trainer.update

            def capture(sequences, fields, teacher=None, **kwargs):
                seen.update(sequences=sequences, fields=fields)
                return {}

            def scored() -> dict:
                """A step's scoring without the update, from the loader position of `start`."""
                trainer.loader.load_state_dict(start[0])
                trainer._draws = start[1]
                trainer.update = capture
                trainer.train_step()
                return dict(seen)

            start = (trainer.loader.state_dict(), trainer._draws)
            first = scored()
            loaded = trainer.teacher_model.full_state()
            generator = torch.Generator().manual_seed(0)  # the same change on every rank
            trainer.teacher_model.load_full_state({name: value + 0.1 * torch.randn(value.shape, generator=generator)
                                                   for name, value in loaded.items()})
            second = scored()
            trainer.loader.load_state_dict(start[0])
            trainer._draws = start[1]
            trainer.update = update
            before = trainer.learner.full_state()
            metrics = trainer.train_step()
            after = trainer.learner.full_state()
            resumed = None
            if pp == 1:
                trainer.save()
                trainer.close()
                again = Trainer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto")))
                # The teacher comes from its path again (the change above was in memory only).
                resumed = {"step": again.step, "teacher_equal": all(
                    torch.equal(value, loaded[name]) for name, value in again.teacher_model.full_state().items()),
                    "student_equal": all(torch.equal(value, after[name])
                                         for name, value in again.learner.full_state().items())}
                trainer = again
            trainer.close()
        prompt_lengths = [int(mask.argmax()) for mask in first["fields"]["loss_mask"]]
        results[(tp, pp)] = {
            "sequences": first["sequences"], "prompt_lengths": prompt_lengths,
            "old_logp": first["fields"]["old_logp"], "advantages": first["fields"]["advantages"],
            "same_rollouts": all(torch.equal(a, b) for a, b in zip(first["sequences"], second["sequences"])),
            "advantages_after_change": second["fields"]["advantages"], "metrics": metrics,
            "changed": sum(not torch.equal(before[k], after[k]) for k in before), "total": len(before),
            "resumed": resumed,
        }
    return results


def test_opd_scores_with_its_teacher_model_at_tp2_and_pp2(dist_pool, tmp_path):
    import transformers

    results = dist_pool(2).run(opd_steps, str(tmp_path), timeout=900)[-1]  # the last stage's rank
    hf = transformers.AutoModelForCausalLM.from_pretrained(results["hf_dir"], dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    temperature = load_config(DEMO).rollout.temperature
    for layout in ((2, 1), (1, 2)):
        r = results[layout]
        assert r["same_rollouts"], layout
        nonzero = 0
        for seq, n, old, adv, adv_changed in zip(r["sequences"], r["prompt_lengths"], r["old_logp"], r["advantages"],
                                                 r["advantages_after_change"]):
            with torch.no_grad():
                want = hf_token_log_probs(hf, seq, temperature)[n:]  # the student's prompt, no hint
            teacher = adv[n:] + old[n:]  # A_t = log π_T − log π_S (opd_reward_weight = 0)
            torch.testing.assert_close(teacher, want, rtol=0, atol=TOL, msg=str(layout))
            assert torch.all(adv[:n] == 0)
            nonzero += int((adv[n:].abs() > 1e-3).sum())
            assert (adv_changed[n:] - adv[n:]).abs().max() > 1e-2, layout  # another teacher, other advantages
        assert nonzero > 0, layout
        assert r["changed"] == r["total"] and r["metrics"]["train/grad_norm"] > 0, layout  # the student trains
    assert results[(2, 1)]["resumed"] == {"step": 1, "teacher_equal": True, "student_equal": True}


# ---------------------------------------------------------------------------------------------
# Refused before the model is built


def test_missing_teacher_model_is_refused_before_the_model_is_built(dist_pool):
    argv = ["--config", DEMO, *OPD, "algorithm.teacher_model=/does/not/exist", "warm_start.max_steps=0"]
    first, second = dist_pool(2).run(run_main, [argv, argv])
    assert first["stderr"] == ("rlsd-train: error: algorithm.teacher_model='/does/not/exist' does not exist; point it "
                               "at a checkpoint written by tools/convert_hf_to_megatron.py or by the trainer (e.g. "
                               "warm_start.output)\n")
    assert second["stderr"] == "" and first["status"] == second["status"] == 2
    assert not first["learner_built"] and not second["learner_built"]


def test_teacher_with_another_vocabulary_is_refused_naming_both_sizes(dist_pool, tmp_path):
    write_fake_checkpoint(tmp_path / "teacher", dataclasses.replace(TEACHER, vocab_size=32))
    argv = ["--config", DEMO, *OPD, f"algorithm.teacher_model={tmp_path / 'teacher'}", "warm_start.max_steps=0"]
    first, second = dist_pool(2).run(run_main, [argv, argv])
    assert first["stderr"] == (f"rlsd-train: error: algorithm.teacher_model='{tmp_path / 'teacher'}' has vocab_size 32 "
                               "and the policy model.vocab_size 16: it scores the policy's token ids, so it must share "
                               "the policy's tokenizer; use a checkpoint of a model with the same vocabulary\n")
    assert second["stderr"] == "" and first["status"] == second["status"] == 2
    assert not first["learner_built"] and not second["learner_built"]


def test_frozen_model_checks(tmp_path):
    from rlsd_megatron.config_checks import algorithm_problems

    def problems(*overrides: str) -> list[str]:
        return train.input_problems(load_config(DEMO, ["warm_start.max_steps=0", *overrides]))

    write_fake_checkpoint(tmp_path / "teacher", TEACHER)
    assert problems(*OPD, f"algorithm.teacher_model={tmp_path / 'teacher'}") == []
    # Loaded under the policy's layout: its 4 heads and 2 query groups do not split over TP=3.
    found = problems(*OPD, f"algorithm.teacher_model={tmp_path / 'teacher'}", "model.num_attention_heads=3",
                     "model.hidden_size=48", "parallel.tp=3")
    prefix = (f"algorithm.teacher_model='{tmp_path / 'teacher'}' is loaded under the policy's layout, and its "
              "architecture does not fit it: ")
    assert found == [prefix + "model.num_attention_heads=4 is not divisible by parallel.tp=3; pick a tp that divides it",
                     prefix + "model.num_query_groups=2 is not divisible by parallel.tp=3; use tp <= 2 that divides it "
                              "(Megatron does not replicate KV heads)"]
    # A checkpoint whose metadata cannot be read.
    write_fake_checkpoint(tmp_path / "garbled", TEACHER)
    (tmp_path / "garbled" / "release" / "rlsd_checkpoint.json").write_text("{not json")
    (problem,) = problems(*OPD, f"algorithm.teacher_model={tmp_path / 'garbled'}")
    assert problem.startswith(f"algorithm.teacher_model='{tmp_path / 'garbled'}': its rlsd_checkpoint.json cannot be "
                              "read (JSONDecodeError: ")
    # The KL reference checkpoint gets the same checks.
    (problem,) = problems("algorithm.kl_coef=0.04", "algorithm.kl_reference=/nope/reference")
    assert problem.startswith("algorithm.kl_reference='/nope/reference' does not exist")
    write_fake_checkpoint(tmp_path / "small", dataclasses.replace(TEACHER, vocab_size=8))
    (problem,) = problems("algorithm.kl_coef=0.04", f"algorithm.kl_reference={tmp_path / 'small'}")
    assert "has vocab_size 8 and the policy model.vocab_size 16" in problem
    # Fields no code would read with these settings are refused by the config checks.
    assert algorithm_problems(load_config(DEMO, ["algorithm.teacher_model=/ckpt/teacher"])) == [
        "algorithm.teacher_model='/ckpt/teacher' is OPD's separate teacher and method rlsd does not read it; unset it "
        "or use method opd"]
    assert algorithm_problems(load_config(DEMO, ["algorithm.kl_reference=/ckpt/sft"])) == [
        "algorithm.kl_reference='/ckpt/sft' is the KL term's reference, but algorithm.kl_coef=0 turns the term off; "
        "set kl_coef > 0 (e.g. 0.04) or unset kl_reference"]


# ---------------------------------------------------------------------------------------------
# The memory planner

# Qwen3-32B (its config.json): 64 layers, d 5120, 64 heads / 8 KV groups of dim 128, SwiGLU 25600,
# vocab 151936 (Qwen3-8B's tokenizer), untied; Qwen reports 32.8B parameters.
QWEN3_32B = ModelConfig(family="qwen3", vocab_size=151936, hidden_size=5120, num_layers=64, num_attention_heads=64,
                        num_query_groups=8, kv_channels=128, ffn_hidden_size=25600, qk_layernorm=True)


def test_planner_counts_the_teacher_model_under_the_students_layout(tmp_path, capsys):
    from rlsd_megatron.plan import main, plan_memory

    write_fake_checkpoint(tmp_path / "teacher", QWEN3_32B)
    opd = [*OPD, f"algorithm.teacher_model={tmp_path / 'teacher'}"]
    # Qwen3-8B at tp=4, scored by itself (no teacher copy) as the baseline.
    student = load_config("examples/configs/rlsd_8b.yaml", ["parallel.dp=2", "algorithm.teacher_weights=live"])
    plan = plan_memory(load_config("examples/configs/rlsd_8b.yaml", ["parallel.dp=2", *opd]))
    # 32.8B bf16 parameters split over the student's 4 tensor-parallel ranks.
    assert plan.teacher_model / 2 == pytest.approx(32.8e9 / 4, rel=0.01)
    assert plan.kl_reference == 0
    without = plan_memory(student)
    assert plan.training_peak - without.training_peak == plan.teacher_model
    assert plan.rollout_peak - without.rollout_peak == plan.teacher_model
    status, out, err = main(["--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8", *opd]), *capsys.readouterr()
    assert f"{'teacher model (OPD)':32s} {plan.teacher_model / 2**30:10.2f}" in (out + err).splitlines()
    status, out, err = main(["--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8", *OPD,
                             "algorithm.teacher_model=/nope/teacher"]), *capsys.readouterr()
    assert (status, out) == (2, "") and err.startswith("rlsd-plan: error: algorithm.teacher_model='/nope/teacher' does "
                                                       "not exist")
