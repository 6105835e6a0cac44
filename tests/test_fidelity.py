"""Fidelity report: record schema, sensible numbers, and its files."""
import json

import pytest
import torch

from dkd.fidelity import fidelity_markdown, run_fidelity, write_fidelity



KEYS = {"method", "mode", "correction", "classes", "k", "cosine_logits", "cosine_weight",
        "rel_err"}


@pytest.fixture(scope="module")
def records():
    # C = 1000, k = C/10: measured cosines 0.70-0.80 for DIS/FTIS (expected), 0.18-0.37
    # for the paper form, 0.995 for PDBS (B = 16, d = 32, seeds 0, 1)
    return run_fidelity(1000, 16, [10, 100], dim=32, seeds=2)


def _get(records, method, mode, correction, k):
    (rec,) = [r for r in records if (r["method"], r["mode"], r["correction"], r["k"])
              == (method, mode, correction, k)]
    return rec


def test_records_have_required_keys(records):
    # 3 sampled methods x 3 modes x 2 corrections + PDBS, for each of 2 values of k
    assert len(records) == 2 * (3 * 3 * 2 + 1)
    for r in records:
        assert KEYS <= set(r)
        assert -1.0 <= r["cosine_logits"] <= 1.0 and r["rel_err"] >= 0.0


@pytest.mark.parametrize("method", ["dis", "ftis"])
@pytest.mark.parametrize("mode", ["per_sample", "batch_shared", "hybrid"])
def test_importance_sampling_at_k_C_over_10(records, method, mode):
    ex = _get(records, method, mode, "expected", 100)
    paper = _get(records, method, mode, "paper", 100)
    assert ex["cosine_logits"] > 0.6 and ex["cosine_weight"] > 0.6
    assert paper["cosine_logits"] < 0.5 < ex["cosine_logits"]
    # more samples, better gradient
    assert ex["cosine_logits"] > _get(records, method, mode, "expected", 10)["cosine_logits"]


def test_pdbs_is_close_at_k_C_over_10(records):
    assert _get(records, "pdbs", "per_sample", "none", 100)["cosine_logits"] > 0.98


def test_write_fidelity_files(records, tmp_path):
    out = tmp_path / "fid.json"
    md = write_fidelity(records, str(out))
    assert json.loads(out.read_text()) == records
    text = open(md).read()
    assert md.endswith("fid.md") and text == fidelity_markdown(records)
    assert text.startswith("| C | k | method |") and text.count("\n") == len(records) + 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid.json", "fid.md"]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="method"):
        run_fidelity(100, 4, [10], methods=("softmax",), seeds=1)
    with pytest.raises(ValueError, match="k must"):
        run_fidelity(100, 4, [1], seeds=1)
    with pytest.raises(ValueError, match="proposal"):
        from dkd.sampling.proposals import build_proposal
        build_proposal("nope")


def test_fidelity_command_writes_json_and_markdown(tmp_path):
    from conftest import run_cli
    out = tmp_path / "fid.json"
    proc = run_cli(["fidelity", "--classes", "40", "--batch", "8", "--k", "5,40", "--dim", "8",
                    "--seeds", "1", "--methods", "dis,pdbs", "--out", str(out)])
    assert "skipping k = [40]" in proc.stderr
    recs = json.loads(out.read_text())
    assert recs and {r["k"] for r in recs} == {5}
    for r in recs:
        for key in ("method", "mode", "correction", "classes", "cosine_logits",
                    "cosine_weight", "rel_err"):
            assert key in r
        assert -1.0 <= r["cosine_logits"] <= 1.0
    assert out.with_suffix(".md").is_file()


