"""One Prometheus exposition from the replicas' /metrics: each replica's samples with the label
`replica="i"`, and the whole server's samples without that label: the sum over replicas (counters, histograms,
counts), or the mean for gauges that are fractions (names with `perc` or `ratio`, e.g. the KV-cache usage).
`*_created` samples (start timestamps) are kept per replica only."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def _is_fraction(family: Metric) -> bool:
    return family.type == "gauge" and ("perc" in family.name or "ratio" in family.name)


def merge_families(texts: dict[int, str]) -> list[Metric]:
    """The families of every replica's exposition (replica index -> text), relabelled, plus the totals."""
    merged: dict[str, Metric] = {}
    totals: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            out = merged.get(family.name)
            if out is None:
                out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.samples.append(Sample(s.name, {**s.labels, REPLICA_LABEL: str(replica)}, s.value, s.timestamp,
                                          s.exemplar))
                if not s.name.endswith("_created"):
                    totals[family.name][(s.name, tuple(sorted(s.labels.items())))].append(s.value)
    for name, samples in totals.items():
        family = merged[name]
        combine = (lambda v: sum(v) / len(v)) if _is_fraction(family) else sum
        family.samples[:0] = [Sample(sample, dict(labels), combine(values)) for (sample, labels), values
                              in samples.items()]
    return list(merged.values())


class Families:
    """What generate_latest reads: an object whose collect() yields metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


def merge_expositions(texts: dict[int, str]) -> bytes:
    return generate_latest(Families(merge_families(texts)))
