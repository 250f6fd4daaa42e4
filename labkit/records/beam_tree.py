"""The tree of a beam search: every candidate kept at some round, as stored in ``trace.meta.beam``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BeamNode:
    """One hypothesis of the tree: the candidate ``token_id`` appended to node ``parent`` (−1: the prompt) at
    ``step``."""

    id: int
    parent: int
    step: int
    token_id: int
    token: str
    logprob: float
    """log p of the token under its parent's distribution (nats)."""
    score: float
    """The running score it was ranked by (Σ log p nats, + λ Σ H bits)."""
    status: str = "pruned"
    """"running" (kept for the next round), "finished" (in the final finished set), "returned" (the output),
    "expanded" (a running beam with a kept child), "pruned" (dropped at ``ended_at``)."""
    final_score: float | None = None
    """For ending candidates: score / length ** length_penalty, as the finished set ranks them."""
    ended_at: int = -1
    """The round it stopped being considered."""


@dataclass
class BeamTree:
    """Every candidate kept at some round (the best 2·num_beams of each), as stored in ``trace.meta.beam``."""

    nodes: list[BeamNode]
    returned: int
    """Node id of the returned hypothesis' last token."""
    config: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BeamTree:
        """The tree from :meth:`as_dict`'s form (a saved Trace's ``meta.beam``)."""
        return cls([BeamNode(**n) for n in data["nodes"]], data["returned"], data["config"])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``trace.meta.beam`` holds): nodes, the returned node, the settings."""
        return {"nodes": [asdict(n) for n in self.nodes], "returned": self.returned, "config": self.config}

    def path(self, node: int | None = None) -> list[BeamNode]:
        """The nodes from the first token to ``node`` (default: the returned hypothesis)."""
        return [self.nodes[i] for i in path_ids(self.nodes, self.returned if node is None else node)]

    def to_pandas(self) -> Any:
        """One row per node: its fields (parent, step, token, log p in nats, scores, status)."""
        import pandas as pd

        return pd.DataFrame([asdict(n) for n in self.nodes])

    def image(self, title: str = "Beam search tree") -> Any:
        """A Picture: one column per step, each kept candidate a labelled dot joined to its parent; the returned
        path bold, finished hypotheses marked, pruned ones grey."""
        from labkit.records.figures import beam_tree_picture

        return beam_tree_picture(self, title)


def path_ids(nodes: list[BeamNode], node: int) -> list[int]:
    """Node ids from the first token to ``node`` (−1, the prompt: empty)."""
    out = []
    while node >= 0:
        out.append(node)
        node = nodes[node].parent
    return out[::-1]
