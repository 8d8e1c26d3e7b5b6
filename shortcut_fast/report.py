"""Writing results: JSON (dataclasses, tensors, numpy), CSV, terminal tables, progress, figures."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, tensors, numpy values, paths; NaN/Inf -> None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(obj.tolist())
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: to_jsonable(v) for k, v in row.items()})
    return path


def format_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table (floats to 4 significant decimals)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line, sep] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body])


class Progress:
    """Progress of one loop: a tqdm bar on a terminal, else one log line when it ends (and at
    most one line every `every` seconds while it runs), nothing when not enabled.

    update(n) advances it, set_postfix(...) shows figures, close() ends it; calling it as
    tick(n) / tick(None) does the same (the form the experiment loops use).
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, *, every: float = 30.0):
        import sys
        import time

        self.total, self.desc, self.enabled, self.every = total, desc, enabled, every
        self.done, self.postfix, self._time = 0, {}, time.perf_counter
        self.start = self._last = self._time()
        self._bar = None
        if enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._time() - self._last >= self.every:
            self._line()

    def set_postfix(self, **figures) -> None:
        self.postfix.update(figures)
        if self._bar is not None:
            self._bar.set_postfix(**figures)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line()
        self.enabled = False

    def _line(self) -> None:
        self._last = self._time()
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.done}/{self.total} in {self._last - self.start:.1f} s{extra}", flush=True)

    def __call__(self, n: int | None) -> None:
        self.close() if n is None else self.update(n)


def progress_ticker(total: int, desc: str, enabled: bool = True) -> Progress:
    """The progress of one loop (see Progress); tick(n) advances it, tick(None) ends it."""
    return Progress(total, desc, enabled)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, *, tight: bool = False) -> Path:
    """Save `fig` as PNG (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_maps(maps, titles: Sequence[str], path: str | os.PathLike, *, suptitle: str = "", cmap: str = "viridis",
              symmetric: bool = False, colorbar_label: str = "") -> Path:
    """A row-wrapped grid of 2-D maps (e.g. fftshift-ed spectra) saved as PNG."""
    plt = pyplot()

    maps = [m.detach().cpu().numpy() if hasattr(m, "detach") else m for m in maps]
    n = len(maps)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.4), squeeze=False)
    vmax = max(float(abs(m).max()) for m in maps) if symmetric else None
    for ax, m, title in zip(axes.flat, maps, titles):
        im = ax.imshow(m, cmap=cmap, vmin=-vmax if symmetric else None, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=colorbar_label)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def plot_curves(curves: dict[str, Sequence[float]], path: str | os.PathLike, *, xlabel: str, ylabel: str,
                title: str = "", x: Sequence[float] | None = None) -> Path:
    """Line plot of named series (training curves and the like) saved as PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in curves.items():
        ax.plot(list(x) if x is not None else range(1, len(ys) + 1), list(ys), label=name, marker=".")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bars(groups: dict[str, Sequence[float]], labels: Sequence[str], path: str | os.PathLike, *,
              ylabel: str, title: str = "", ylim: tuple | None = None) -> Path:
    """Grouped bar chart: one bar per series (groups) at every label (e.g. TPR/FPR per class)."""
    plt = pyplot()

    n = len(groups)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(labels) + 2), 3.4))
    for i, (name, values) in enumerate(groups.items()):
        ax.bar([j + (i - (n - 1) / 2) * width for j in range(len(labels))], list(values), width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], path: str | os.PathLike, *,
                 title: str = "", cmap: str = "RdBu_r", fmt: str = "{:.1f}", colorbar_label: str = "") -> Path:
    """An annotated matrix (e.g. the band-stop Delta per class and band)."""
    plt = pyplot()
    import numpy as np

    data = np.asarray(values, dtype=float)
    vmax = float(np.nanmax(np.abs(data))) or 1.0
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 2, 0.45 * len(row_labels) + 1.4))
    im = ax.imshow(data, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)))
    ax.set_xticklabels(col_labels)
    ax.set_yticks(range(len(row_labels)))
    ax.set_yticklabels(row_labels)
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                color="white" if abs(v) > 0.6 * vmax else "black")  # readable on dark cells
    fig.colorbar(im, ax=ax, label=colorbar_label)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
