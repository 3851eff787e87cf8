"""Feeds members already receive (NCMEC, StopNCII, Tech Against Terrorism, python-threatexchange):
importing them into a collection as signed batches, and exporting a collection in their shapes."""
