"""Student search by distillation-aware channel pruning (`dkd search`).

A teacher-sized network gets a scalar gate on every inner unit of its residual blocks
(`space.py`); it trains with the run's distillation loss while the gates take a proximal
step that pushes them to exactly zero in proportion to the FLOPs their channel costs
(`prox.py`, `flops.py`); when the open sub-network's FLOPs reach the target, the real
smaller network is built and written as a student spec (`searcher.py`, `space.py`).
"""
