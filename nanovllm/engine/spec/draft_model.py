"""A draft model proposes: a smaller model with the target's tokenizer (or the target itself, for tests) runs k
greedy decode steps per verify step, with its own KV cache, block manager and CUDA graphs, its kernels from the
same registry (the engine's kernel table).

Each target sequence has a draft twin (a Sequence of the draft's own). Before proposing, the twin takes the
target's tokens: its drafts that the target did not keep are dropped, and its computed count falls back to the
tokens both agree on, so the next draft step recomputes only what changed (the kept tokens' K/V stays).
"""

from __future__ import annotations

import dataclasses
import logging

from nanovllm.checkpoints import resolve_model
from nanovllm.config import SpeculativeConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledSeq
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.engine.spec.proposer import Proposer, register_proposer
from nanovllm.sampling_params import SamplingParams

log = logging.getLogger("nanovllm")


@register_proposer("draft_model")
class DraftModelProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, engine):
        from nanovllm.engine.model_runner import ModelRunner

        super().__init__(config, engine)
        target = engine.config
        path = resolve_model(config.model, revision=config.revision)
        per_seq = -(-target.max_model_len // target.kvcache_block_size)
        self.runner_config = dataclasses.replace(
            target, model=config.model, revision=config.revision, speculative_config=SpeculativeConfig(),
            max_num_seqs=config.max_batch_size, async_scheduling=False, cpu_offload_gb=0.0,
            # GPU: room for every speculating sequence at full length, plus one more to switch sequences, fixed
            # before the target's KV cache takes what is left; CPU: within cpu_kvcache_gib, as the target
            num_kvcache_blocks=(config.max_batch_size + 1) * per_seq if target.device.startswith("cuda") else -1)
        self.runner = ModelRunner(self.runner_config, path)
        self.block_manager = BlockManager(self.runner.num_blocks, target.kvcache_block_size,
                                          enable_prefix_caching=False)
        self.params = SamplingParams(temperature=0.0, max_tokens=target.max_model_len)
        self.twins: dict[int, tuple[Sequence, Sequence, int]] = {}  # target seq_id -> (target, twin, synced)

    def _twin(self, seq: Sequence) -> Sequence:
        """The draft twin of `seq`, holding exactly the target's tokens, its KV kept where they agree."""
        entry = self.twins.get(seq.seq_id)
        if entry is None:
            twin = Sequence(seq.token_ids, self.params)
            twin.status = Status.RUNNING
        else:
            _, twin, synced = entry
            agree = synced  # tokens before `synced` were the target's at the last sync
            end = min(twin.num_tokens, seq.num_tokens)
            while agree < end and twin.token_ids[agree] == seq.token_ids[agree]:
                agree += 1
            del twin.token_ids[agree:]
            twin.token_ids.extend(seq.token_ids[agree:])
            twin.num_computed_tokens = min(twin.num_computed_tokens, agree, twin.num_tokens - 1)
        self.twins[seq.seq_id] = (seq, twin, seq.num_tokens)
        return twin

    def _room(self, twin: Sequence, num_tokens: int, keep: set[int]) -> bool:
        """KV blocks for `num_tokens` of the twin, evicting twins of sequences outside `keep` if needed."""
        if self.block_manager.grow(twin, num_tokens):
            return True
        for seq_id in [s for s in self.twins if s not in keep]:
            self.block_manager.release(self.twins.pop(seq_id)[1])
            if self.block_manager.grow(twin, num_tokens):
                return True
        return False

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[list[int]]:
        for seq_id in [s for s, (target, _, _) in self.twins.items() if target.is_finished]:
            self.release(self.twins[seq_id][0])
        keep = {seq.seq_id for seq in seqs}
        out: list[list[int]] = [[] for _ in seqs]
        active = []
        for i, (seq, k) in enumerate(zip(seqs, max_tokens)):
            if k > 0:
                twin = self._twin(seq)
                if self._room(twin, twin.num_tokens, keep):
                    active.append((i, twin))
                else:
                    self.release(seq)
        while active:
            batch = [ScheduledSeq(twin, twin.num_tokens - twin.num_computed_tokens) for _, twin in active]
            self.runner.ensure_graph(batch)
            tokens, _ = self.runner.run(batch)
            still = []
            for (i, twin), token in zip(active, tokens):
                twin.num_computed_tokens = twin.num_tokens
                twin.token_ids.append(token)
                out[i].append(token)
                if len(out[i]) < max_tokens[i] and self._room(twin, twin.num_tokens, keep):
                    still.append((i, twin))
            active = still
        return out

    def release(self, seq: Sequence) -> None:
        entry = self.twins.pop(seq.seq_id, None)
        if entry is not None:
            self.block_manager.release(entry[1])

    def close(self) -> None:
        self.twins.clear()
        self.runner.close()
