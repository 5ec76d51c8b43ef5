"""regpipe inside other training frameworks: :mod:`regpipe.integrations.lightning` (PyTorch Lightning).

A layer of its own between the engine (whose algorithms and step loss it reuses) and the CLI. Each
framework's module imports that framework, so this package imports none of them.
"""
