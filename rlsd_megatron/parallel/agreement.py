"""Collective agreement on problems that differ between ranks: a rank that stops alone leaves
the others waiting in their next collective, and its message among theirs.

Two ways to agree, on one gathering of every rank's problems: `report_problems` (the launcher's
checks: rank 0 prints each distinct problem once, naming the ranks and hosts that saw it, and
every rank learns whether any had one) and `same_on_every_rank` (bad input found while building
something: every rank raises, naming the ranks that saw it).
"""

from __future__ import annotations

import socket
import sys

import torch.distributed as dist


def _gather(mine, group=None) -> list:
    """Every rank's `mine` (collective over `group`), in rank order."""
    seen: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, mine, group=group)
    return seen


def _ranks_by_problem(problems_per_rank: list[list[str]]) -> dict[str, list[int]]:
    """Each distinct problem (in first-seen order) → the ranks that saw it."""
    ranks: dict[str, list[int]] = {}
    for rank, problems in enumerate(problems_per_rank):
        for problem in problems:
            ranks.setdefault(problem, []).append(rank)
    return ranks


def ranks_text(ranks: list[int]) -> str:
    """`3`, `0-3`, `0-3, 8-11`."""
    spans: list[list[int]] = []
    for rank in sorted(ranks):
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def format_report(reports: list[tuple[str, list[str]]], prog: str = "rlsd-train") -> list[str]:
    """One `<prog>: error: ...` entry per distinct problem of `reports` (host, problems per
    rank), naming the ranks (and hosts) that saw it unless every rank did."""
    world = len(reports)
    lines = []
    for problem, ranks in _ranks_by_problem([problems for _, problems in reports]).items():
        where = ""
        if len(ranks) < world:
            hosts = sorted({reports[rank][0] for rank in ranks})
            where = (f"on rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)} of {world} "
                     f"(host{'s' if len(hosts) > 1 else ''} {', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''}): ")
        lines.append(f"{prog}: error: {where}{problem}")
    return lines


def report_problems(problems: list[str], *, prog: str, group=None) -> bool:
    """Collective: every rank's problems are gathered; global rank 0 prints each distinct one once
    on stderr (`format_report`). Returns whether any rank had one (the same answer on every rank)."""
    reports = _gather((socket.gethostname(), problems), group)
    if not any(found for _, found in reports):
        return False
    if dist.get_rank() == 0:
        print("\n".join(format_report(reports, prog)), file=sys.stderr, flush=True)
    return True


def report_late_problem(error: Exception, *, prog: str, group) -> None:
    """Bad input found after start-up (on every rank when the input is the same everywhere):
    reported once when every rank reports within `group`'s timeout, else by this rank, naming
    itself (the others are not coming: they wait in some other collective)."""
    try:
        report_problems([str(error)], prog=prog, group=group)
    except Exception:  # the gloo timeout: not every rank hit this
        print(f"{prog}: error: on rank {dist.get_rank()} of {dist.get_world_size()} ({socket.gethostname()}): "
              f"{error}", file=sys.stderr, flush=True)


def same_on_every_rank(build, errors: type[BaseException] | tuple[type[BaseException], ...], group=None):
    """`build()` on every rank (collective). When it raises one of `errors` (bad input) on any
    rank, every rank raises it (the first failing rank's type), naming the ranks when not all saw
    it: a rank that stopped alone would leave the others waiting in their next collective and its
    message among theirs. `group`: the ranks that agree (default: the world)."""
    result, mine = None, None
    try:
        result = build()
    except errors as exc:
        mine = (type(exc), str(exc))
    seen = _gather(mine, group)
    failed = [found for found in seen if found is not None]
    if not failed:
        return result
    by_message = _ranks_by_problem([[found[1]] if found is not None else [] for found in seen])
    if len(failed) == len(seen) and len(by_message) == 1:
        message = next(iter(by_message))
    else:
        message = "; ".join(f"{text} (rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)} of {len(seen)})"
                            for text, ranks in by_message.items())
    raise failed[0][0](message)
