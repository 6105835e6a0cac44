"""Input checks shared by the file datasets: layout errors that say what was expected, and the
class-count vs world-size check of the class-sharded head."""
from __future__ import annotations

from pathlib import Path


class DatasetError(ValueError):
    """A dataset on disk that cannot be used as given; the message says what was expected."""


def require_paths(root: Path, expected: list[str], what: str, hint: str = "") -> None:
    """Raise DatasetError naming every missing path of ``expected`` (relative to ``root``)."""
    missing = [name for name in expected if not (root / name).exists()]
    if missing:
        found = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else []
        raise DatasetError(
            f"{what}: {root} is not in the expected layout; missing "
            + ", ".join(str(root / m) for m in missing)
            + f" (expected {', '.join(str(root / e) for e in expected)}"
            + (f"; found {found}" if root.is_dir() else "; the directory does not exist")
            + ")" + (f". {hint}" if hint else ""))


def check_world(num_classes: int, world: int, what: str = "dataset") -> None:
    """The head is sharded by class over ``world`` ranks: every rank needs at least one class.

    A vocabulary (or class set) smaller than the world size raises DatasetError.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if num_classes < world:
        raise DatasetError(
            f"{what} has {num_classes} classes but the classifier head is sharded over "
            f"{world} ranks, and every rank needs at least one class; use at most "
            f"{num_classes} ranks or more classes (for text: a larger data.vocab_size or corpus)")
