"""aeserve: train autoencoders offline, serve them over HTTP."""
import pkgutil

# Run from the repository root, ./aeserve/ comes first on sys.path and would hide an installed aeserve's
# subpackages (models, training, service); every aeserve folder on the path joins the package instead.
__path__ = pkgutil.extend_path(__path__, __name__)
__version__ = "0.1.0"
