"""desi-anomaly: find anomalous quasar spectra in DESI data releases."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("desi-anomaly")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
