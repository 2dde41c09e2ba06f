"""Native helpers compiled at install time (see ``llmlite.blas``)."""
