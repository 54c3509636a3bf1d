"""Pairwise human-preference annotation: a small local web app and what to do with its labels.

- :mod:`align.annotate.pairs` turns a preference dataset or a ``vidalign generate`` output
  directory into pairs of videos the browser can play (converting GIFs and decoded arrays once).
- :mod:`align.annotate.storage` keeps pairs and labels in SQLite (WAL, one transaction per label).
- :mod:`align.annotate.server` serves the page, a small JSON API and the videos (standard library only).
- :mod:`align.annotate.stats` computes agreement (Cohen's and Fleiss' kappa, tie rate).
- :mod:`align.annotate.export` writes the labels as a preference dataset in the project's schema.

Access control for a team (per-annotator invite tokens or a shared secret, checked on every
request) lives in :mod:`align.annotate.server`; blinded A/B studies of two models, built on this
app, in :mod:`align.eval.human`.

The command line is ``vidalign annotate serve | invite | stats | export``.
"""
