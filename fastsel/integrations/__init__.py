"""Optional framework integrations, each importing its framework only when imported:
``fastsel.integrations.lightning`` (PyTorch Lightning) and ``fastsel.integrations.hf``
(the Hugging Face ``Trainer``)."""
