"""Bundled data (traces/, hwprofiles/ at the repository top) shipped inside the wheel."""
