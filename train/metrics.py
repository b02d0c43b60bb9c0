"""Training metrics: model FLOPs utilization, JSONL + TensorBoard writing, the progress display."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), by device_kind prefix.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device: jax.Device | None = None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override (TFLOP/s) if given, else the datasheet value
    for known accelerators, else None (CPUs: no MFU unless you state a peak)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None


def mfu(
    tokens_per_second: float, flops_per_token: float, peak_per_device: float | None, devices: int
) -> float | None:
    """Model FLOPs utilization, a fraction in [0, 1], or None without a known peak."""
    if not peak_per_device:
        return None
    return tokens_per_second * flops_per_token / (peak_per_device * devices)


class MetricsWriter:
    """Appends metrics as JSON lines (`metrics.jsonl`) and TensorBoard scalars; process 0 only."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._file = (out / "metrics.jsonl").open("a", encoding="utf-8") if enabled else None
        self._board: Any = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._board = SummaryWriter(str(out / "tensorboard"))

    def write(self, step: int, values: dict[str, float | None], prefix: str = "train") -> None:
        if not self.enabled or self._file is None:
            return
        record = {
            "step": step,
            "time": time.time(),
            **{f"{prefix}/{k}": v for k, v in values.items()},
        }
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._board is not None:
            for key, value in values.items():
                if value is not None:
                    self._board.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()


def progress_display(console: Console) -> Progress:
    """A rich progress bar with the last loss, tokens/s and MFU after the step count."""
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def status_line(loss: float, tokens_per_second: float | None, utilization: float | None) -> str:
    speed = f"{tokens_per_second:,.0f} tok/s" if tokens_per_second is not None else "- tok/s"
    mfu_text = f"{100 * utilization:.1f}%" if utilization is not None else "n/a"
    return f"loss {loss:.4f}  {speed}  MFU {mfu_text}"
