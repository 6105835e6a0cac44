"""Sampling: proposals over teacher ranks, the one draw of the softmax layer, rank stats.

Pipeline order: ``teacher_batch`` (the teacher type) -> ``laws`` (proposal laws as
tensors) -> ``rng`` (counter-based uniforms) -> ``lookup`` (teacher logits and r̄ at the
columns) -> ``draw`` (the modes, one entry point) -> ``sample_set`` (what it returns).
"""
from dkd.sampling.draw import draw_sample_set
from dkd.sampling.proposals import (LaplaceMixtureProposal, Proposal, TeacherProposal,
                                    UniformProposal, build_proposal, teacher_ranking)
from dkd.sampling.rng import draw_key
from dkd.sampling.sample_set import SampleSet
from dkd.sampling.teacher_batch import TopKTeacher

__all__ = ["LaplaceMixtureProposal", "Proposal", "TeacherProposal", "UniformProposal",
           "build_proposal", "teacher_ranking", "SampleSet", "draw_sample_set", "draw_key",
           "TopKTeacher"]
