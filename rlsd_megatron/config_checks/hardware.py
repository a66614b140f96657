"""What the machine must offer (Transformer Engine, FP8, context-parallel attention) and the
activation-recompute settings megatron-core would refuse or ignore."""

from __future__ import annotations

from rlsd_megatron.config import Config


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch binding imports (it needs torch imported first)."""
    try:
        import torch  # noqa: F401  (TE's binding needs torch's libraries loaded first)
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, FileNotFoundError):
        return False
    return True


def resolve_transformer_impl(cfg: Config, *, cuda_available: bool, te_available: bool) -> str:
    """`local` or `transformer_engine`: what `precision.transformer_impl=auto` means here."""
    impl = cfg.precision.transformer_impl
    if impl == "auto":
        return "transformer_engine" if cuda_available and te_available else "local"
    return impl


def hardware_problems(cfg: Config, *, cuda_available: bool, te_available: bool) -> list[str]:
    """Precision and kernel choices that this machine cannot run."""
    problems = []
    prec = cfg.precision
    impl = resolve_transformer_impl(cfg, cuda_available=cuda_available, te_available=te_available)
    if impl == "transformer_engine" and not (cuda_available and te_available):
        problems.append(
            "precision.transformer_impl=transformer_engine needs a CUDA GPU and Transformer Engine "
            f"(cuda available: {cuda_available}, TE importable: {te_available}); install .[gpu] on a GPU "
            "machine or use precision.transformer_impl=local"
        )
    if prec.fp8 != "none" and impl != "transformer_engine":
        problems.append(
            f"precision.fp8={prec.fp8} needs Transformer Engine layers on a GPU (resolved transformer_impl="
            f"{impl}); set precision.fp8=none on CPU"
        )
    if prec.fp8 != "none" and prec.params_dtype == "fp32":
        problems.append("precision.fp8 needs precision.params_dtype=bf16 (FP8 GEMMs with bf16 master compute)")
    if cfg.parallel.cp > 1 and impl != "transformer_engine":
        problems.append(
            f"parallel.cp={cfg.parallel.cp} needs Transformer Engine attention on GPUs (megatron-core's "
            "context-parallel attention is TE-only); use parallel.cp=1 here"
        )
    return problems + recompute_problems(cfg)


def recompute_problems(cfg: Config) -> list[str]:
    """Activation recomputation settings megatron-core's TransformerConfig would refuse at model build
    (a bare ValueError), or ignore: recompute_method / recompute_num_layers apply to full recomputation only."""
    prec = cfg.precision
    if prec.recompute_granularity != "full":
        if prec.recompute_method is None and prec.recompute_num_layers is None:
            return []
        return [f"precision.recompute_method={prec.recompute_method} / recompute_num_layers={prec.recompute_num_layers} "
                f"apply to recompute_granularity=full only (got {prec.recompute_granularity}); unset them"]
    if prec.recompute_method is None or prec.recompute_num_layers is None:
        return ["precision.recompute_granularity=full needs precision.recompute_method (uniform or block) and "
                f"precision.recompute_num_layers (got {prec.recompute_method} and {prec.recompute_num_layers})"]
    if prec.recompute_num_layers < 1:  # uniform would loop forever on 0 (groups of 0 layers)
        return [f"precision.recompute_num_layers={prec.recompute_num_layers} must be >= 1 (uniform: layers per "
                "recomputed group; block: recomputed layers per pipeline stage)"]
    return []
