"""Studies: every method (LTE and the baselines) over sparsity targets on one task, and `lte run`.

    from lte.study import run_study, run_sweep
    summary = run_study("configs/study/sst2-minilm.yaml", "runs/study/sst2-minilm", jobs=8)

| module | what it owns |
|---|---|
| `config` | defaults, tiny budgets, the YAML config, methods and variants, knob values, `--set` |
| `tasks` | one task: data, evaluator, the shared dense model (`setup_task`, `prepare_dense`) |
| `runner` | build / train / evaluate each (method, target); `run_sweep`, `run_study`, `collect_study` |
| `cache` | finished points on disk and their fingerprints (resuming), the CSV/JSON tables |
| `report` | tolerances, LTE against the baselines, the Markdown report |
| `plots` | the study's PNG plots |
| `seeds` | studies over several seeds (mean / std) |
| `parallel` | the units of studies in worker processes |
| `pipeline` | `lte run`: dense -> stage 1 -> stage 2 -> evaluation -> report, resumable |
| `cli` | `lte baseline`, `lte sweep`, `lte study` |

LTE trains through `lte.training.train_stage` and every model is scored by `lte.evaluation`, the
same code a user calls. Names are imported on first use, so `import lte.study` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULTS": "lte.study.config",
    "TINY": "lte.study.config",
    "study_config": "lte.study.config",
    "TaskSetup": "lte.study.tasks",
    "setup_task": "lte.study.tasks",
    "prepare_dense": "lte.study.tasks",
    "run_method": "lte.study.runner",
    "run_sweep": "lte.study.runner",
    "run_study": "lte.study.runner",
    "collect_study": "lte.study.runner",
    "load_results": "lte.study.cache",
    "write_points": "lte.study.cache",
    "summarise": "lte.study.report",
    "study_markdown": "lte.study.report",
    "plot_all": "lte.study.plots",
    "plot_study": "lte.study.plots",
    "run_parallel": "lte.study.parallel",
    "run_pipeline": "lte.study.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lte.study' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
