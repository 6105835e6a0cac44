"""One typed run configuration: defaults <- YAML file <- ``--set section.key=value``.

Every field documents its unit. Unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the dotted key and what was expected. The resolved config is dumped
into the run directory, so a run is reproducible from its own ``config.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError,
                      model_validator)


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)


class DataConfig(_Section):
    kind: Literal["synthetic", "cifar100", "market1501", "imagefolder", "text"] = "synthetic"
    """Dataset. `synthetic`: Tang et al. 2020, section 5.1, generated on the fly from `seed`.
    `cifar100`: torchvision's `cifar-100-python` pickles (fine labels). `market1501`: the
    Market-1501 re-ID layout (`bounding_box_train`, `bounding_box_test`, `query`).
    `imagefolder`: `<root>/<class>/*.jpg|png` (or `<root>/{train,test}/<class>/...`).
    `text`: word-level next-word prediction over plain-text files. All but `synthetic` read
    `root` and never download."""
    num_classes: int = Field(100, ge=2)
    """Number of classes C (>= 2) of the synthetic task. File datasets take C from the files
    (CIFAR-100: 100, Market-1501: training identities, ImageFolder: class folders, text:
    vocabulary size incl. `<unk>`)."""
    input_dim: int = Field(16, ge=2)
    """Input dimension of the synthetic samples."""
    num_super_classes: int = Field(10, ge=1)
    """Super-classes: orthonormal basis vectors the class vectors cluster around."""
    similarity: float = Field(0.5, ge=0.0, le=1.0)
    """Cosine similarity of each class vector to its super-class basis vector."""
    difficulty: int = Field(0, ge=0)
    """Number of sinusoidal terms added to the class scores (0 = linearly separable). Each
    term makes the score non-monotone in the projection; how much that changes the labels
    depends on the drawn frequencies (seed), so compare difficulties at a fixed seed."""
    train_size: int = Field(20000, ge=1)
    """Training samples (generated on the fly, no disk)."""
    test_size: int = Field(5000, ge=1)
    """Held-out samples for top-1."""
    seed: int = 0
    """Seed of the dataset (class vectors and samples); independent of the run seed. File
    datasets use it for the ImageFolder fraction split and for augmentation."""
    root: Optional[str] = None
    """Dataset location (file datasets only). cifar100: the directory holding
    `cifar-100-python/` (or that directory itself); market1501: the directory holding
    `bounding_box_train/`, `bounding_box_test/`, `query/`; imagefolder: the class tree;
    text: one `.txt` file or a directory whose `*.txt` files are read in name order."""
    image_size: Optional[tuple[PositiveInt, PositiveInt]] = None
    """Images are resized to (height, width) pixels. None: the dataset's usual size,
    32x32 for cifar100 and imagefolder, 128x64 for market1501."""
    augment: bool = False
    """Light augmentation of training images (random crop after 1/8-size zero padding and
    horizontal flip). Off by default: samples are then a pure function of their index."""
    train_fraction: float = Field(0.9, gt=0.0, lt=1.0)
    """Fraction going to the training split: per class for an imagefolder tree without
    `train/`+`test/` subfolders, and the leading fraction of the token stream for text."""
    vocab_size: int = Field(10000, ge=1)
    """Text: the V most frequent training words form the vocabulary; every other word maps
    to `<unk>`, so there are at most V + 1 classes."""
    context: int = Field(4, ge=1)
    """Text: number n of previous tokens a sample gives to predict the next token."""

    @model_validator(mode="after")
    def _check_root(self):
        if self.kind != "synthetic" and self.root is None:
            raise ValueError(f"data.root: dataset kind {self.kind!r} reads files; set data.root "
                             "to its directory")
        return self


class ModelConfig(_Section):
    arch: Literal["mlp", "resnet32", "lenet", "shallow_cnn", "resnet18", "resnet152",
                  "ngram_mlp", "transformer", "searched"] = "mlp"
    """Backbone architecture (registry name). Image backbones (resnet32, lenet, shallow_cnn,
    resnet18, resnet152) take (B, 3, H, W); text ones (ngram_mlp, transformer) take (B, n)
    token ids. Every backbone returns (B, feature_dim): one whose natural width differs
    (resnet32: 64, lenet: 84, shallow_cnn: 2048, resnet18: 512, resnet152: 2048,
    transformer: embed_dim) ends in a Linear-norm-ReLU projection to feature_dim; set
    feature_dim to the natural width for the unmodified architecture. `searched`: the
    student a `dkd search` exported, read from `model.spec`."""
    hidden: int = Field(128, ge=1)
    """Width of the residual MLP blocks."""
    depth: int = Field(2, ge=0)
    """Number of residual blocks (Linear-BN-ReLU-Linear-BN + skip)."""
    feature_dim: int = Field(64, ge=1)
    """Dimension d of the features fed to the classifier head."""
    norm: Literal["batch", "layer", "none"] = "batch"
    """Normalisation in the MLP. `layer` makes P data-parallel ranks match one process."""
    embed_dim: int = Field(64, ge=1)
    """Text models: width of the token embeddings (the transformer's model width)."""
    layers: int = Field(2, ge=1)
    """Transformer: number of encoder layers (feed-forward width 4 * embed_dim)."""
    heads: int = Field(4, ge=1)
    """Transformer: attention heads; must divide embed_dim."""
    causal: bool = True
    """Transformer: causal self-attention over the context (False: bidirectional)."""
    pooling: Literal["last", "mean"] = "last"
    """Transformer: the features are the last position's output, or the mean over positions."""
    vocab_size: int = Field(0, ge=0)
    """Text models: rows of the token embedding table. 0: taken from the dataset (the
    `vocab_size` passed to build_backbone, i.e. DataBundle.vocab_size)."""
    spec: Optional[str] = None
    """`arch: searched`: the student spec a `dkd search` wrote (`<search run>/student.yaml`):
    the searched architecture and its per-block widths (its other model keys replace these)."""
    spec_init: Literal["scratch", "searched"] = "scratch"
    """`arch: searched`: train from a fresh initialisation (seeded), or start from the
    weights the search exported (`student.pt` next to the spec)."""

    @model_validator(mode="after")
    def _check_spec(self):
        if (self.arch == "searched") != (self.spec is not None):
            raise ValueError("model.spec: set it (a student.yaml from dkd search) exactly when "
                             "model.arch = searched")
        return self

    @model_validator(mode="after")
    def _check_heads(self):
        if self.arch == "transformer" and self.embed_dim % self.heads:
            raise ValueError(f"model.heads = {self.heads} must divide model.embed_dim = "
                             f"{self.embed_dim}")
        return self


class TeacherConfig(_Section):
    checkpoint: Optional[str] = None
    """A teacher run directory (its exported model.pt is used) or a model.pt file: the
    live teacher. Every method except `hard` and `ls` needs it or `store`."""
    store: Optional[str] = None
    """Soft-label store directory: written by `dkd relabel`, read by training instead of
    running the teacher (then `checkpoint` is only needed by kd_sim, for the head weight)."""
    sharded: bool = False
    """Split the live teacher's head over ranks by the student's class ranges: each rank
    keeps and computes only its classes' teacher logits (top-K and log-sum-exp merged
    across ranks, the KD target from the blocks); the full C x d_t head is never resident.
    For kd and the sampled methods (uniform, ftis, dis) with `checkpoint`, not `store`."""
    allow_topk_completion: bool = False
    """Let full-softmax methods (kd, kd_pt, kd_topk, pdbs, ...) train from a top-K store,
    using the KD-topk completion (the remaining mass spread evenly) for the other classes."""
    store_topk: int = Field(100, ge=1)
    """`dkd relabel`: K, the teacher classes kept per sample in a top-K store (the draws per
    sample in a sampled store)."""
    store_kind: Literal["topk", "sampled"] = "topk"
    """`dkd relabel`: topk = the full logits or the top-K (by store_full_threshold); sampled
    = K draws per sample from softmax(a / store_temperature), kept as frequencies: an
    unbiased target in the same K slots (train at method.temperature = store_temperature)."""
    store_temperature: float = Field(1.0, gt=0)
    """`dkd relabel`, sampled store: the temperature the teacher is sampled at."""
    store_full_threshold: int = Field(10000, ge=0)
    """`dkd relabel`: store the full logits when C <= this, else the top-K layout."""
    store_dtype: Literal["float16", "float32"] = "float16"
    """`dkd relabel`: dtype of the stored logits."""
    store_features: bool = True
    """`dkd relabel`, top-K layout: also store each sample's teacher features (d_t values)
    and the teacher's head, so sampled methods get the exact teacher logit at every sampled
    column instead of the even completion (+2·d_t bytes a sample in float16)."""


METHODS = ("hard", "kd", "ls", "kd_pt", "kd_sim", "kd_pt_sim", "kd_topk",
           "pdbs", "uniform", "ftis", "dis")
SAMPLED_METHODS = ("uniform", "ftis", "dis")
TEACHER_FREE_METHODS = ("hard", "ls")


class MethodConfig(_Section):
    name: str = "kd"
    """One of: hard, kd, ls, kd_pt, kd_sim, kd_pt_sim, kd_topk, pdbs, uniform, ftis, dis."""
    temperature: float = Field(4.0, gt=0)
    """Softmax temperature T of the KD term (> 0)."""
    lam: float = Field(0.9, ge=0.0, le=1.0)
    """Weight of the KD term: loss = lam * T^2 * KD + (1 - lam) * CE(hard labels)."""
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    """Label-smoothing epsilon for method `ls`."""
    k: Optional[int] = Field(None, ge=1)
    """Classes per sample for pdbs / kd_topk, and sampled draws m for uniform/ftis/dis."""
    top_t: int = Field(0, ge=0)
    """Teacher top-t classes always included (deterministic set) by sampled methods."""
    mode: Literal["per_sample", "batch_shared", "hybrid"] = "batch_shared"
    """How a proposal is applied: the paper's per-sample ranks; one set for the batch (every
    target of the batch is a column); or hybrid: each row's own target (+ top-t) plus m
    draws shared by the batch (cheapest when the batch's targets cover much of C)."""
    stratified: bool = True
    """On P > 1 ranks, batch_shared: each rank draws its share of m from its own shard
    (counts agreed through the shared seed). False: one global set, masked per rank."""
    sampling_topk: int = Field(256, ge=1)
    """Sampled methods with C above this see the teacher as its top-K classes plus the
    KD-topk completion (the rest spread evenly): sampling costs O(B K), not a B x C sort.
    C <= this: the exact teacher ranking is used."""
    exact_teacher_columns: bool = True
    """Sampled methods with a live teacher and C > sampling_topk: the teacher logit of every
    sampled column is computed exactly from the teacher's features and head rows (False:
    classes outside the top-K take the even completion, as from a top-K store)."""
    full_every: int = Field(0, ge=0)
    """Sampled methods: every this many (micro-)steps take one full-softmax KD step over all
    C classes instead (0 = never): it re-anchors the rows the sampler rarely draws."""
    correction: Literal["expected", "paper"] = "expected"
    """Log correction of sampled classes: log(m r) (consistent) or Algorithm 1 as printed."""
    prior: Literal["none", "unigram", "log_uniform", "student"] = "none"
    """Sampled methods, batch_shared / hybrid: draw from (1 - prior_weight) * r_bar +
    prior_weight * pi, a class prior mixed into the teacher-rank proposal: unigram =
    (training-label count + 1)^prior_alpha, log_uniform = the Zipf law
    log((f + 2) / (f + 1)) over each class's frequency rank f (the samplers of sampled-softmax
    language models). It covers frequent classes that a batch's teacher ranks leave thin.
    student = where the student has recently put its mass (a running average of its batch
    softmax at the step's shared columns, with a uniform floor)."""
    prior_weight: float = Field(0.25, ge=0.0, lt=1.0)
    """Weight of the class prior in the proposal (with method.prior)."""
    prior_alpha: float = Field(0.75, gt=0)
    """Exponent of the unigram prior (1: the label frequencies; smaller: flatter)."""
    prior_decay: float = Field(0.9, ge=0.0, lt=1.0)
    """Student prior: weight of a class's previous value when a step observes it again."""
    sim_temperature: float = Field(0.1, gt=0)
    """KD-sim: temperature applied to the cosine similarities of teacher weight rows."""
    sim_power: float = Field(1.0, gt=0)
    """KD-sim: power applied to the resulting distribution before renormalising."""
    pt_sim_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """KD-pt+sim: weight of KD-pt in the convex combination with KD-sim."""
    rank_phases: int = Field(3, ge=1)
    """PDBS runs: training phases of the saved teacher-rank histograms (rank_stats.json)."""
    dis_weight: float = Field(0.55, gt=0.0, lt=1.0)
    """DIS: mixture weight of the left (rank 0) Laplace component."""
    dis_b1: float = Field(3.0, gt=0)
    """DIS: scale of the left Laplace, in percent of the rank axis (paper: 3)."""
    dis_b2_start: float = Field(5.0, gt=0)
    """DIS: scale of the right Laplace at step 0, percent of the rank axis (paper: 5)."""
    dis_b2_end: float = Field(100.0, gt=0)
    """DIS: scale of the right Laplace at the last step (grows linearly)."""
    dis_refit_every: int = Field(0, ge=0)
    """Adaptive DIS: every this many optimiser steps, refit (w, b1, b2) to the teacher ranks
    of a PDBS probe (the top-|p - q| classes of the batch's first rows); 0 = the schedule."""
    dis_refit_rows: int = Field(32, ge=1)
    """Adaptive DIS: rows of the batch a probe computes the full softmax for."""
    dis_refit_k: Optional[int] = Field(None, ge=1)
    """Adaptive DIS: classes per row a probe selects (default: method.k)."""
    dis_refit_decay: float = Field(0.5, ge=0.0, lt=1.0)
    """Adaptive DIS: weight of the previous probes' histogram at each refit (0: last only)."""

    @model_validator(mode="after")
    def _check(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; expected one of {', '.join(METHODS)}")
        if self.name in SAMPLED_METHODS + ("pdbs", "kd_topk") and self.k is None:
            raise ValueError(f"method {self.name!r} needs method.k (classes per sample, >= 1)")
        if self.prior != "none" and (self.name not in SAMPLED_METHODS
                                     or self.mode == "per_sample"):
            raise ValueError(f"method.prior={self.prior!r} mixes a class prior into the shared "
                             f"draws of a sampled method: it needs method.name in "
                             f"{', '.join(SAMPLED_METHODS)} and method.mode batch_shared or "
                             f"hybrid (got {self.name!r}, {self.mode!r})")
        if self.dis_refit_every and self.name != "dis":
            raise ValueError(f"method.dis_refit_every refits the DIS proposal: it needs "
                             f"method.name 'dis' (got {self.name!r})")
        return self


class OptimConfig(_Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    """Optimizer of the backbone and the head."""
    head_name: Optional[Literal["sgd", "adam", "adamw", "rmsprop"]] = None
    """Optimizer of the class-sharded head (row-sparse, lazy). Default: the same as `name`."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    head_lr: Optional[float] = Field(None, gt=0)
    """Peak learning rate of the head (same schedule). Default: `lr`."""
    head_catchup: int = Field(0, ge=0)
    """Adam/AdamW head, sampled methods: scale a row's step by the steps since it was last
    updated, capped at this (0 = off), so rarely drawn rows move as far per step as under
    dense Adam (measured on the README's real-text task: not what limits it there)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD / RMSProp momentum."""
    weight_decay: float = Field(0.0, ge=0.0)
    """L2 weight decay (decoupled for adamw)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up from 0 to `lr`, in optimizer steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """Decay after warm-up: constant, or cosine to 0 at `train.steps`."""

    @model_validator(mode="after")
    def _check(self):
        if self.head_catchup and (self.head_name or self.name) not in ("adam", "adamw"):
            raise ValueError("head_catchup applies to an adam / adamw head, not "
                             f"{self.head_name or self.name!r} (set optim.head_catchup=0)")
        return self


class TrainConfig(_Section):
    steps: int = Field(600, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(128, ge=1)
    """Global batch size (samples per step over all ranks)."""
    eval_batch_size: int = Field(1024, ge=1)
    """Batch size of the held-out evaluation."""
    log_every: int = Field(10, ge=1)
    """Steps between progress-bar updates (metrics are logged every step)."""
    eval_every: int = Field(0, ge=0)
    """Steps between held-out evaluations (0 = only at the end)."""
    ckpt_every: int = Field(0, ge=0)
    """Steps between checkpoints (0 = only at the end)."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss or gradient: `stop` ends the run (exit 3) naming the step and the
    quantity, keeps the last good checkpoint and exports nothing; `skip_step` drops that
    optimizer step (backbone and head) and goes on, and stops after 10 skipped steps in a
    row. `skip_step` needs dist.zero_stage 0 and fp32 (it drops the gradients before the
    engine's optimizer sees them)."""


class DistConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: `auto` = CUDA when available (NCCL), else CPU (gloo)."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage for the backbone: 0, 1 or 2 (3 is not supported: the head is
    sharded by class outside the engine)."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """Backbone precision; `auto` = bf16 where the device supports it, and TF32 matmuls on
    CUDA (the head's loss stays fp32)."""
    grad_clip: float = Field(0.0, ge=0.0)
    """Backbone gradient-norm clipping (0 = off). The head is not clipped."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step (train.batch_size is per micro-batch)."""
    timeout_s: float = Field(300.0, gt=0)
    """Collective timeout in seconds: if a rank dies, the others fail after this long."""
    check_proposal_sync: bool = False
    """Debug: all-reduce a fingerprint of the proposal state each step; fail on mismatch."""
    check_sample_sync: bool = False
    """Debug: all-reduce a hash of each step's sample set (classes and corrections); fail if
    ranks drew different sets (not for stratified batch_shared, whose sets are per rank)."""

    @model_validator(mode="after")
    def _check(self):
        if self.zero_stage == 3:
            raise ValueError("ZeRO stage 3 is not supported: the class-sharded head lives outside "
                             "the DeepSpeed engine; use zero_stage 0, 1 or 2")
        return self


class ProfilingConfig(_Section):
    enabled: bool = False
    """Capture torch.profiler traces (Chrome + TensorBoard) on the scheduled steps."""
    wait: int = Field(2, ge=0)
    """Profiler schedule: steps skipped before warm-up."""
    warmup: int = Field(2, ge=0)
    """Profiler schedule: warm-up steps (traced, discarded)."""
    active: int = Field(3, ge=1)
    """Profiler schedule: steps recorded into the trace."""
    sync: bool = False
    """Synchronise the device around timed regions (exact per-region GPU times, slower)."""


class WandbConfig(_Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode. `online` needs `project` and a login, else it falls back to offline."""
    project: Optional[str] = None
    """W&B project (online mode)."""


class SearchConfig(_Section):
    enabled: bool = False
    """Student search (`dkd search` sets it): gate the inner units of every residual block
    of `model` (mlp, ngram_mlp, resnet32; a transformer's feed-forward units), push gates to
    zero, export the open sub-network."""
    target_flops: float = Field(0.25, gt=0)
    """Stop when the open sub-network's backbone FLOPs per sample reach this: a fraction
    of the starting network's when <= 1, else absolute FLOPs."""
    penalty: float = Field(1e-3, ge=0)
    """lambda2: weight of sum_j alpha_j |g_j| (the gates' L1 penalty, applied as the
    proximal soft-threshold lambda2 * alpha_j * gate_lr)."""
    gate_lr: float = Field(0.01, gt=0)
    """eta: the gates' step size (the weights keep the run's optimizer)."""
    gate_optimizer: Literal["apg", "prox_sgd"] = "apg"
    """apg: accelerated proximal gradient in the modified (Sutskever) form, mu_k =
    (k - 2) / (k + 1); prox_sgd: plain proximal gradient."""
    loss: Literal["kd", "ce"] = "kd"
    """kd: the run's distillation method (distillation-aware search); ce: hard labels only
    (plain network pruning), the paper's "KD vs NP" ablation."""
    flops_weighting: bool = True
    """alpha_j = F_j / max_k F_k (F_j: FLOPs saved when gate j closes, measured); False:
    alpha_j = 1."""
    kl_target: Optional[float] = Field(None, ge=0)
    """kl_0 variant: minimise |loss - kl_0| instead of the loss (None: off)."""
    check_every: int = Field(10, ge=1)
    """Steps between FLOP counts of the open sub-network (and refreshes of alpha)."""


class RunConfig(_Section):
    name: Optional[str] = None
    """Run name; the run directory is `<out_dir>/<name>`. Default: a timestamp."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of initialisation and data order."""
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teacher: TeacherConfig = TeacherConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    dist: DistConfig = DistConfig()
    profiling: ProfilingConfig = ProfilingConfig()
    wandb: WandbConfig = WandbConfig()
    search: SearchConfig = SearchConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.search.enabled and self.dist.zero_stage > 0:
            raise ValueError("search.enabled: needs dist.zero_stage = 0 (the gates are backbone "
                             "parameters outside the engine's optimizer)")
        if self.search.enabled and self.search.loss == "kd" and self.method.name in ("hard", "ls"):
            raise ValueError(f"search.loss = kd distils: set method.name to a distillation "
                             f"method (kd, dis, ...) and a teacher, not {self.method.name!r}; "
                             "or search.loss = ce for plain pruning")
        if self.search.enabled and self.model.arch == "searched":
            raise ValueError("search.enabled: search starts from a teacher-sized model.arch "
                             "(mlp, ngram_mlp, resnet32, transformer), not from a searched "
                             "student")
        if self.train.on_nonfinite == "skip_step" and (self.dist.zero_stage > 0
                                                       or self.dist.precision != "fp32"):
            raise ValueError("train.on_nonfinite = skip_step needs dist.zero_stage = 0 and "
                             "dist.precision = fp32 (ZeRO and bf16 keep the gradients in "
                             "their own buffers); use stop")
        k = self.method.k
        if k is not None and self.data.kind == "synthetic" and k >= self.data.num_classes:
            raise ValueError(f"method.k = {k} must be < data.num_classes = {self.data.num_classes}")
        return self


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<config>"
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] != "value_error" and "input" in e else ""
        lines.append(f"{key}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                          f"({_yaml_problem(err)})") from None
    return key.strip().split("."), value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML parser error: what went wrong, at line L, column C (1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{what}{where}"


def read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a syntax error is a ConfigError with line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(err)}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def validate(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file (if given) <- overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return validate(apply_overrides(raw, list(overrides)))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """The config reference table of the README, generated from the field docstrings."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{field.default!r}` | {desc} |")

    walk(RunConfig, "")
    return "\n".join(rows) + "\n"


def update_readme(path: str = "README.md") -> None:
    """Replace the README's config table (between its markers) with the current one."""
    text = Path(path).read_text()
    head, rest = text.split("<!-- config-reference:start (make docs) -->\n", 1)
    _, tail = rest.split("<!-- config-reference:end -->", 1)
    Path(path).write_text(f"{head}<!-- config-reference:start (make docs) -->\n"
                          f"{reference_markdown()}<!-- config-reference:end -->{tail}")


if __name__ == "__main__":
    update_readme()
