"""meswitch: serve many full-parameter fine-tuned experts of one base model as compressed deltas.

Data flows one way: checkpoints -> compression -> bundle -> (runtime -> server, later).
"""
__version__ = "0.1.0"
