"""Metric sinks (JSONL, Weights & Biases), reading W&B offline runs back, and progress."""
from dkd.logging.progress import LineProgress, NullProgress, RichProgress, make_progress
from dkd.logging.sinks import (JsonlSink, MultiSink, NullSink, WandbSettings, WandbSink,
                               make_sinks, read_jsonl, read_wandb_offline, wandb_logged_in)

__all__ = ["JsonlSink", "MultiSink", "NullSink", "WandbSettings", "WandbSink", "make_sinks",
           "read_jsonl", "read_wandb_offline", "wandb_logged_in",
           "LineProgress", "NullProgress", "RichProgress", "make_progress"]
