"""Edit methods. Importing this package registers every editor in ``registry.EDITORS``."""

from models.editing import (  # noqa: F401  (registration)
    finetune,
    lora,
    random_mask,
    saliency,
    where2edit,
    where2edit_saliency,
)
from models.editing.registry import (
    EDITORS,
    EditConfig,
    EditOutcome,
    EditTask,
    get_editor,
    make_config,
    run_edit,
)

__all__ = [
    "EDITORS",
    "EditConfig",
    "EditOutcome",
    "EditTask",
    "get_editor",
    "make_config",
    "run_edit",
]
