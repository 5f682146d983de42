"""The errors the ML core raises. Torch-free, so the API process can import and map them.

Every message says what went wrong *and* what to do about it.
"""


class VitEditError(Exception):
    """Base class of every error vitedit raises on purpose."""


class UnknownBackboneError(VitEditError):
    """The timm model name (or backbone manifest) does not name a model we can build."""


class WeightsMismatchError(VitEditError):
    """A weights file does not fit the model it is loaded into (missing, extra, mis-shaped keys)."""


class ManifestError(VitEditError):
    """A manifest is missing, malformed, or of an unsupported schema version."""


class IntegrityError(VitEditError):
    """A file's sha256 differs from the one its manifest records."""


class SiteError(VitEditError):
    """The requested editable sites do not exist in the model (no timm Mlp there)."""


class PatchError(VitEditError):
    """A patch does not fit the model or the sites it is applied to."""


class UnknownMethodError(VitEditError):
    """No editor is registered under that name."""


class EditConfigError(VitEditError):
    """An editor option is out of range or of the wrong type."""


class HypernetworkMismatchError(VitEditError):
    """A hypernetwork was trained for another backbone or another set of sites."""


class DataError(VitEditError):
    """An image or a dataset folder cannot be read, or a label is unknown."""


class EditCanceled(VitEditError):
    """The edit was canceled by its caller between two optimiser steps."""


class UnknownModelError(VitEditError):
    """No model of that name is registered in the store."""


class UnknownVersionError(VitEditError):
    """The model has no version (or alias) of that name."""


class StoreError(VitEditError):
    """The store refused an operation (an existing version, a reserved alias, a bad layout)."""
