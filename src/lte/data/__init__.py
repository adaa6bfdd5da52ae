"""Data for lte: the offline embedded models and loaders for text, GLUE, instructions and eval sets.

Heavy imports (transformers) happen inside the functions that need them.
"""

from lte.data._common import DataError
from lte.data.collate import pad_collate
from lte.data.glue import GLUE_TASKS, GlueDataset, glue_task, load_glue
from lte.data.instructions import InstructionDataset, format_prompt, load_instructions
from lte.data.tasks import (
    PROMPT_TEMPLATES,
    MCExample,
    load_e2e,
    load_mcqa,
    load_mmlu,
    load_xsum,
    mmlu_subjects,
)
from lte.data.text import LMDataset, builtin_text, is_text_source, lm_dataset_from_text, load_text_lm
from lte.data.zoo import cache_dir, embedded_folder, embedded_names, load_embedded, resolve_model

__all__ = [
    "DataError",
    "GLUE_TASKS",
    "GlueDataset",
    "InstructionDataset",
    "LMDataset",
    "MCExample",
    "PROMPT_TEMPLATES",
    "builtin_text",
    "cache_dir",
    "embedded_folder",
    "embedded_names",
    "format_prompt",
    "is_text_source",
    "glue_task",
    "lm_dataset_from_text",
    "load_e2e",
    "load_embedded",
    "load_glue",
    "load_instructions",
    "load_mcqa",
    "load_mmlu",
    "load_text_lm",
    "load_xsum",
    "mmlu_subjects",
    "pad_collate",
    "resolve_model",
]
