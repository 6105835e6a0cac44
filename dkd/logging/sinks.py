"""Metric sinks: JSONL always (rank 0), Weights & Biases optionally (offline by default).

Every sink has ``log(metrics, step)``, ``log_artifact(path, name, type)`` and ``finish()``.
``make_sinks`` builds the set for a run: on ranks other than 0 it returns a
:class:`NullSink`, so the training loop never checks the rank itself.

W&B never blocks or breaks training: offline unless a project is set *and* credentials
exist; if ``wandb.init`` fails, the sink warns and turns itself off (JSONL still has
everything). Offline runs land in ``<run_dir>/wandb/offline-run-*/`` and can be uploaded
later with ``wandb sync <run_dir>/wandb/offline-run-*``; :func:`read_wandb_offline`
reads them back without a network.
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import struct
import time
import zlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["NullSink", "JsonlSink", "WandbSink", "MultiSink", "WandbSettings", "make_sinks",
           "read_jsonl", "read_wandb_offline", "read_wandb_artifacts", "wandb_logged_in"]

log = logging.getLogger(__name__)
WANDB_MODES = ("offline", "online", "disabled")
WANDB_ID_FILE = "wandb-run-id"


# --------------------------------------------------------------------------- values

def _clean_value(key: str, value: Any) -> Any:
    """JSON-safe number (or str/list of numbers); NaN and +-inf become null."""
    if hasattr(value, "detach"):  # torch tensor: one element -> number, else a list
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar / array
        value = value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_clean_value(key, v) for v in value]
    raise TypeError(f"metric {key!r}: expected a number, str or list of numbers, "
                    f"got {type(value).__name__}")


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): _clean_value(str(k), v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- sinks

class NullSink:
    """Accepts everything, writes nothing (ranks other than 0, or logging off)."""

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, name: str, type: str = "trace") -> None:
        pass

    def finish(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


class JsonlSink(NullSink):
    """Appends one JSON object per ``log`` call to ``path``, flushed at once.

    A line is ``{"step": step, **metrics}``. Non-finite floats are written as ``null``
    (strict JSON); :func:`read_jsonl` turns them back into NaN.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = clean_metrics(metrics)
        if step is not None:
            row = {"step": int(step), **{k: v for k, v in row.items() if k != "step"}}
        self._f.write(json.dumps(row, allow_nan=False) + "\n")
        self._f.flush()  # why: a crashed or killed run keeps every line it logged

    def finish(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_jsonl(path: str | Path, nan: bool = True) -> list[dict[str, Any]]:
    """Rows of a JSONL metrics file; ``null`` values come back as NaN (``nan=False``: as
    None). A torn last line (a write cut by a kill) is left out; a bad line elsewhere is
    an error naming its line number."""
    path = Path(path)
    rows = []
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ln.strip()]
    for n, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1 and not line.endswith("}"):
                break    # torn by a kill mid-write: the step is redone on resume
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {row!r:.40}")
        rows.append({k: (math.nan if v is None and nan else v) for k, v in row.items()})
    return rows


class MultiSink(NullSink):
    """Fans every call out to each sink, in order."""

    def __init__(self, sinks: Iterable[NullSink]) -> None:
        self.sinks = list(sinks)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def log_artifact(self, path: str | Path, name: str, type: str = "trace") -> None:
        for s in self.sinks:
            s.log_artifact(path, name, type)

    def finish(self) -> None:
        for s in self.sinks:
            s.finish()


# --------------------------------------------------------------------------- W&B

