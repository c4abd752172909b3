"""How one step runs: through a CUDA graph or eagerly, how its tokens are sampled, and whether it may be
launched before the step in flight is read. Decided in one place, once per step."""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.engine.logits_processing import adjusts_logits

GREEDY = "greedy"
SAMPLED = "sampled"
FILTERED = "filtered"
LOGPROBS = "logprobs"
ADJUSTED = "adjusted"


@dataclass(frozen=True)
class StepMode:
    """The mode of one step.

    graph:      the step replays a captured decode graph: the runner has graphs, every row decodes one token
                that completes it, and a captured batch size holds the batch. Otherwise (prefill chunks, mixed
                steps, `enforce_eager`, CPU, batches larger than every captured size) the forward pass runs
                eagerly and the tokens are sampled after it, all filters and logprobs included.
    sampling:   of the rows that complete (every row, in a graph step):
                GREEDY    every row has temperature 0: argmax inside the greedy graph;
                SAMPLED   temperature-only sampling: inside the sampled graph, whose temperature and noise
                          buffers the runner fills before the replay;
                FILTERED  a sampled row uses top-k, top-p or min-p: inside the filtered graph for small
                          batches (cuda_graphs.FILTERED_MAX_ROWS), else the greedy graph's hidden states are
                          sampled outside it;
                LOGPROBS  a row asks for logprobs (checked first): the graph's hidden states give logits and
                          logprobs outside it, which need the host;
                ADJUSTED  a row's logits change before sampling (penalties, logit_bias, min_tokens: see
                          engine/logits_processing.py): the graph samples every row as if none were (the
                          `unadjusted` mode), then the adjusted rows are sampled again outside it, from logits
                          of their hidden states adjusted from the host's token lists.
    masked:     a row's output is constrained by a grammar (SamplingParams.structured): as ADJUSTED, the graph
                samples every row, then the constrained rows are sampled again from their logits under the
                grammar's token mask. Steps without such rows are not affected.
    run_ahead:  the step may be launched before the step in flight is read, and the step after it launched on
                its device tokens (async scheduling): a graph step that is not LOGPROBS, with `async_scheduling`
                on. Otherwise the step runs synchronously.
    deferred:   (ADJUSTED or masked) the sampling needs the host's view of every earlier token: the grammar
                state after the previous token, the token counts. Launched ahead, such a step queues its forward
                pass at once and samples once the step before it is read (DeferredTokens, engine/step_tokens.py), so
                the host fills masks and counts while the GPU runs the forward pass.
    """

    graph: bool
    sampling: str
    run_ahead: bool
    masked: bool = False

    @property
    def deferred(self) -> bool:
        return self.masked or self.sampling == ADJUSTED

    @classmethod
    def of(cls, batch, graphs, async_scheduling: bool) -> StepMode:
        """The mode of `batch` (ScheduledSeqs) given the runner's DecodeGraphs (None: eager only)."""
        graph = graphs is not None and graphs.fits(batch)
        seqs = [item.seq for item in batch if item.completes]
        params = [seq.params for seq in seqs]
        if any(p.logprobs is not None for p in params):
            sampling = LOGPROBS
        elif any(adjusts_logits(seq) for seq in seqs):
            sampling = ADJUSTED
        else:
            sampling = plain_sampling(params)
        masked = any(p.structured is not None for p in params)
        run_ahead = async_scheduling and graph and sampling != LOGPROBS
        return cls(graph, sampling, run_ahead, masked)

    def unadjusted(self, params) -> StepMode:
        """The mode of the same rows with nothing adjusting or masking their logits (`params`: their
        SamplingParams): how a graph samples every row before the adjusted and masked ones are sampled again."""
        return StepMode(self.graph, plain_sampling(params), self.run_ahead)


def plain_sampling(params) -> str:
    """GREEDY, FILTERED or SAMPLED: how rows with these SamplingParams are sampled when nothing adjusts their
    logits and none asks for logprobs."""
    if all(p.greedy for p in params):
        return GREEDY
    if any(p.top_k > 0 or p.top_p != 1.0 or p.min_p != 0.0 for p in params):
        return FILTERED
    return SAMPLED
