"""Offline sampling (``artrt sample``): prompt files, tasks and batches, the resumable output
directory, and the job that runs them locally or on a Ray actor pool."""

from .job import run_sample
from .tasks import SampleConfig, SampleOptions

__all__ = ["SampleConfig", "SampleOptions", "run_sample"]
