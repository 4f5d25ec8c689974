"""Analysis: the criteria (systematic features from statistics) and the result documents."""

from outlier_hydra.analysis.criteria import FEATURE_FIELDS, SystematicOutlierAnalysis, criteria_text, meets
from outlier_hydra.analysis.documents import build_documents, collector_section

__all__ = [
    "FEATURE_FIELDS",
    "SystematicOutlierAnalysis",
    "build_documents",
    "collector_section",
    "criteria_text",
    "meets",
]
