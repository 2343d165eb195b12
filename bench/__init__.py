"""The sumstream benchmark: sumstream against the notebook design, side by side (``make bench``)."""
