"""Figures about checkpointing, as data, tables and pictures.

Owns the report (``_report``: ``Report`` with ``to_dict``/``from_dict`` and a table),
graph and memory figures (``_graph_stats``: saved bytes of a partitioned graph, recomputed
nodes, eager ``saved_tensor_bytes`` and ``autograd_nodes``) and the picture of the cut
(``_picture``: ``write_picture``, pure SVG/HTML). ``explain()`` runs the backend, so it
lives in ``ckpt_compile.compile``; this part only reads graphs and reports.

May import: the eager engine (selective caches are counted in saved bytes) and
``ckpt_compile.passes`` (FLOP counts). Never the compile backend or the module wrappers.
"""
