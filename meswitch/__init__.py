"""meswitch: serve many full-parameter fine-tuned experts of one base model as compressed deltas.

Data flows one way: checkpoints -> compression -> bundle -> runtime -> (router, server).
"""
__version__ = "0.1.0"


def __getattr__(name):  # `from meswitch import Switch` without importing torch for the CLI's --help
    if name == "Switch":
        from .runtime import Switch

        return Switch
    raise AttributeError(f"module 'meswitch' has no attribute {name!r}")
