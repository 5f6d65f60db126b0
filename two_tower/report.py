"""The nightly report: DIR/report/index.html (static, opens from disk), its PNG plots and
DIR/report/days.json (the same numbers, for orchestrators), rebuilt from every finished day's
summary.json, so it is the same whatever crashed before it."""

from __future__ import annotations

import html
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from two_tower import atomic  # noqa: E402


def _save(fig, path: str) -> None:
  with atomic.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)


def _plot(path: str, title: str, dates: list[str], series: dict[str, list], ylabel: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 3.2))
  for name, values in series.items():
    points = [(d, v) for d, v in zip(dates, values) if v is not None]
    if points:
      ax.plot([d for d, _ in points], [v for _, v in points], marker="o", label=name)
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  ax.tick_params(axis="x", rotation=45)
  ax.legend(fontsize=8)
  _save(fig, path)


def write_report(root: str, summaries: list[dict], metric: str) -> str:
  """Writes the report of `summaries` (one per finished day, in date order) under root/report;
  returns the path of index.html."""
  out = os.path.join(root, "report")
  os.makedirs(out, exist_ok=True)
  atomic.write_json(os.path.join(out, "days.json"), summaries)
  dates = [s["date"] for s in summaries]
  pick = lambda key: [(s.get(key) or {}).get(metric) for s in summaries]  # noqa: E731
  _plot(os.path.join(out, "quality.png"), f"{metric} on each day's holdout", dates,
        {"new model": pick("metrics"), "live model": pick("live_metrics"),
         "planted oracle": pick("oracle_metrics")}, metric)
  _plot(os.path.join(out, "catalog.png"), "catalog and vocabularies", dates,
        {"items": [s["num_items"] for s in summaries], "users": [s["num_users"] for s in summaries],
         "item rows": [(s.get("registry") or {}).get("item_id", {}).get("rows") for s in summaries],
         "user rows": [(s.get("registry") or {}).get("user_id", {}).get("rows") for s in summaries]},
        "count")
  _plot(os.path.join(out, "changes.png"), "new, cold and evicted IDs per day", dates,
        {"new items": [s["new_items"] for s in summaries],
         "new users": [s["new_users"] for s in summaries],
         "cold items": [s.get("cold_items") for s in summaries],
         "evicted": [sum((s.get("evicted") or {}).values()) for s in summaries]}, "count")
  shares = [(s["candidates"]["counts"]["cold_item_rows"] / max(s["candidates"]["counts"]["rows"], 1))
            if s.get("candidates") else None for s in summaries]
  _plot(os.path.join(out, "cold_share.png"), "share of cold items among candidates", dates,
        {"cold item rows / rows": shares}, "share")
  stages = sorted({k for s in summaries for k in s["seconds"]})
  _plot(os.path.join(out, "seconds.png"), "seconds per stage", dates,
        {k: [s["seconds"].get(k) for s in summaries] for k in stages}, "seconds")
  rows = "".join(
      f"<tr><td>{html.escape(s['date'])}</td><td>{'yes' + (' (forced)' if s.get('forced') else '') if s['published'] else 'no'}</td>"
      f"<td>{s['model_step']}</td><td>{s['num_users']}</td><td>{s['num_items']}</td>"
      f"<td>{s['new_users']}</td><td>{s['new_items']}</td>"
      f"<td>{_fmt((s.get('metrics') or {}).get(metric))}</td>"
      f"<td>{_fmt((s.get('live_metrics') or {}).get(metric))}</td>"
      f"<td>{_fmt(((s.get('index') or {}).get('validation') or {}).get('recall@10'))}</td>"
      f"<td>{_fmt(((s.get('index') or {}).get('validation') or {}).get('queries_per_s@100'))}</td>"
      f"<td>{sum(s['seconds'].values()):.1f}</td></tr>" for s in summaries)
  images = "".join(f'<p><img src="{name}.png" alt="{name}"></p>'
                   for name in ("quality", "catalog", "changes", "cold_share", "seconds"))
  page = (f"<!doctype html><html><head><meta charset='utf-8'><title>nightly report</title>"
          "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}</style></head>"
          f"<body><h1>Nightly report: {html.escape(root)}</h1><table><tr><th>date</th>"
          f"<th>published</th><th>step</th><th>users</th><th>items</th><th>new users</th>"
          f"<th>new items</th><th>{metric} new</th><th>{metric} live</th><th>index recall@10</th>"
          f"<th>queries/s</th><th>seconds</th></tr>{rows}</table>{images}"
          "<p>The same numbers: <a href='days.json'>days.json</a></p></body></html>")
  path = os.path.join(out, "index.html")
  atomic.write_text(path, page)
  return path


def _fmt(value) -> str:
  return "" if value is None else f"{value:.4g}"
