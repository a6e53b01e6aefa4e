"""Offline side of the recommender: load an event log, train the GRU or LSTM model, export it.

The modules split by concern: ``data`` (locating datasets, the MovieLens-100K loader),
``formats`` (other event-log formats and bad-row reports), ``sequences`` (per-user
ordering, the leave-one-out split, vocabularies, item features), ``model``, ``losses``,
``train``, ``evaluate``, ``onnx_export``, ``parity``, ``bundle``, ``report`` (metrics
history and PNG), ``quality`` (multi-seed measurement) and ``search`` (hyperparameter
search). Run ``python -m export --help`` for the command line.

This file imports nothing heavy, so ``import export`` works where torch is not
installed; only the modules that need torch import it.
"""
