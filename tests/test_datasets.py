"""File datasets in their real on-disk formats, generated here (no download)."""
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dkd.config import ConfigError, DataConfig, load_config
from dkd.data import DatasetError, build_data, check_world
from dkd.data.images import CIFAR100_MEAN, CIFAR100_STD
from dkd.data.text import tokenize
from dkd.metrics import reid_retrieval


def _cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


# ----------------------------------------------------------------------------- CIFAR-100
class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as in the real (Python 2) CIFAR pickles: they
    load as bytes with encoding='bytes' and as str with encoding='latin1' (torchvision)."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path):
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _write_cifar(root, n_train=12, n_test=6):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        blob = {b"filenames": [f"img{i}.png".encode() for i in range(n)],
                b"batch_label": f"{name} batch".encode(),
                b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist(), b"data": data}
        _dump_py2(blob, d / name)
    _dump_py2({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
               b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, d / "meta")
    with open(d / "train", "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar100_pickles_load_like_torchvision(tmp_path, monkeypatch):
    raw = _write_cifar(tmp_path)
    data = build_data(_cfg(kind="cifar100", root=str(tmp_path)))
    assert (len(data.train), len(data.test), data.num_classes) == (12, 6, 100)
    assert data.task == "classification" and data.input_shape == (3, 32, 32)
    assert data.input_dim == 3072 and data.class_names[3] == "class3"
    x, y = data.train.get(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert y.tolist() == [raw[b"fine_labels"][2], raw[b"fine_labels"][0]]
    # channel planes: R = bytes 0..1023, G = 1024..2047; normalised by the CIFAR-100 stats
    img = torch.from_numpy(raw[b"data"][2].astype(np.float32)).view(3, 32, 32) / 255
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    assert torch.allclose(x[0], (img - mean) / std, atol=1e-5)
    assert torch.equal(data.train.get(torch.tensor([2, 0]))[0], x)  # deterministic
    # torchvision reads the same files to the same pixels (its md5 check is for the real files)
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR100(str(tmp_path), train=True, download=False)
    assert np.array_equal(tv.data[2], data.train.images[2].permute(1, 2, 0).numpy())
    assert tv.targets == data.train.labels.tolist()
    # root may also be the cifar-100-python directory; resizing and augmentation are options
    small = build_data(_cfg(kind="cifar100", root=str(tmp_path / "cifar-100-python"),
                            image_size=(16, 16), augment=True))
    xs, _ = small.train.get(torch.arange(4))
    assert xs.shape == (4, 3, 16, 16) and small.input_shape == (3, 16, 16)


def test_cifar100_wrong_layout_names_expected_files(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"x")
    with pytest.raises(DatasetError) as err:
        build_data(_cfg(kind="cifar100", root=str(tmp_path)))
    msg = str(err.value)
    assert "cifar-100-python/train" in msg and "cifar-100-python/meta" in msg
    assert "extract" in msg


# ----------------------------------------------------------------------------- Market-1501
def _jpeg(path, seed, size=(16, 8)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG")


TRAIN = ["0002_c1s1_000451_03", "0002_c2s1_000551_01", "0007_c1s2_000101_01",
         "0005_c3s1_000001_01", "0005_c3s1_000002_01", "-1_c1s1_000001_01", "0000_c2s1_000001_01"]
QUERY = ["0002_c1s1_000801_01", "0005_c3s1_000901_01", "0009_c2s1_000101_01"]
GALLERY = ["0002_c1s1_001001_01", "0002_c2s1_001002_01", "0005_c1s1_001003_01",
           "0000_c4s1_001004_01", "-1_c1s1_001005_01", "0009_c5s1_001006_01"]


def _write_market(root):
    for sub, names in (("bounding_box_train", TRAIN), ("query", QUERY),
                       ("bounding_box_test", GALLERY)):
        (root / sub).mkdir(parents=True)
        for i, name in enumerate(names):
            _jpeg(root / sub / f"{name}.jpg", hash((sub, i)) & 0xFFFF)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")
    # a truncated JPEG: the header parses, the decode fails
    good = (root / "query" / f"{QUERY[0]}.jpg").read_bytes()
    (root / "bounding_box_test" / "0009_c6s1_001007_01.jpg").write_bytes(good[:120])


def test_market1501_protocol_splits_relabel_and_retrieval(tmp_path):
    _write_market(tmp_path / "Market-1501-v15.09.15")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_data(_cfg(kind="market1501", root=str(tmp_path), image_size=(16, 8)))
    assert any("skipped 1 of 6 images" in str(w.message) for w in caught)
    assert data.task == "reid" and data.test is None and data.input_shape == (3, 16, 8)
    # train: junk (-1) and distractors (0000) dropped; identities 2, 5, 7 -> 0, 1, 2
    assert len(data.train) == 5 and data.num_classes == 3
    assert data.train.ids.tolist() == [2, 2, 5, 5, 7]
    assert data.train.labels.tolist() == [0, 0, 1, 1, 2]
    assert data.train.cams.tolist() == [1, 2, 3, 3, 1]
    # query / gallery keep (identity, camera); gallery keeps 0000, drops -1 and the bad file
    assert data.query.ids.tolist() == [2, 5, 9] and data.query.cams.tolist() == [1, 3, 2]
    assert data.gallery.ids.tolist() == [0, 2, 2, 5, 9]  # file-name order
    assert data.gallery.cams.tolist() == [4, 1, 2, 1, 5]
    x, y = data.query.get(torch.arange(3))
    assert x.shape == (3, 3, 16, 8) and y.tolist() == [2, 5, 9]
    # features: query 2 sits nearest its same-camera twin (excluded), then the distractor,
    # then its other-camera match -> AP 1/2; queries 5 and 9 find their match first.
    gf = torch.tensor([[1.0], [0.0], [3.0], [10.0], [20.0]])
    qf = torch.tensor([[0.0], [10.0], [20.0]])
    out = reid_retrieval(qf, gf, data.query.ids, data.query.cams, data.gallery.ids,
                         data.gallery.cams)
    assert out["map"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert out["rank1"] == pytest.approx(100 * 2 / 3)


def test_market1501_wrong_layout_names_expected_dirs(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    with pytest.raises(DatasetError) as err:
        build_data(_cfg(kind="market1501", root=str(tmp_path)))
    msg = str(err.value)
    assert "bounding_box_test" in msg and "query" in msg


# ----------------------------------------------------------------------------- ImageFolder
def test_imagefolder_fraction_split_and_bad_images(tmp_path):
    for c, name in enumerate(["cat", "dog", "eel"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            _jpeg(tmp_path / name / f"{i}.jpg", 10 * c + i, size=(12, 10))
    (tmp_path / "eel" / "5.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning, match="skipped 1 of"):
        data = build_data(_cfg(kind="imagefolder", root=str(tmp_path), train_fraction=0.6,
                               image_size=(8, 8)))
    assert data.class_names == ["cat", "dog", "eel"] and data.num_classes == 3
    # per class: round(0.6 * 5) = 3 train, 2 test (the eel garbage file counted, then dropped)
    assert torch.bincount(data.train.labels).tolist() in ([3, 3, 3], [3, 3, 4])
    assert len(data.test) + len(data.train) == 15
    assert data.train.get(torch.arange(2))[0].shape == (2, 3, 8, 8)
    with pytest.warns(UserWarning, match="skipped 1 of"):
        again = build_data(_cfg(kind="imagefolder", root=str(tmp_path), train_fraction=0.6,
                                image_size=(8, 8)))
    assert again.train.paths == data.train.paths  # seeded split


def test_imagefolder_train_test_subfolders_and_errors(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _jpeg(tmp_path / split / c / f"{i}.png", i)
    data = build_data(_cfg(kind="imagefolder", root=str(tmp_path)))
    assert (len(data.train), len(data.test), data.input_shape) == (6, 2, (3, 32, 32))
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "0.jpg").write_bytes(b"nope")
    (tmp_path / "bad" / "y").mkdir()
    (tmp_path / "bad" / "y" / "0.jpg").write_bytes(b"nope")
    (tmp_path / "bad" / "y" / "1.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the .* images could be decoded"):
        build_data(_cfg(kind="imagefolder", root=str(tmp_path / "bad")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(DatasetError, match=r"<root>/<class>"):
        build_data(_cfg(kind="imagefolder", root=str(tmp_path / "flat")))


# ----------------------------------------------------------------------------- text
def test_text_vocab_samples_and_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("The cat sat on the mat. The dog sat\non the log!")
    data = build_data(_cfg(kind="text", root=str(f), vocab_size=3, context=2,
                           train_fraction=0.75))
    # 12 words, first 9 train: the x3, sat x2, then cat/dog/mat/on x1 (ties alphabetical)
    assert data.class_names == ["<unk>", "the", "sat", "cat"]
    assert data.num_classes == data.vocab_size == 4 and data.task == "text"
    assert data.input_shape == (2,) and data.input_dim == 2
    assert (len(data.train), len(data.test)) == (7, 1)
    x, y = data.train.get(torch.tensor([0, 3]))
    # sample 0: (the, cat) -> sat; sample 3: (on, the) -> mat = <unk>
    assert x.tolist() == [[1.0, 3.0], [0.0, 1.0]] and y.tolist() == [2, 0]
    x, y = data.test.get(torch.tensor([0]))  # test words: on the log
    assert x.tolist() == [[0.0, 1.0]] and y.tolist() == [0]
    assert tokenize("Don't STOP_now, 42x!") == ["don", "t", "stop", "now", "42x"]


def test_text_directory_empty_file_and_world_check(tmp_path):
    (tmp_path / "b.txt").write_text("one two three four five six seven eight nine ten")
    (tmp_path / "a.txt").write_text("zero")
    data = build_data(_cfg(kind="text", root=str(tmp_path), context=1, train_fraction=0.5))
    assert data.extra["corpus"].encode("zero one")[0] == data.class_names.index("zero")
    assert len(data.train) + len(data.test) == 11 - 2  # 'a.txt' first, then 'b.txt'
    check_world(data.num_classes, 4)
    with pytest.raises(DatasetError, match="7 classes but .* sharded over 8 ranks"):
        check_world(7, 8)
    (tmp_path / "c.txt").write_text("  ... !!\n")
    with pytest.raises(DatasetError, match=r"c\.txt is empty"):
        build_data(_cfg(kind="text", root=str(tmp_path)))
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no \\*.txt files"):
        build_data(_cfg(kind="text", root=str(tmp_path / "none")))


def test_file_dataset_needs_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.kind=market1501"])
