"""lossd server: torch-exact loss evaluation over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lossd-server")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
