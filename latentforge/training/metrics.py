"""What a training run reports as it goes: metrics.jsonl (appended record by record, cut back on resume), the
progress bar and the loss plot."""

from __future__ import annotations

import contextlib
import json
import os
import time

from latentforge import files


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended and flushed as it goes. A run resumed at step s
    first drops the records of steps after s (they are trained again); a new run starts the file."""

    def __init__(self, path: str, start_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if rec.get("step", 0) <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        files.write_text(path, "".join(kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def save_loss_plot(metrics_path: str, png_path: str, key: str = "loss") -> None:
    from latentforge.plot import line_plot

    recs = [r for r in read_metrics(metrics_path) if key in r]
    if len(recs) < 2:
        return
    series = {key: ([r["step"] for r in recs], [r[key] for r in recs])}
    line_plot(
        series, png_path, title=f"training {key}", xlabel="step", ylabel=key, logy=True, size=(900, 560)
    )
