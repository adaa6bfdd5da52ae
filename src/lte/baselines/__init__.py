"""Baselines the LTE paper compares against, on the same models, data and measures.

    from lte.baselines import apply_baseline
    model = apply_baseline(hf_model, "teal", target_sparsity=0.5, calib_data=batches)
    model(**batch); print(model.lte_stats())

Methods: teal, cats, moefication (MLP router), moefication-oracle, sketch (experts picked from 4-bit
copies of the FFN's own weights; ours), sketch-ft, dejavu, dejavu-ft, random-topk.
Sweeps and studies over these methods and LTE: `lte.study` (`run_sweep`, `run_study`).
"""

from .methods import METHODS, apply_baseline, as_batches, canonical_method, set_sparsity
from .model import BaselineModel

__all__ = ["METHODS", "BaselineModel", "apply_baseline", "as_batches", "canonical_method", "set_sparsity"]
