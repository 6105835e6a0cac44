"""Every registered backbone builds from config (no download) and maps a tiny input to
(B, model.feature_dim) features."""
import pytest
import torch

from dkd.config import ConfigError, ModelConfig, load_config
from dkd.data import DataBundle
from dkd.models import _REGISTRY, NATURAL_WIDTH, build_backbone

IMAGE = ["resnet32", "lenet", "shallow_cnn", "resnet18"]
TEXT = ["ngram_mlp", "transformer"]


def test_registry_covers_the_config_literal():
    # `searched` is built from its spec by dkd.search.space (any gateable family)
    assert set(_REGISTRY) == set(NATURAL_WIDTH) == set(
        ModelConfig.model_fields["arch"].annotation.__args__) - {"searched"}


@pytest.mark.parametrize("arch", IMAGE)
@pytest.mark.parametrize("natural", [True, False])
def test_image_backbones(arch, natural):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, feature_dim=16)
    if natural:
        cfg = ModelConfig(arch=arch, feature_dim=NATURAL_WIDTH[arch](cfg))
    model = build_backbone(cfg, 3 * 32 * 32, (3, 32, 32))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, cfg.feature_dim) and model.feature_dim == cfg.feature_dim
    assert isinstance(model.proj, torch.nn.Identity) == natural
    # adaptive pooling: a non-square, Market-style input works too (and a flat input)
    assert model(torch.randn(2, 3, 32, 16)).shape == (2, cfg.feature_dim)
    assert model(torch.randn(2, 3 * 32 * 32)).shape == (2, cfg.feature_dim)


def test_natural_widths_and_sizes():
    assert sum(p.numel() for p in build_backbone(ModelConfig(arch="resnet32"), 3072).parameters()) \
        == 464154 - 650  # the classic 0.46 M ResNet-32, minus its 64x10 (+10) CIFAR-10 head
    shallow = build_backbone(ModelConfig(arch="shallow_cnn", feature_dim=2048), 3072).body
    assert shallow.bottleneck.in_features == 32 * 8 * 8 and shallow.bottleneck.out_features == 1200


def test_resnet152_builds_without_download_and_runs_once():
    model = build_backbone(ModelConfig(arch="resnet152", feature_dim=2048), 3072, (3, 32, 32))
    assert model.body.fc.__class__ is torch.nn.Identity
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


@pytest.mark.parametrize("arch", TEXT)
def test_text_backbones(arch):
    torch.manual_seed(0)
    data = DataBundle(None, None, 50, 5, "text", (5,), vocab_size=50)
    cfg = ModelConfig(arch=arch, embed_dim=16, heads=2, hidden=32, feature_dim=24)
    model = build_backbone(cfg, data.input_dim, **data.backbone_kwargs())
    ids = torch.randint(0, 50, (3, 5))
    out = model(ids.float())  # the loop casts inputs to float: ids are rounded back
    assert out.shape == (3, 24) and torch.allclose(out, model(ids))
    with pytest.raises(IndexError):
        model(torch.full((3, 5), 50.0))  # beyond the vocabulary: an error, not a clamp


def test_causal_transformer_ignores_nothing_before_the_last_token():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="transformer", embed_dim=16, heads=2, feature_dim=16, layers=1)
    model = build_backbone(cfg, 4, vocab_size=10).eval()
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[5, 2, 3, 4]])
    assert not torch.allclose(model(a), model(b))  # last-token pooling sees the whole context
    mean = build_backbone(cfg.model_copy(update={"pooling": "mean", "causal": False}), 4,
                          vocab_size=10)
    assert mean(a).shape == (1, 16)


def test_build_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_backbone(ModelConfig(arch="ngram_mlp"), 4)
    # a non-square input_dim alone (a Market teacher reloaded) still builds the network;
    # only a flat input then needs the shape
    lenet = build_backbone(ModelConfig(arch="lenet"), 3 * 32 * 16)
    assert lenet(torch.randn(2, 3, 32, 16)).shape == (2, 64)
    with pytest.raises(ValueError, match="input_shape"):
        lenet(torch.randn(2, 3 * 32 * 16))
    with pytest.raises(ConfigError, match="model.heads = 3 must divide"):
        load_config(None, ["model.arch=transformer", "model.heads=3"])
    assert build_backbone(ModelConfig(arch="ngram_mlp", vocab_size=9), 3)(
        torch.zeros(2, 3)).shape == (2, 64)


def test_mlp_unchanged():
    model = build_backbone(ModelConfig(), 16)
    assert model(torch.randn(4, 16)).shape == (4, 64)
