"""rlsd_megatron: RL post-training (RLSD and its baselines) on megatron-core."""

__version__ = "0.1.0"
