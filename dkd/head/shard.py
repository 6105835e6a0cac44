"""Class-shard arithmetic for the class-parallel head, and stratified per-shard sampling.

Rank s of P owns the contiguous global classes [start_s, end_s):

    num_local_s = C // P + (s < C % P)
    start_s     = (C // P) * s + min(s, C % P)

so the first C % P shards hold one class more than the rest (InsightFace Partial FC's
split). Every function here is pure: no process group is touched, so every rank computes
the same numbers from the same arguments without talking.

Stratified sampling: with proposal mass R_s on shard s (Σ_s R_s = 1), rank s draws n_s
classes from the proposal restricted to its shard, renormalised by R_s. A draw c on shard
s then has probability r̄(c) / R_s and expected count n_s · r̄(c) / R_s, whose log is its
correction (see DESIGN.md, "Sharded head").
"""
from __future__ import annotations

import torch


def _check_split(num_classes: int, world_size: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if world_size > num_classes:
        # A shard with no classes would make every per-shard kernel a special case.
        raise ValueError(
            f"world_size must be <= num_classes (every shard owns at least one class), "
            f"got world_size={world_size} > num_classes={num_classes}")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Global class range [start, end) owned by ``rank`` of ``world_size``."""
    _check_split(num_classes, world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Number of classes on each shard, rank order; sums to ``num_classes``."""
    _check_split(num_classes, world_size)
    base, extra = divmod(num_classes, world_size)
    return [base + (1 if s < extra else 0) for s in range(world_size)]


def shard_bounds(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of every shard, rank order."""
    return [shard_range(num_classes, world_size, s) for s in range(world_size)]


def owner_of(classes: torch.Tensor, num_classes: int, world_size: int) -> torch.Tensor:
    """Rank owning each global class id; same shape and device as ``classes``, long.

    Closed form, no search: the first ``extra`` shards have base+1 classes and cover
    [0, extra·(base+1)); past that point every shard has ``base`` classes.
    """
    _check_split(num_classes, world_size)
    if classes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"classes must be an integer tensor, got dtype {classes.dtype}")
    base, extra = divmod(num_classes, world_size)
    c = classes.long()
    # Range check on host tensors only: on an accelerator it would synchronise every step.
    if c.device.type == "cpu" and c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes}), got ids outside it")
    split = extra * (base + 1)
    big = torch.div(c, base + 1, rounding_mode="floor")
    small = extra + torch.div(c - split, base, rounding_mode="floor")
    return torch.where(c < split, big, small)


def to_local(classes: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map global class ids to row indices of the shard [start, end).

    Returns (local, mask), both shaped like ``classes``. ``mask`` marks the ids this shard
    owns. Ids outside the shard get local index 0 (a valid row, so a gather with ``local``
    never goes out of bounds); the caller discards them with ``mask``.
    """
    if not 0 <= start < end:
        raise ValueError(f"start, end must satisfy 0 <= start < end, got {start}, {end}")
    if classes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"classes must be an integer tensor, got dtype {classes.dtype}")
    c = classes.long()
    mask = (c >= start) & (c < end)
    local = torch.where(mask, c - start, torch.zeros_like(c))
    return local, mask


def stratified_counts(shard_mass: torch.Tensor, m: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Split ``m`` draws over the shards in proportion to their proposal mass.

    shard_mass: (P,) non-negative mass R_s of the proposal on each shard (normalised here).
    Returns (P,) long counts n_s with Σ n_s = m and E[n_s] = m · R_s exactly: each shard
    gets floor(m·R_s), and the remaining m − Σ floor(·) < P draws go to shards by a
    multinomial (with replacement) over the fractional parts. Since the fractional parts
    sum to that remainder, the expectation is exact.

    Identical on every rank given a bit-identical ``shard_mass`` (e.g. computed from the
    replicated proposal, or all-gathered) and the same ``generator`` state: the arithmetic
    runs in float64 on the generator's device, and the generator is advanced only when a
    remainder is drawn, i.e. the same way on every rank.
    """
    if shard_mass.dim() != 1 or shard_mass.numel() == 0:
        raise ValueError(f"shard_mass must have shape (P,), got {tuple(shard_mass.shape)}")
    if not isinstance(m, int) or m < 0:
        raise ValueError(f"m must be a non-negative int, got {m!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    mass = shard_mass.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(mass).all()) or bool((mass < 0).any()):
        raise ValueError("shard_mass must be finite and non-negative")
    total = mass.sum()
    if float(total) <= 0.0:
        raise ValueError("shard_mass must have a positive sum")
    expected = mass / total * m
    counts = expected.floor()
    rest = m - int(counts.sum())
    if rest > 0:
        frac = (expected - counts).clamp_min(0.0)
        if float(frac.sum()) <= 0.0:  # rounding put the whole remainder nowhere: use mass
            frac = mass
        extra = torch.multinomial(frac, rest, replacement=True, generator=generator)
        counts = counts + torch.bincount(extra, minlength=mass.numel()).to(counts.dtype)
    return counts.long().to(shard_mass.device)


def stratified_log_correction(n_s, r_bar_c: torch.Tensor, R_s) -> torch.Tensor:
    """Correction o = log(n_s · r̄(c) / R_s) for a class c drawn on shard s.

    n_s: draws on the shard (int or tensor broadcastable to ``r_bar_c``);
    r_bar_c: proposal probability of each drawn class (global normalisation);
    R_s: proposal mass of the shard (float or tensor). Summed in log space so tiny
    probabilities at C = 10^7 do not underflow.
    """
    r = torch.as_tensor(r_bar_c)
    n = torch.as_tensor(n_s, dtype=r.dtype, device=r.device)
    mass = torch.as_tensor(R_s, dtype=r.dtype, device=r.device)
    # Only drawn classes have a correction, so n_s, R_s > 0. Checked on host tensors only
    # (on an accelerator the check would synchronise every step).
    if r.device.type == "cpu" and (bool((n <= 0).any()) or bool((mass <= 0).any())):
        raise ValueError("n_s and R_s must be positive for a drawn class")
    return torch.log(n) + torch.log(r) - torch.log(mass)


__all__ = ["shard_range", "shard_sizes", "shard_bounds", "owner_of", "to_local",
           "stratified_counts", "stratified_log_correction"]
