"""Rank histograms, the Laplace-mixture fit, and their files."""
import json
import os

import pytest
import torch

from dkd.losses.pdbs import pdbs_select
from dkd.sampling.proposals import LaplaceMixtureProposal, laplace_mixture_bins
from dkd.sampling.rank_stats import RankHistogram, fit_laplace_mixture




def test_update_bins_ranks_by_phase():
    h = RankHistogram(num_classes=200, num_phases=4, total_steps=100, num_bins=10)
    h.update(torch.tensor([1, 20, 21, 200]), step=0)       # bins 0, 0, 1, 9
    h.update(torch.tensor([[100, 101]]), step=99)           # bins 4, 5 (last phase)
    h.update(torch.tensor([5]), step=500)                   # past the end: last phase
    assert h.counts[0].tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert h.counts[3].tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert h.counts[1].sum() == 0 and h.phase(25) == 1
    hist = h.histograms()
    torch.testing.assert_close(hist[[0, 3]].sum(1), torch.ones(2, dtype=hist.dtype))
    assert hist[1].sum() == 0
    with pytest.raises(ValueError, match="ranks"):
        h.update(torch.tensor([0]), step=0)
    with pytest.raises(ValueError, match="num_phases"):
        RankHistogram(10, 0, 10)


@pytest.mark.parametrize("w,b1,b2", [(0.55, 3.0, 5.0), (0.3, 1.5, 40.0), (0.8, 10.0, 200.0)])
def test_fit_recovers_mixture_parameters(w, b1, b2):
    fw, fb1, fb2 = fit_laplace_mixture(laplace_mixture_bins(w, b1, b2, 100))
    assert abs(fw - w) < 0.03
    assert abs(fb1 / b1 - 1) < 0.1 and abs(fb2 / b2 - 1) < 0.15


def test_fit_from_sampled_ranks_matches_dis_defaults():
    C = 5000
    p = LaplaceMixtureProposal()
    ranks = torch.multinomial(p.rank_probs(C).float(), 100_000, replacement=True,
                              generator=torch.Generator().manual_seed(0)) + 1
    h = RankHistogram(C, num_phases=1, total_steps=1)
    h.update(ranks, step=0)
    (w, b1, b2), = h.fits()
    assert abs(w - p.w) < 0.05 and abs(b1 / p.b1 - 1) < 0.15 and abs(b2 / p.b2() - 1) < 0.15


def test_save_is_atomic_json_and_round_trips(tmp_path):
    h = RankHistogram(300, num_phases=2, total_steps=10)
    g = torch.Generator().manual_seed(1)
    a, z = torch.randn(8, 300, generator=g) * 3, torch.randn(8, 300, generator=g) * 3
    _, ranks = pdbs_select(z, a, torch.randint(0, 300, (8,), generator=g), k=20, T=2.0)
    h.update(ranks, step=2)
    h.update(ranks, step=7)
    path = tmp_path / "ranks.json"
    h.save(str(path))
    assert os.listdir(tmp_path) == ["ranks.json"]
    d = json.loads(path.read_text())
    assert d["num_classes"] == 300 and len(d["fits"]) == 2
    assert set(d["fits"][0]) == {"w", "b1", "b2"}
    assert torch.equal(RankHistogram.from_dict(d).counts, h.counts)


def test_plot_writes_png(tmp_path):
    h = RankHistogram(1000, num_phases=3, total_steps=30)
    for step, b2 in ((0, 5.0), (15, 30.0)):
        probs = laplace_mixture_bins(0.55, 3.0, b2, 1000).float()
        h.update(torch.multinomial(probs, 5000, replacement=True) + 1, step)
    path = tmp_path / "ranks.png"
    h.plot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert os.listdir(tmp_path) == ["ranks.png"]
