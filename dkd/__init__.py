"""dkd: large-scale knowledge distillation with a class-sharded, importance-sampled head."""
__version__ = "0.1.0"
