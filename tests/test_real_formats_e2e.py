"""`dkd train` end to end on small files in the real dataset formats (made here)."""
import pytest

from conftest import summary, train_run
from test_datasets import _write_cifar, _write_market

SMALL = ["train.steps=6", "train.log_every=1", "wandb.mode=disabled", "train.batch_size=16",
         "model.feature_dim=16"]


def _run(tmp, name, *sets, nproc=1):
    # The TINY synthetic defaults of conftest are overridden by the dataset keys below.
    return train_run(tmp, name, *SMALL, *sets, nproc=nproc)


def test_cifar100_teacher_then_distilled_student(tmp_path):
    _write_cifar(tmp_path / "data", n_train=96, n_test=32)
    data = ["data.kind=cifar100", f"data.root={tmp_path / 'data'}", "data.image_size=[16,16]"]
    _run(tmp_path, "teacher", *data, "model.arch=lenet", "method.name=hard")
    _run(tmp_path, "student", *data, "model.arch=lenet", "method.name=dis", "method.k=10",
         f"teacher.checkpoint={tmp_path / 'teacher'}", nproc=2)
    s = summary(tmp_path / "student")
    assert s["classes"] == 100 and 0 <= s["top1"] <= 100


def test_market1501_reports_map_and_rank1(tmp_path):
    _write_market(tmp_path / "market")
    _run(tmp_path, "reid", "data.kind=market1501", f"data.root={tmp_path / 'market'}",
         "data.image_size=[16,16]", "model.arch=lenet", "method.name=hard",
         "train.batch_size=4")
    s = summary(tmp_path / "reid")
    assert s["classes"] == 3 and 0 <= s["map"] <= 100 and 0 <= s["rank1"] <= 100


def test_text_next_word_with_perplexity(tmp_path):
    words = ("the cat sat on the mat and the dog sat on the log while the cat ran "
             "to the dog and the mat was red ").split() * 40
    (tmp_path / "corpus.txt").write_text(" ".join(words))
    data = ["data.kind=text", f"data.root={tmp_path / 'corpus.txt'}", "data.context=3",
            "data.vocab_size=12"]
    _run(tmp_path, "t", *data, "model.arch=ngram_mlp", "method.name=hard")
    _run(tmp_path, "s", *data, "model.arch=transformer", "model.embed_dim=16", "model.heads=2",
         "method.name=kd", f"teacher.checkpoint={tmp_path / 't'}")
    s = summary(tmp_path / "s")
    assert s["classes"] == 13 and s["perplexity"] >= 1.0 and 0 <= s["top1"] <= 100
