"""Batch inference over a data set: ``visualglm batch`` on one machine or a Ray cluster, resumable.

* :mod:`visualglm.batch.inputs`: JSONL rows / a folder of images, checked before anything runs;
* :mod:`visualglm.batch.images`: images read and preprocessed in a background pool;
* :mod:`visualglm.batch.runner`: rows through a continuous-batching engine, one record per row;
* :mod:`visualglm.batch.output`: append-only JSONL (fsynced chunks) or shards renamed into place;
* :mod:`visualglm.batch.job`: the local job; :mod:`visualglm.batch.ray_job`: the same on Ray (extra ``ray``).
"""

from visualglm.batch.inputs import BatchRow, InputError
from visualglm.batch.job import JobSummary, ModelSpec, run_batch
from visualglm.batch.output import read_results
from visualglm.batch.ray_job import RayOptions, run_batch_on_ray
from visualglm.batch.runner import BatchRunner, BatchSettings

__all__ = ["BatchRow", "BatchRunner", "BatchSettings", "InputError", "JobSummary", "ModelSpec", "RayOptions",
           "read_results", "run_batch", "run_batch_on_ray"]
