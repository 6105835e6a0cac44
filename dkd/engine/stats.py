"""Run-time statistics written next to the metrics (rank 0 only, outside the math):

- `rank_stats.json/.png`: for PDBS runs, which teacher ranks the selection picks, per
  phase of training, with the fitted two-Laplace mixture (the paper's Figs. 3 and 5);
- `proposal.jsonl`: the DIS/uniform proposal over the normalised rank axis at a few steps,
  for the report's "proposal over training" plot.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dkd.sampling.rank_stats import RankHistogram

PROPOSAL_SNAPSHOTS = 5
PROPOSAL_BINS = 100


class RunStats:
    def __init__(self, run_dir: Path, method: str, num_classes: int, total_steps: int,
                 phases: int, enabled: bool):
        self.run_dir, self.total, self.enabled = Path(run_dir), total_steps, enabled
        self.hist = RankHistogram(num_classes, phases, total_steps) \
            if enabled and method == "pdbs" else None
        every = max(1, total_steps // (PROPOSAL_SNAPSHOTS - 1))
        self.snap_steps = {min(i * every, total_steps - 1) for i in range(PROPOSAL_SNAPSHOTS)}

    def update(self, out: dict, step: int, proposal) -> None:
        if not self.enabled:
            return
        if self.hist is not None and "ranks" in out:
            self.hist.update(out["ranks"], step)
        if proposal is not None and step in self.snap_steps and getattr(proposal, "rank_based", False):
            self._snapshot(proposal, step)

    def _snapshot(self, proposal, step: int) -> None:
        C = PROPOSAL_BINS * 10
        probs = proposal.rank_probs(C).double().reshape(PROPOSAL_BINS, -1).sum(1)
        x = ((torch.arange(PROPOSAL_BINS) + 0.5) / PROPOSAL_BINS).tolist()
        line = {"step": step, "x": x, "rank_probs": (probs * PROPOSAL_BINS).tolist()}
        with open(self.run_dir / "proposal.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def finish(self) -> None:
        if self.hist is not None:
            self.hist.save(str(self.run_dir / "rank_stats.json"))
            self.hist.plot(str(self.run_dir / "rank_stats.png"))
