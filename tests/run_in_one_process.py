"""Train several runs in one process (one DeepSpeed start-up): used by the e2e tests.

usage: python tests/run_in_one_process.py OUT_DIR RUN_SPEC_JSON
RUN_SPEC_JSON: a list of [name, [overrides...]]; prints one summary JSON per run.
"""
import json
import sys

from dkd.config import load_config
from dkd.engine.loop import train

out_dir, specs = sys.argv[1], json.loads(sys.argv[2])
for name, sets in specs:
    cfg = load_config(None, [f"out_dir={out_dir}", f"name={name}", "wandb.mode=disabled", *sets])
    train(cfg, overwrite=True)
