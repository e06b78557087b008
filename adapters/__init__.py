"""Built-in format adapters, installed as the package ``ckptconv.adapters``.

One module per format; each depends on the core (``ckptconv``) only, never on
another adapter. Shared byte-level helpers live in ``_io.py``.
"""
