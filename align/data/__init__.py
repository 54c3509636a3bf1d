"""Preference data: the schema and loading, row checks, pairs, importers, video I/O, the latent cache."""
