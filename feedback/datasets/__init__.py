"""Training sets exported from the feedback store (formats: docs/datasets.md)."""
from feedback.datasets.export import KINDS, ExportResult, export

__all__ = ["KINDS", "ExportResult", "export"]
