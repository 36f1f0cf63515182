"""The instruments: how an export (or a merge) is held against the model that was trained."""
