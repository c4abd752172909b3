"""Bringing the engine back to a consistent state after `LLMEngine.step()` raised.

A step that raises may have stopped anywhere between scheduling and appending tokens: blocks grown for
sequences whose tokens never came, a step launched and never read. The requests it can have touched are the
running sequences and those of the launched steps; each is finished with reason "abort", which releases its
KV blocks, and the launched steps are dropped. Waiting sequences hold no blocks and stay queued.
"""

from __future__ import annotations


class RecoveryError(RuntimeError):
    """The engine's state could not be made consistent after a failed step: the engine must stop."""


def fail_step_requests(engine) -> list[str]:
    """Abort the requests of the failed step; returns their request ids. Raises RecoveryError when blocks are
    still in use afterwards (a leak: the engine cannot go on safely)."""
    sched, bm = engine.scheduler, engine.block_manager
    seqs = {id(seq): seq for seq in sched.running}
    for step in sched.launched:
        seqs.update((id(item.seq), item.seq) for item in step.batch)
    sched.launched.clear()
    ids = []
    for seq in seqs.values():
        if engine.abort_request(seq.request_id):
            ids.append(seq.request_id)
        elif not seq.is_finished:  # not tracked by the engine any more, yet still scheduled
            sched.finish(seq, "abort")
    if sched.running or bm.num_free_blocks != bm.num_blocks:  # waiting sequences hold no blocks
        raise RecoveryError(f"after failing the step's requests {bm.num_blocks - bm.num_free_blocks} KV blocks are "
                            f"in use and {len(sched.running)} sequences still run")
    return ids