def wandb_logged_in(base_url: str | None = None) -> bool:
    """True when wandb would find credentials: env var, wandb's netrc reader, or ~/.netrc.

    Only looks; never prompts and never touches the network.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = base_url or os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:  # wandb >= 0.2x: its own reader (honours NETRC and wandb's host rules)
        from wandb.sdk.lib.wbauth import read_netrc_auth
        return bool(read_netrc_auth(host=base_url))
    except ImportError:
        pass
    except Exception as e:  # malformed key etc.: treat as not logged in
        log.debug("wandb netrc check failed: %s", e)
        return False
    host = re.sub(r"^https?://", "", base_url).split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


@dataclass
class WandbSettings:
    """The W&B part of a run config (any object with these attributes works too)."""

    mode: str = "offline"
    """offline (default), online (needs `project` and a login), or disabled."""
    project: str | None = None
    """W&B project; required for online mode."""
    entity: str | None = None
    """W&B team or user; default: the login's default entity."""
    name: str | None = None
    """Display name; default: the run directory's name."""


def _settings_from(cfg: Any) -> WandbSettings:
    if cfg is None:
        return WandbSettings()
    if isinstance(cfg, WandbSettings):
        return cfg
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    s = WandbSettings(mode=get("mode", "offline") or "offline", project=get("project"),
                      entity=get("entity"), name=get("name"))
    if s.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode: expected one of {', '.join(WANDB_MODES)}, got {s.mode!r}")
    return s


def resolve_wandb_mode(mode: str, project: str | None) -> str:
    """online only with a project and credentials; otherwise offline (with a warning)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode: expected one of {', '.join(WANDB_MODES)}, got {mode!r}")
    if mode != "online":
        return mode
    if not project:
        warnings.warn("wandb.mode=online needs wandb.project; logging offline instead")
        return "offline"
    if not wandb_logged_in():
        warnings.warn("wandb.mode=online but no W&B credentials (WANDB_API_KEY or "
                      "`wandb login`); logging offline instead")
        return "offline"
    return mode


class WandbSink(NullSink):
    """Logs to a W&B run whose files live in ``<run_dir>/wandb/``.

    ``mode`` is resolved by :func:`resolve_wandb_mode`. Non-numeric values (``kind``)
    are dropped from W&B rows; JSONL keeps them. ``init_s`` is how long ``wandb.init``
    took. If wandb fails to start, the sink warns and becomes a no-op.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any],
                 project: str | None = None, mode: str = "offline", name: str | None = None,
                 entity: str | None = None, init_timeout_s: float = 20.0,
                 skip_until: int = -1) -> None:
        self.run_dir = Path(run_dir)
        self.skip_until = skip_until  # steps a killed segment already logged (resume)
        self.mode = resolve_wandb_mode(mode, project)
        self.run = None
        self.offline_dir: Path | None = None  # <run_dir>/wandb/offline-run-* when offline
        self.init_s = 0.0
        if self.mode == "disabled":
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        args = (dict(config), project, name or self.run_dir.name, entity, init_timeout_s)
        for self.mode in ["online", "offline"] if self.mode == "online" else [self.mode]:
            try:
                self.run = self._init(*args)
                break
            except Exception as e:  # why: W&B is optional; never take the training run down
                then = "trying offline" if self.mode == "online" else "W&B is off for this run"
                warnings.warn(f"{self.run_dir}: wandb.init ({self.mode}) failed ({e}); {then}")
        self.init_s = time.perf_counter() - t0
        if self.run is not None and self.mode == "offline":
            self.offline_dir = Path(self.run.dir).parent  # run.dir is offline-run-*/files

    def _init(self, config, project, name, entity, timeout):
        import wandb  # why here: a ~1 s import that disabled runs should not pay

        settings = wandb.Settings(
            console="off",                 # no stdout/stderr capture (slow, can hang)
            x_disable_stats=True,          # no system-metrics sampler process
            x_disable_meta=True,           # no host/git/GPU metadata probing
            x_disable_machine_info=True,
            x_save_requirements=False,     # no `pip freeze`-style scan
            disable_git=True, disable_code=True, save_code=False,
            disable_job_creation=True, silent=True,
            init_timeout=timeout,          # online: give up (-> offline) instead of hanging
        )
        return wandb.init(dir=str(self.run_dir), project=project or "dkd", entity=entity,
                          name=name, config=config, mode=self.mode, reinit="create_new",
                          id=self.run_id(), resume="allow", settings=settings)

    def run_id(self) -> str:
        """One W&B run per run directory: the id is kept in `<run_dir>/wandb-run-id` and
        reused by every resume, so `wandb sync` of all segments gives one run."""
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        import uuid

        from dkd.atomic import atomic_write_text
        run_id = uuid.uuid4().hex[:12]   # W&B ids: letters and digits
        atomic_write_text(path, run_id + "\n")
        return run_id

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is None or (step is not None and step <= self.skip_until):
            return    # a redone step: the killed segment's W&B file already has it
        row = {k: v for k, v in clean_metrics(metrics).items()
               if k != "step" and not isinstance(v, str)}
        row = {k: (math.nan if v is None else v) for k, v in row.items()}
        self.run.log(row, step=None if step is None else int(step))

    def log_artifact(self, path: str | Path, name: str, type: str = "trace") -> None:
        """Attach a file or directory (e.g. a Chrome trace) to the run as an artifact."""
        if self.run is None:
            return
        import wandb

        path = Path(path)
        try:
            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type)
            # why immutable: a trace is never rewritten, so wandb need not copy it
            add = art.add_dir if path.is_dir() else art.add_file
            add(str(path), policy="immutable")
            self.run.log_artifact(art)
        except Exception as e:  # why: a missing trace must not end the training run
            warnings.warn(f"W&B artifact {name!r} from {path} not logged: {e}")

    def finish(self, wait_s: float = 10.0) -> None:
        """Finish the W&B run; offline, also wait (<= ``wait_s``) until its file is closed.

        Why wait: ``run.finish()`` returns before wandb-core has flushed the offline
        file, and a report built right after training would read it half-written.
        """
        if self.run is None:
            return
        run, self.run = self.run, None
        files = sorted(self.offline_dir.glob("*.wandb")) if self.offline_dir else []
        wandb_file = files[-1] if files else None  # written (header only) at init
        try:
            run.finish()
        except Exception as e:
            warnings.warn(f"W&B finish failed for {self.run_dir}: {e}")
            return
        deadline = time.monotonic() + wait_s
        while wandb_file is not None and not _wandb_file_closed(wandb_file):
            if time.monotonic() > deadline:
                warnings.warn(f"{wandb_file}: not closed by wandb after {wait_s:g} s")
                break
            time.sleep(0.02)


