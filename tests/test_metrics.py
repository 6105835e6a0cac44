import math

import pytest
import torch

from dkd.metrics import (average_precision, calibration_bins, expected_calibration_error,
                         next_word_metrics, perplexity, reid_retrieval, sharded_cross_entropy_sum,
                         sharded_softmax_rows, top1)


def test_top1_from_logits_and_predictions():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    y = torch.tensor([1, 0, 0, 0])
    assert top1(logits, y) == 75.0
    assert top1(torch.tensor([1, 1, 0, 1]), y) == 50.0


# Hand example, 1-d features, squared Euclidean distance.
#   gallery  g0     g1     g2     g3          g4     g5
#   id       1      2      1      0 (distr.)  1      -1 (junk)
#   cam      1      2      2      3           3      2
#   feature  0      1      2      3           4      1.5
# query A (id 1, cam 1, feature 0): g0 is same id + same cam -> removed; junk g5 removed.
#   ranked: g1 (miss), g2 (hit), g3 (miss), g4 (hit) -> AP = (1/2 + 2/4) / 2 = 0.5, rank-1 miss
#   trapezoid AP = 1/2 * [(0 + 1/2)/2 + (1/3 + 2/4)/2] = 1/3
# query B (id 2, cam 1, feature 1): distances g1 0, g5 .25 (junk), g0 1, g2 1, g3 4, g4 9
#   -> g1 first and the only match: AP = 1, rank-1 hit
# query C (id 3): no gallery match -> skipped
GALLERY = dict(feats=torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [1.5]]),
               ids=torch.tensor([1, 2, 1, 0, 1, -1]), cams=torch.tensor([1, 2, 2, 3, 3, 2]))
QUERY = dict(feats=torch.tensor([[0.0], [1.0], [5.0]]), ids=torch.tensor([1, 2, 3]),
             cams=torch.tensor([1, 1, 1]))


def _retrieve(**kw):
    return reid_retrieval(QUERY["feats"], GALLERY["feats"], QUERY["ids"], QUERY["cams"],
                          GALLERY["ids"], GALLERY["cams"], **kw)


def test_reid_map_and_rank1_match_hand_computation():
    out = _retrieve(max_rank=4)
    assert out["num_valid"] == 2
    assert out["map"] == pytest.approx(75.0)
    assert out["rank1"] == pytest.approx(50.0)
    assert out["cmc"].tolist() == pytest.approx([50.0, 100.0, 100.0, 100.0])
    assert out["ap"][:2].tolist() == pytest.approx([0.5, 1.0]) and math.isnan(out["ap"][2])
    trap = _retrieve(ap_mode="trapezoid")
    assert trap["map"] == pytest.approx(100.0 * (1 / 3 + 1) / 2)


def test_same_camera_exclusion_is_what_makes_query_a_miss():
    # with every gallery image on another camera, g0 (distance 0) becomes query A's rank-1 hit
    out = reid_retrieval(QUERY["feats"][:1], GALLERY["feats"], QUERY["ids"][:1],
                         torch.tensor([9]), GALLERY["ids"], GALLERY["cams"])
    assert out["rank1"] == 100.0
    # hits at positions 0, 2, 4 (g0, g2, g4; junk removed) -> AP = (1 + 2/3 + 3/5) / 3
    assert out["map"] == pytest.approx(100 * (1 + 2 / 3 + 3 / 5) / 3)


def test_average_precision_modes_and_no_match_error():
    assert average_precision(torch.tensor([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(torch.tensor([False, True]), "trapezoid") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no query has a valid match"):
        reid_retrieval(QUERY["feats"][2:], GALLERY["feats"], QUERY["ids"][2:],
                       QUERY["cams"][2:], GALLERY["ids"], GALLERY["cams"])


def test_cosine_metric_ranks_by_angle():
    g = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    out = reid_retrieval(torch.tensor([[1.0, 0.1]]), g, torch.tensor([5]), torch.tensor([1]),
                         torch.tensor([5, 6]), torch.tensor([2, 2]), metric="cosine")
    assert out["rank1"] == 0.0  # (10, 1) is at the same angle as (1, 0.1)
    assert out["map"] == pytest.approx(50.0)


def test_next_word_metrics_and_perplexity():
    v = 7
    uniform = torch.zeros(4, v)
    out = next_word_metrics(uniform, torch.tensor([0, 1, 2, 3]))
    assert out["ce"] == pytest.approx(math.log(v))
    assert out["perplexity"] == pytest.approx(v)
    assert perplexity(1e6) == float("inf")


def test_sharded_ce_single_process_matches_full():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=g)
    y = torch.tensor([0, 9, 3, 4, 5, 2])
    full = torch.nn.functional.cross_entropy(z.double(), y, reduction="sum")
    assert float(sharded_cross_entropy_sum(z, y, 0)) == pytest.approx(float(full))


def _ce_worker(rank, world, port, queue):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        z, y = torch.randn(6, 7, generator=g) * 3, torch.tensor([0, 6, 3, 4, 2, 2])
        start = [0, 4][rank]  # uneven shards: classes [0, 4) and [4, 7)
        local = z[:, start:start + [4, 3][rank]]
        ce, conf = sharded_softmax_rows(local, y, start, dist.group.WORLD)
        queue.put((rank, (float(ce.sum()), conf.tolist())))
    finally:
        dist.destroy_process_group()


def test_sharded_ce_two_ranks_matches_full():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ce_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 7, generator=g) * 3, torch.tensor([0, 6, 3, 4, 2, 2])
    full = float(torch.nn.functional.cross_entropy(z.double(), y, reduction="sum"))
    conf = torch.softmax(z.double(), 1).max(1).values.tolist()
    for rank in (0, 1):
        assert got[rank][0] == pytest.approx(full)
        assert got[rank][1] == pytest.approx(conf)


def test_expected_calibration_error_by_hand():
    # Bins of width 1/15: 0.95 and 0.99 share the last bin, 0.5 and 0.52 share bin 7.
    conf = torch.tensor([0.95, 0.99, 0.5, 0.52])
    correct = torch.tensor([True, True, False, True])
    bins = calibration_bins(conf, correct)
    assert bins[0].sum() == 4 and bins[0, 14] == 2 and bins[0, 7] == 2
    want = (2 * abs(1.0 - 0.97) + 2 * abs(0.5 - 0.51)) / 4 * 100
    assert expected_calibration_error(bins) == pytest.approx(want)
    # Bins of two halves add up to the bins of the whole.
    halves = calibration_bins(conf[:2], correct[:2]) + calibration_bins(conf[2:], correct[2:])
    assert torch.equal(halves, bins)
    assert math.isnan(expected_calibration_error(torch.zeros(3, 15)))


def test_softmax_rows_confidence_is_the_top_probability():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(5, 9, generator=g), torch.tensor([1, 2, 3, 4, 8])
    ce, conf = sharded_softmax_rows(z, y, 0)
    assert torch.allclose(conf, torch.softmax(z.double(), 1).max(1).values)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(z.double(), y, reduction="none"))
