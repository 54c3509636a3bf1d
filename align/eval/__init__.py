"""Win rates, plots, video grids and reports."""
