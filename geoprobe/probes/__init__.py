"""The four geometry probes, each a pure function returning a frozen record of :mod:`geoprobe.profile`.

* :mod:`.frequency` — power law of the token frequency distribution (``fit_power_law``);
* :mod:`.norms` — input-embedding norm against token frequency (``norm_frequency``);
* :mod:`.hyperbolicity` — Gromov δ-hyperbolicity and its matched nulls (``delta``, ``matched_null_delta``);
* :mod:`.intrinsic_dim` — TwoNN and GRIDE intrinsic dimension (``intrinsic_dimension``,
  ``intrinsic_dimension_layers``);
* :mod:`.duplicates` — the one duplicate rule (``deduplicate``, ``duplicate_keys``).

The fast paths behind them live in :mod:`geoprobe.backends`.
"""
