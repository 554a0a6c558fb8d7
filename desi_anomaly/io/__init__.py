"""Reading and locating DESI spectroscopic files."""
