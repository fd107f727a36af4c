class RouterError(ValueError):
    """A router that cannot be trained, loaded or used: the message says why and what to do."""
