"""Collective agreement on outcomes that differ between ranks: a rank that stops alone leaves
the others waiting in their next collective, and its message among theirs."""

from __future__ import annotations

import torch.distributed as dist


def same_on_every_rank(build, errors: type[BaseException] | tuple[type[BaseException], ...]):
    """`build()` on every rank (collective). When it raises one of `errors` (bad input) on any
    rank, every rank raises it, naming the ranks when not all saw it: a rank that stopped alone
    would leave the others waiting in their next collective and its message among theirs."""
    result, mine = None, None
    try:
        result = build()
    except errors as exc:
        mine = (type(exc), str(exc))
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    failed = {rank: found for rank, found in enumerate(seen) if found is not None}
    if not failed:
        return result
    by_message: dict[str, list[int]] = {}
    for rank, (_, message) in failed.items():
        by_message.setdefault(message, []).append(rank)
    if len(failed) == len(seen) and len(by_message) == 1:
        message = next(iter(by_message))
    else:
        message = "; ".join(f"{text} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of "
                            f"{len(seen)})" for text, ranks in by_message.items())
    raise next(iter(failed.values()))[0](message)
