"""Run logging: metrics to JSONL (and TensorBoard when installed), skipped samples to a list."""
from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to
    TensorBoard when ``tensorboard`` is importable and enabled. Only rank 0 logs."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.skipped_path = Path(run_dir) / "skipped.txt"
        self.skipped = 0
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard is an optional extra
                self._tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)

    def log_skipped(self, reasons: list[str]) -> None:
        if not reasons:
            return
        self.skipped += len(reasons)
        if self.enabled:
            with self.skipped_path.open("a") as fh:
                fh.writelines(r + "\n" for r in reasons)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