def make_sinks(run_dir: str | Path, config_dict: Mapping[str, Any], wandb_cfg: Any = None,
               is_rank0: bool = True, skip_until: int = -1) -> NullSink:
    """Rank 0: JSONL (``<run_dir>/metrics.jsonl``) + W&B unless its mode is disabled.
    ``skip_until``: on resume, the last step already logged; W&B gets only later steps.

    ``wandb_cfg``: None (offline), a dict or any object with ``mode``/``project``/
    ``entity``/``name``. Other ranks get a :class:`NullSink`.
    """
    if not is_rank0:
        return NullSink()
    run_dir = Path(run_dir)
    wb = _settings_from(wandb_cfg)
    sinks: list[NullSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if wb.mode != "disabled":
        sinks.append(WandbSink(run_dir, config_dict, project=wb.project, mode=wb.mode,
                               name=wb.name, entity=wb.entity, skip_until=skip_until))
    return MultiSink(sinks)


# --------------------------------------------------------------------------- reading W&B back
# A `.wandb` file is a LevelDB-style log (what wandb's old Python `DataStore` read; in
# wandb >= 0.18 only the Go core reads it): a 7-byte header ":W&B", magic 0xBEE1,
# version 0; then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`,
# where type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4 reassembles a record split over blocks
# and the CRC is zlib's crc32 seeded with the type byte. A record is a protobuf
# `wandb.proto.wandb_internal_pb2.Record`; we parse it with wandb's own generated class.

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768


def _wandb_records(path: Path) -> Iterable[bytes]:
    data = path.read_bytes()
    ident, magic, version = _HEADER.unpack_from(data) if len(data) >= 7 else (b"", 0, -1)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, parts = _HEADER.size, []
    while pos + _CHUNK.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK.size:  # block tail too short for a chunk: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size: pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind == 0 and length == 0:
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            warnings.warn(f"{path}: truncated or corrupt record at byte {pos}; stopping there")
            return
        if kind == 1:  # FULL: a whole record
            yield chunk
        elif kind == 2:  # FIRST of a record split over blocks
            parts = [chunk]
        elif kind == 3:  # MIDDLE
            parts.append(chunk)
        elif kind == 4:  # LAST
            yield b"".join(parts + [chunk])
            parts = []


def _decode(raw: bytes):
    """(record type, record) of one raw record, parsed with wandb's own protobuf class."""
    from wandb.proto import wandb_internal_pb2 as pb

    rec = pb.Record()
    rec.ParseFromString(raw)
    return rec.WhichOneof("record_type"), rec


def _wandb_file_closed(path: Path) -> bool:
    """Whether the file ends with the run's exit record (cheap: parses the tail only)."""
    tail: list[bytes] = []
    try:
        for raw in _wandb_records(path):
            tail = (tail + [raw])[-4:]
    except (OSError, ValueError):
        return False
    for raw in reversed(tail):
        if _decode(raw)[0] == "exit":
            return True
    return False


def _json_value(text: str) -> Any:
    return json.loads(text) if text else None  # json accepts NaN/Infinity as W&B writes them


def _find_wandb_file(run_dir: Path) -> Path:
    files = sorted(run_dir.glob("wandb/offline-run-*/*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no W&B offline run (wandb/offline-run-*/*.wandb)")
    return files[-1]  # the latest: offline-run-<timestamp>-<id> sorts by time


def _parse_wandb_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """(config, history rows, whether the run's exit record is there)."""
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    finished = False
    for kind, rec in map(_decode, _wandb_records(path)):
        if kind == "run":
            config.update({i.key: _json_value(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: _json_value(i.value_json) for i in rec.config.update})
            for i in rec.config.remove:
                config.pop(i.key, None)
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): _json_value(i.value_json)
                   for i in rec.history.item}
            if "_step" in row:
                row["step"] = int(row["_step"])
            history.append(row)
        elif kind == "exit":
            finished = True
    config.pop("_wandb", None)  # wandb's internal bookkeeping, not the run's config
    return config, history, finished


def read_wandb_artifacts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Artifacts logged to the latest offline W&B run: [{name, type, files}, ...]."""
    return [{"name": rec.artifact.name, "type": rec.artifact.type,
             "files": [m.path for m in rec.artifact.manifest.contents]}
            for kind, rec in map(_decode, _wandb_records(_find_wandb_file(Path(run_dir))))
            if kind == "artifact"]


def read_wandb_offline(run_dir: str | Path, wait_s: float = 10.0
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, history rows) of the latest offline W&B run under ``<run_dir>/wandb/``.

    A history row is what one step's ``log`` calls produced, including W&B's own ``_step``,
    ``_runtime`` and ``_timestamp``; ``step`` is added as an int copy of ``_step``.

    ``run.finish()`` returns before wandb-core has flushed and closed the file (it closes
    the stream asynchronously), so a run finished moments ago can still read as empty.
    While the file has no exit record and was written in the last ``wait_s`` seconds we
    re-read it, up to ``wait_s``; after that we warn and return what is there (a run
    still going, or one that crashed).
    """
    path = _find_wandb_file(Path(run_dir))
    deadline = time.monotonic() + wait_s
    while True:
        config, history, finished = _parse_wandb_file(path)
        fresh = time.time() - path.stat().st_mtime < wait_s
        if finished or not fresh or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not finished:
        warnings.warn(f"{path}: no exit record (run still going, or it crashed); "
                      f"read {len(history)} history rows")
    return config, history
