"""Sampling: proposals over teacher ranks, the estimator's sampling step, rank statistics."""
from dkd.sampling.proposals import (LaplaceMixtureProposal, Proposal, TeacherProposal,
                                    UniformProposal, build_proposal, teacher_ranking)
from dkd.sampling.sampler import SampleSet, sample_classes

__all__ = ["LaplaceMixtureProposal", "Proposal", "TeacherProposal", "UniformProposal",
           "build_proposal", "teacher_ranking", "SampleSet", "sample_classes"]
