"""Offline side of the recommender: load an event log, train the GRU model, export it.

The modules split by concern: ``data`` (loading and locating datasets), ``sequences``
(per-user ordering, the leave-one-out split, vocabularies), ``model``, ``train``,
``evaluate``, ``onnx_export``, ``parity`` and ``bundle``. Run ``python -m export --help``
for the command line.

This file imports nothing heavy, so ``import export`` works where torch is not
installed; only the modules that need torch import it.
"""
