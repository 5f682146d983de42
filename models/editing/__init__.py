"""Edit methods. Importing this package registers every editor in ``registry.EDITORS``."""

from models.editing import finetune, lora, random_mask, where2edit  # noqa: F401  (registration)
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
