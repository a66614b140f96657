"""Reward functions for the custom-reward tests, imported by dotted path in verifier workers."""

import os
import time


def length_bonus(response, ground_truth):
    return 1.0 if response.strip() == ground_truth else 0.25


def with_components(response, ground_truth, *, question, response_length):
    return {"reward": float(response == ground_truth), "length": float(response_length), "has_q": float(bool(question))}


def takes_everything(response, ground_truth, **info):
    return 0.5 if info["question"] == "q" and info["response_length"] == 3 else -1.0


def misbehaving(response, ground_truth):
    """Behaves per the response text: hang, raise, die, or return something invalid."""
    if response == "hang":
        while True:
            time.sleep(0.05)
    if response == "spin":  # a CPU loop that never sleeps (no signal would interrupt it)
        while True:
            pass
    if response == "raise":
        raise RuntimeError("reward function exploded")
    if response == "die":
        os._exit(3)
    if response == "nan":
        return float("nan")
    if response == "text":
        return "1.0"
    return 1.0


def one_argument(response):
    return 0.0


async def coroutine(response, ground_truth):
    return 0.0


NOT_CALLABLE = 3


def worker_state(response, ground_truth):
    """What a verifier worker has loaded, and its pid (to check isolation and replacement)."""
    import sys

    return {"reward": float(os.getpid()), "torch_loaded": float("torch" in sys.modules),
            "megatron_loaded": float(any(m.startswith("megatron") for m in sys.modules))}


def allocate(response, ground_truth):
    """Allocates 8 GiB: over the workers' address-space cap, so it must fail with MemoryError."""
    return float(len(bytearray(8 * 1024**3)))
