"""Class-sharded student head: shard arithmetic, sampled-logit kernels, sparse row optimizer."""
from dkd.head.head import ShardedHead, init_rows
from dkd.head.kernels import (DEFAULT_BALANCE, PATHS, RowGrad, default_balance, full_logits,
                              path_costs, sampled_logits, unique_rows)
from dkd.head.shard import (owner_of, shard_bounds, shard_range, shard_sizes,
                            stratified_counts, stratified_log_correction, to_local)
from dkd.head.sparse_optim import KINDS, SparseRowOptimizer

__all__ = ["ShardedHead", "init_rows", "DEFAULT_BALANCE", "PATHS", "RowGrad",
           "default_balance", "full_logits", "path_costs", "sampled_logits", "unique_rows",
           "owner_of", "shard_bounds", "shard_range", "shard_sizes", "stratified_counts",
           "stratified_log_correction", "to_local", "KINDS", "SparseRowOptimizer"]