def test_fidelity_of_a_trained_run_through_the_cli(tmp_path, teacher_dir):
    """`dkd fidelity --run DIR`: real batches of a distilled run (its student, its teacher);
    the error shares of every record add up to 1, and more draws get closer to full KD."""
    from conftest import run_cli, train_run

    train_run(tmp_path, "s", "method.name=kd", f"teacher.checkpoint={teacher_dir}",
              "train.ckpt_every=10")
    out = tmp_path / "fid.json"
    proc = run_cli(["fidelity", "--run", str(tmp_path / "s"), "--k", "4,16", "--batches", "2",
                    "--methods", "dis,uniform", "--out", str(out), "--at", "all"])
    assert "error in target" in proc.stdout and "**step 10**" in proc.stdout
    recs = json.loads(out.read_text())
    # step 10 from its checkpoint, step 20 from the exported model (the last checkpoint
    # is the same state and is not repeated); the same batches at both points.
    assert sorted({r["step"] for r in recs}) == [10, 20]
    at10 = [r for r in recs if r["step"] == 10]
    assert len(at10) == len(recs) // 2
    assert {r["cosine_logits"] for r in at10} != {r["cosine_logits"] for r in recs if r["step"] == 20}
    recs = [r for r in recs if r["step"] == 20]
    assert {r["method"] for r in recs} == {"dis", "uniform"} and recs[0]["classes"] == 20
    for r in recs:
        shares = [r[f"err_share_{g}"] for g in ("target", "teacher_top", "student_top", "tail")]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
        assert -1.0 <= r["cosine_weight"] <= 1.0
    for method in ("dis", "uniform"):
        by_k = {r["k"]: r["cosine_logits"] for r in recs
                if r["method"] == method and r["mode"] == "per_sample"}
        assert by_k[16] > by_k[4]


def test_a_checkpoint_gives_the_student_of_the_exported_model(tmp_path, teacher_dir):
    """The student read from the last checkpoint (DeepSpeed's model file, the head pieces
    of two ranks) is the exported model's: same head weight, same features; an unknown
    step is refused with the steps the run has."""
    import torch
    from conftest import train_run
    from dkd.config import ConfigError, load_config
    from dkd.data import build_data
    from dkd.engine.checkpoint import checkpoint_steps
    from dkd.fidelity_run import resolve_points, student_at

    train_run(tmp_path, "s", "method.name=kd", f"teacher.checkpoint={teacher_dir}",
              "train.ckpt_every=10", nproc=2)
    run = tmp_path / "s"
    cfg = load_config(run / "config.yaml")
    data = build_data(cfg.data)
    assert sorted(checkpoint_steps(run)) == [10, 20]
    dev = torch.device("cpu")
    b_ck, w_ck = student_at(run, cfg, data, dev, checkpoint_steps(run)[20])
    b_end, w_end = student_at(run, cfg, data, dev, None)
    x = data.train.get(torch.arange(8))[0]
    assert torch.equal(w_ck, w_end)
    torch.testing.assert_close(b_ck(x), b_end(x))
    with pytest.raises(ConfigError, match=r"--at: '7' is not .* \[10, 20\]"):
        resolve_points(run, "7", 20)
    assert [s for s, _ in resolve_points(run, "10,end", 20)] == [10, 20]


def test_fidelity_run_needs_a_finished_run(tmp_path):
    from conftest import run_cli

    (tmp_path / "x").mkdir()
    proc = run_cli(["fidelity", "--run", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "config.yaml not found" in (proc.stdout + proc.stderr)


def test_fidelity_of_a_run_sees_the_teacher_as_training_does(tmp_path, teacher_dir):
    """With C > method.sampling_topk the sampler gets the teacher's top-K; at the sampled
    columns the exact teacher logits (the default) or, with --completion, the even top-K
    completion, whose bias against the true teacher shows in the cosine."""
    from conftest import run_cli, train_run

    train_run(tmp_path, "s", "method.name=kd", f"teacher.checkpoint={teacher_dir}",
              "method.sampling_topk=3")
    cos = {}
    for flag in ([], ["--completion"]):
        out = tmp_path / f"fid{len(flag)}.json"
        run_cli(["fidelity", "--run", str(tmp_path / "s"), "--k", "16", "--batches", "2",
                 "--methods", "dis", "--out", str(out), *flag])
        cos[bool(flag)] = {r["mode"]: r["cosine_logits"] for r in json.loads(out.read_text())}
    for mode in ("per_sample", "batch_shared"):
        assert cos[False][mode] > cos[True][mode]
