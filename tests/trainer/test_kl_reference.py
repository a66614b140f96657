"""KL to a reference policy (`algorithm.kl_coef` > 0): the textbook GRPO of examples/configs/grpo.yaml
(its algorithm section plus the textbook overrides its comment gives: symmetric clip 0.2, no dual
clip, seq-mean-token-mean, kl_coef 0.04) through the real trainer at TP=2 (k3) and PP=2 (k1).

The reference is the policy RL starts from: the KL term is exactly 0 at step 1 and positive after
an update. At step 2 the reference log-probs and the loss gradient (surrogate + KL) must equal an
independent computation: `transformers` models holding the policy's and the reference's weights
in one process, the loss written out by hand, autograd (fp32; log-probs within 1e-5, every
gradient within 1e-5 of the largest entry of the whole gradient). The reference copy survives a
save and resume. With `algorithm.kl_reference=PATH` the reference is that checkpoint's model.
"""

from __future__ import annotations

import dataclasses

import torch
import yaml

from rlsd_megatron.config import load_config
from tests.test_train_cli import DEMO
from tests.trainer.scoring_reference import hf_model_with, hf_token_log_probs, write_converted_checkpoint
from tests.trainer.test_trainer_step import TINY

LOGP_TOL = 1e-5  # fp32 log-probs, Megatron against transformers
GRAD_TOL = 1e-5  # fp32 gradients, relative to the largest gradient entry (measured: 1e-7 to 3e-7)
KL_COEF = 0.04
CLIP = 0.2


def textbook_grpo() -> list[str]:
    """examples/configs/grpo.yaml's algorithm section as overrides, then the textbook settings."""
    with open("examples/configs/grpo.yaml") as handle:
        preset = yaml.safe_load(handle)["algorithm"]
    return ([f"algorithm.{key}={'null' if value is None else value}" for key, value in preset.items()]
            + [f"algorithm.clip_high={CLIP}", "algorithm.dual_clip=null", "algorithm.loss_agg=seq-mean-token-mean",
               f"algorithm.kl_coef={KL_COEF}"])


def kl_steps(tmp: str) -> dict:
    """Per layout: steps 1 and 2, with what step 2's update saw (weights, reference, fields) and
    the gradient it computed (clipping off, so the optimizer keeps it as computed); at TP=2 a save
    and a resume."""
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    results = {}
    for tp, pp, kind in ((2, 1, "k3"), (1, 2, "k1")):
        where = f"{tmp}/tp{tp}pp{pp}"
        cfg = load_config(DEMO, [*TINY, *textbook_grpo(), f"algorithm.kl_kind={kind}", "optimizer.clip_grad=0",
                                 f"parallel.tp={tp}", f"parallel.pp={pp}", f"logging.dir={where}/logs",
                                 f"checkpoint.dir={where}/ckpt"])
        with model_parallel(tp=tp, pp=pp, seed=cfg.train.seed):
            trainer = Trainer(cfg)
            trainer.sync_weights()
            learner, initial = trainer.learner, trainer.learner.full_state()
            trainer.step = 1
            first = trainer.train_step()
            seen, update = {}, trainer.update

            def update_recording(sequences, fields, teacher=None, **kwargs):
                with learner.use_weights(trainer.reference.weights()):
                    reference = learner.full_state()
                seen.update(sequences=sequences, fields=fields, weights=learner.full_state(), reference=reference)
                stats = update(sequences, fields, teacher, **kwargs)
                seen["grads"] = learner.full_state(grads=True)
                return stats

            trainer.update = update_recording
            trainer.step = 2
            second = trainer.train_step()
            resumed = None
            if pp == 1:
                trainer.save()
                saved = {name: value.clone() for name, value in trainer.reference.weights().items()}
                trainer.close()
                trainer = Trainer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto")))
                policy = trainer.learner.local_weights()
                resumed = {"step": trainer.step,
                           "reference_kept": all(torch.equal(v, saved[k]) for k, v in trainer.reference.weights().items()),
                           "policy_moved": any(not torch.equal(v, policy[k]) for k, v in saved.items())}
            trainer.close()
        results[(tp, pp, kind)] = {
            "first": first, "second": second, "resumed": resumed, "model": cfg.model,
            "temperature": cfg.rollout.temperature,
            "reference_is_initial": all(torch.equal(seen["reference"][k], v) for k, v in initial.items()),
            **{k: seen[k] for k in ("sequences", "fields", "weights", "reference", "grads")},
        }
    return results


