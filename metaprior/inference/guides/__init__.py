"""Guides: plate-aware task-local guides (IAF, Normal), and more from later modules."""

from metaprior.inference.guides.task_local import LocalSite, TaskIAFGuide, TaskNormalGuide

__all__ = ["LocalSite", "TaskIAFGuide", "TaskNormalGuide"]
