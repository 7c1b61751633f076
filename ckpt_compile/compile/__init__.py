"""``torch.compile(backend="ckpt")`` and ``explain()``.

Owns the backend pipeline (``_backend``: tag, partition with ``ckpt_compile.passes``,
compile with inductor or run eagerly), its options (``_options``: one frozen dataclass,
validated at the boundary) and ``explain`` (``_explain``: compile with the backend, return
its report).

May import: the eager engine, ``ckpt_compile.passes`` and the diagnostics (the report the
``report`` option writes). Nothing imports this part but the package's lazy names, the
planner and the command line.
"""
