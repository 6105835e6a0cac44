"""Losses: distributed softmax primitives, teacher targets, sampled KD, PDBS."""
from dkd.losses.softmax import full_kd_terms, mix, softmax_ce, softmax_probs, target_onehot

__all__ = ["full_kd_terms", "mix", "softmax_ce", "softmax_probs", "target_onehot"]
