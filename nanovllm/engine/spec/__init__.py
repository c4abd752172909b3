"""Speculative decoding: proposers guess the next k tokens of a sequence, the target model scores all of them
in one verify step (engine/spec/verify.py), and the tokens it agrees with are kept (engine/spec/rejection.py)."""

from nanovllm.engine.spec.proposer import PROPOSERS, Proposer, make_proposer, register_proposer

__all__ = ["PROPOSERS", "Proposer", "make_proposer", "register_proposer"]
