"""`rlsd-train` / `python -m rlsd_megatron.train`: the RL post-training entry point.

    torchrun --nproc-per-node 2 -m rlsd_megatron.train --config examples/configs/cpu_demo.yaml
    torchrun --nproc-per-node 8 -m rlsd_megatron.train --config examples/configs/rlsd.yaml \\
        model.hf_config=/ckpt/Qwen3-8B data.train_files=[train.parquet] data.tokenizer_dir=/ckpt/Qwen3-8B

The config is loaded and checked (layout, algorithm, hardware, and on GPUs the memory plan)
before any process group starts work; every rank then runs the same `Trainer`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsd-train", description="RL post-training with RLSD and its baselines")
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optimizer.lr=1e-6")
    args = parser.parse_intermixed_args(argv)

    from rlsd_megatron.logging.quiet import quiet_known_noise

    quiet_known_noise()
    import torch
    import torch.distributed as dist

    from rlsd_megatron.config import ConfigError, load_config
    from rlsd_megatron.config_checks import resolve_transformer_impl, transformer_engine_available, validate_config
    from rlsd_megatron.parallel.state import Layout, init_distributed, initialize_model_parallel

    cuda = torch.cuda.is_available()
    try:
        cfg = load_config(args.config, args.overrides)
        init_distributed()
        validate_config(cfg, dist.get_world_size())
        if cuda:
            from rlsd_megatron.plan import check_fits

            check_fits(cfg, dist.get_world_size())
    except ConfigError as error:  # the user's to fix: the message, not a traceback
        print(f"rlsd-train: error: {error}", file=sys.stderr)
        return 2
    impl = resolve_transformer_impl(cfg, cuda_available=cuda, te_available=cuda and transformer_engine_available())
    p = cfg.parallel
    initialize_model_parallel(Layout(p.tp, p.pp, p.cp, p.vpp), seed=cfg.train.seed)

    from rlsd_megatron.trainer.trainer import Trainer

    Trainer(cfg, impl=impl).run()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