def independent_loss(policy, reference, sequences, fields, *, kind: str, temperature: float) -> torch.Tensor:
    """Textbook GRPO's loss written out: per sequence, the mean over its response tokens of the
    clipped surrogate plus KL_COEF × the KL estimate; then the mean over sequences. Also checks
    the trainer's reference log-probs against the reference model's."""
    per_sequence = []
    for seq, mask, old, adv, trainer_ref in zip(sequences, fields["loss_mask"], fields["old_logp"],
                                                fields["advantages"], fields["ref_logp"]):
        response = mask.bool()
        logp = hf_token_log_probs(policy, seq, temperature)[response]
        with torch.no_grad():
            ref = hf_token_log_probs(reference, seq, temperature)[response]
        torch.testing.assert_close(trainer_ref[response], ref, rtol=0, atol=LOGP_TOL)
        ratio = torch.exp(logp - old[response])
        a = adv[response]
        surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - CLIP, 1 + CLIP))
        kl = logp - ref if kind == "k1" else torch.exp(ref - logp) - (ref - logp) - 1
        per_sequence.append((surrogate + KL_COEF * kl).mean())
    return torch.stack(per_sequence).mean()


def test_textbook_grpo_kl_to_the_initial_policy_at_tp2_and_pp2(dist_pool, tmp_path):
    from rlsd_megatron.models.hf_mapping import hf_to_megatron

    results = dist_pool(2).run(kl_steps, str(tmp_path), timeout=900)[-1]  # the last stage holds the loss
    for (tp, pp, kind), r in results.items():
        where = f"tp={tp} pp={pp} {kind}"
        assert r["first"]["train/kl"] == 0.0, where  # step 1: the reference is the policy itself
        assert r["second"]["train/kl"] > 0, where  # after an update the policy has moved away from it
        assert r["reference_is_initial"], where
        policy, reference = hf_model_with(r["model"], r["weights"]), hf_model_with(r["model"], r["reference"])
        loss = independent_loss(policy, reference, r["sequences"], r["fields"], kind=kind,
                                temperature=r["temperature"])
        loss.backward()
        hf_grads = {name: param.grad for name, param in policy.named_parameters()}
        want = dict(hf_to_megatron(hf_grads.__getitem__, r["model"]))
        assert sorted(want) == sorted(r["grads"])
        scale = max(float(g.abs().max()) for g in want.values())
        for name, grad in want.items():
            error = float((r["grads"][name] - grad).abs().max())
            assert error <= GRAD_TOL * scale, f"{where} {name}: {error:.2e} > {GRAD_TOL} x {scale:.2e}"
    assert results[(2, 1, "k3")]["resumed"] == {"step": 2, "reference_kept": True, "policy_moved": True}


def kl_to_a_checkpoint(tmp: str) -> dict:
    """Step 1 with `algorithm.kl_reference` naming a converted checkpoint of another model."""
    from pathlib import Path

    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer
    from tests.trainer.test_teacher_model import TEACHER

    hf_dir, path = write_converted_checkpoint(Path(tmp) / "reference", TEACHER, seed=5)
    cfg = load_config(DEMO, [*TINY, *textbook_grpo(), f"algorithm.kl_reference={path}", "parallel.tp=2",
                             f"logging.dir={tmp}/logs"])
    with model_parallel(tp=2, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        trainer.sync_weights()
        seen, update = {}, trainer.update

        def update_recording(sequences, fields, teacher=None, **kwargs):
            seen.update(sequences=sequences, fields=fields)
            return update(sequences, fields, teacher, **kwargs)

        trainer.update = update_recording
        trainer.step = 1
        metrics = trainer.train_step()
        trainer.close()
    return {"hf_dir": hf_dir, "metrics": metrics, "temperature": cfg.rollout.temperature, **seen}


def test_kl_reference_from_a_checkpoint(dist_pool, tmp_path):
    import transformers

    r = dist_pool(2).run(kl_to_a_checkpoint, str(tmp_path), timeout=600)[-1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(r["hf_dir"], dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    for seq, mask, ref in zip(r["sequences"], r["fields"]["loss_mask"], r["fields"]["ref_logp"]):
        with torch.no_grad():
            want = hf_token_log_probs(hf, seq, r["temperature"])
        torch.testing.assert_close(ref[mask.bool()], want[mask.bool()], rtol=0, atol=LOGP_TOL)
    assert r["metrics"]["train/kl"] > 0  # another model: the KL term is on from step 1


def test_planner_counts_the_reference(tmp_path):
    from rlsd_megatron.plan import plan_memory
    from tests.test_train_cli import write_fake_checkpoint

    def plan(*overrides: str):
        return plan_memory(load_config("examples/configs/rlsd_8b.yaml", ["parallel.dp=2", "algorithm.method=grpo",
                                                                         "algorithm.teacher_weights=live", *overrides]))

    without, copy = plan(), plan(f"algorithm.kl_coef={KL_COEF}")
    assert without.kl_reference == 0 and copy.kl_reference == copy.params  # a copy of the initial policy's weights
    assert copy.training_peak - without.training_peak == copy.rollout_peak - without.rollout_peak == copy.params
    student = load_config("examples/configs/rlsd_8b.yaml").model
    write_fake_checkpoint(tmp_path / "sft", student)
    loaded = plan(f"algorithm.kl_coef={KL_COEF}", f"algorithm.kl_reference={tmp_path / 'sft'}")
    assert loaded.kl_reference == copy.params  # the same architecture, loaded: the same bytes
