"""bsdist: distributed long-tailed image classification with Balanced Softmax."""

from bsdist.errors import BsdistError

__version__ = "0.1.0"
__all__ = ["BsdistError", "__version__"]
