"""`dkd relabel` then training from the store, against the live teacher."""
import pytest

from conftest import read_metrics, run_cli, train_run, TINY


def _losses(run):
    return [m["loss"] for m in read_metrics(run) if m["kind"] == "train"]


def test_relabel_then_train_matches_live_teacher(tmp_path, teacher_dir):
    store = tmp_path / "stores" / "full"
    run_cli(["relabel"], [*TINY, f"teacher.checkpoint={teacher_dir}", f"teacher.store={store}",
                          "teacher.store_dtype=float32"], nproc=2)
    assert (store / "manifest.json").is_file()
    train_run(tmp_path, "live", "method.name=kd", f"teacher.checkpoint={teacher_dir}")
    train_run(tmp_path, "store", "method.name=kd", f"teacher.store={store}")
    assert _losses(tmp_path / "store") == pytest.approx(_losses(tmp_path / "live"), rel=1e-5)


def test_topk_store_serves_sampled_methods_and_refuses_full_ones(tmp_path, teacher_dir):
    store = tmp_path / "stores" / "topk"
    run_cli(["relabel"], [*TINY, f"teacher.checkpoint={teacher_dir}", f"teacher.store={store}",
                          "teacher.store_topk=5", "teacher.store_full_threshold=0"])
    train_run(tmp_path, "dis", "method.name=dis", "method.k=5", f"teacher.store={store}")
    # the store's top-K goes to the sampler directly (no dense completion), on 2 ranks
    train_run(tmp_path, "dis_topk", "method.name=dis", "method.k=5", f"teacher.store={store}",
              "method.sampling_topk=4", nproc=2)
    for method in ("pdbs", "kd"):
        proc = train_run(tmp_path, method, f"method.name={method}", "method.k=5",
                         f"teacher.store={store}", check=False)
        assert proc.returncode != 0 and "teacher.allow_topk_completion" in proc.stderr
    train_run(tmp_path, "kd_ok", "method.name=kd", f"teacher.store={store}",
              "teacher.allow_topk_completion=true")
    other = tmp_path / "other"
    proc = train_run(other, "x", "method.name=dis", "method.k=5", f"teacher.store={store}",
                     "data.seed=5", check=False)
    assert proc.returncode != 0 and "dataset" in proc.stderr


def test_topk_store_with_features_gives_the_live_teachers_exact_columns(tmp_path, teacher_dir):
    """A top-K store holds the teacher's features and head (teacher.store_features, the
    default): a sampled run from it computes the exact teacher logit at every sampled
    column, as the live teacher does, so its losses equal the live run's; without
    features the store's columns outside the top-K take the even completion instead."""
    runs = {}
    for feats in ("true", "false"):
        store = tmp_path / "stores" / f"feats-{feats}"
        run_cli(["relabel"], [*TINY, f"teacher.checkpoint={teacher_dir}", f"teacher.store={store}",
                              "teacher.store_topk=5", "teacher.store_full_threshold=0",
                              "teacher.store_dtype=float32", f"teacher.store_features={feats}"])
        assert (store / "teacher_head.npy").is_file() == (feats == "true")
        runs[feats] = train_run(tmp_path, f"store-{feats}", "method.name=dis", "method.k=5",
                                f"teacher.store={store}", "method.sampling_topk=4")
    train_run(tmp_path, "live", "method.name=dis", "method.k=5", "method.sampling_topk=4",
              f"teacher.checkpoint={teacher_dir}")
    live = _losses(tmp_path / "live")
    assert _losses(tmp_path / "store-true") == pytest.approx(live, rel=1e-5)
    assert _losses(tmp_path / "store-false") != pytest.approx(live, rel=1e-3)
