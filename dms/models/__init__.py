"""Model families with DMS attention. The modeling code lives here, inside the
installed package, so `from dms import ...` works from any directory; the
top-level `models/` folder of the repository holds the command-line entry
points (train, extract)."""
