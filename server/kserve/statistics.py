"""Triton's statistics extension on the KServe endpoint: ModelStatistics from the in-process counters.

What perf_analyzer reads, per loaded model version (server/metrics.py's VersionStats holds the numbers):
- success / fail: KServe requests (every ModelInfer, every request on a ModelStreamInfer stream) answered
  or refused, with their durations from arrival to answer. Native-protocol calls are not requests here
  (they have no per-request boundary for a stream of feeds); they do share the batcher, so they count in
  the execution, queue and compute figures below. `inference_count` = success (one inference a request:
  the batch dimension is 1). `last_inference` = the last request's time, ms since the epoch.
- execution_count and compute_infer: batched onnxruntime calls of the version (model.onnx steps,
  generate.onnx calls, sequence.onnx slices) and their time. The state gather and write-back run in the same
  iteration and are not timed apart: compute_input and compute_output take 0 ns over the same count
  (perf_analyzer refuses statistics whose three compute counts differ).
- queue: per execution, how long the oldest work it started waited in the batcher (0 for the direct path
  taken when nothing else is queued); count = execution_count.
- batch_stats: model.onnx step calls by their row count (how many sessions stepped together).
A version's numbers start at zero when it loads and go when it unloads.
"""
from __future__ import annotations

from typing import Any

from ..engine import Engine
from ..errors import InvalidArgument, shown
from ..metrics import VersionStats
from ..repository import ModelVersion
from .config import parse_version


class Statistics:
    """Records KServe requests into the versions' statistics and answers ModelStatistics."""

    def __init__(self, engine: Engine, metrics: Any) -> None:
        self.engine = engine
        self.metrics = metrics

    def record(self, name: str, version: str, ok: bool, ns: int) -> None:
        """One request on model `name` version `version` (the request's text, "" = the default) answered (ok)
        or refused after ns nanoseconds; nothing is recorded for a model or version not loaded."""
        repo = self.engine.repo
        if self.metrics is None or repo is None:
            return
        try:
            mv = repo.get(name, parse_version(version))
        except InvalidArgument:
            return
        st = self.metrics.version_stats.get(mv) if mv is not None else None
        if st is not None:
            st.request(ok, ns)

    def versions(self, name: str, version_text: str) -> list[ModelVersion]:
        """The versions a ModelStatistics request asks about: every loaded one ("" name), every loaded version
        of a model ("" version), or one; NOT_FOUND / INVALID_ARGUMENT as the other model RPCs answer."""
        version = parse_version(version_text)
        if not name:
            if version:
                raise InvalidArgument(f"model version {shown(version_text)} given without a model name")
            return [mv for mv, _ in self.engine.list_models()]
        if version:
            return [self.engine.model(name, version)]
        found = [mv for mv, _ in self.engine.list_models() if mv.name == name]
        return found or [self.engine.model(name)]  # none: NOT_FOUND naming what is loaded

    def fill(self, resp: Any, name: str, version_text: str) -> None:
        """Fill a ModelStatisticsResponse."""
        for mv in self.versions(name, version_text):
            st = (self.metrics.version_stats.get(mv) if self.metrics is not None else None) or VersionStats()
            s = resp.model_stats.add()
            s.name, s.version = mv.name, str(mv.version)
            s.last_inference, s.inference_count, s.execution_count = st.last_inference_ms, st.success, st.executions
            i = s.inference_stats
            i.success.count, i.success.ns = st.success, st.success_ns
            i.fail.count, i.fail.ns = st.fail, st.fail_ns
            i.queue.count, i.queue.ns = st.executions, st.queue_ns
            i.compute_infer.count, i.compute_infer.ns = st.executions, st.compute_ns
            i.compute_input.count = i.compute_output.count = st.executions
            for rows in sorted(st.batches):
                calls, ns = st.batches[rows]
                b = s.batch_stats.add()
                b.batch_size = rows
                b.compute_infer.count, b.compute_infer.ns = calls, ns
                b.compute_input.count = b.compute_output.count = calls
