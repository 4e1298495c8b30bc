"""The main job (``make demo``): fibers of the two toy classifiers on the embedded world, as an HTML report."""
from __future__ import annotations

import html
import time
from pathlib import Path

import pandas as pd
import torch

from .. import toy
from ..models import load_extractor, load_prior
from ..plots import save_png
from ..sampling import sample_fiber
from ..seeds import DEMO_SEED_BASE

DEMO_EXTRACTORS = ["toy/shape-resnet@logits", "toy/color-vit@logits"]


def grid_image(rows: list[torch.Tensor], pad: int = 2, scale: int = 3) -> torch.Tensor:
    """Stack rows of images (each ``[k,3,H,W]``) into one ``[3,H',W']`` grid image (white padding)."""
    k = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    out = torch.ones(3, len(rows) * (h + pad) + pad, k * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[:, y:y + h, x:x + w] = img
    if scale > 1:
        out = torch.nn.functional.interpolate(out[None], scale_factor=scale, mode="nearest")[0]
    return out


def run_demo(out: str | Path = "out/demo", n: int = 6, references: int = 4, steps: int | None = None,
             seed: int = 0, progress: bool = True) -> Path:
    """Sample fibers of ``toy/shape-resnet`` and ``toy/color-vit`` for a few references; write a report.

    Writes ``index.html`` (a gallery per reference and extractor: the reference, then its
    samples with their feature distance and the oracle's verdict), the PNGs,
    ``samples.parquet`` (one row per sample) and ``gallery.png`` (the whole thing in one picture).
    Returns the path of ``index.html``.
    """
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prior = load_prior("toy/prior-fm")
    oracle = toy.load_oracle()
    refs, factors = toy.references(references, seed=DEMO_SEED_BASE + seed)
    ref_ids = [f"ref{i}" for i in range(references)]
    frames, sections, grid_rows = [], [], []
    for spec in DEMO_EXTRACTORS:
        ext = load_extractor(spec)
        res = sample_fiber(prior, ext, refs, n=n, preset="toy", steps=steps, seed=seed, progress=progress,
                           reference_ids=ref_ids)
        df = res.to_frame()
        judged = oracle.predict(res.images).add_prefix("oracle_")
        df = pd.concat([df, judged], axis=1)
        tag = spec.split("/")[1].split("@")[0]
        blocks = []
        for i, rid in enumerate(ref_ids):
            ref_png = f"img/{tag}_{rid}_ref.png"
            save_png(refs[i], out / ref_png)
            cells = [f'<figure class="ref"><img src="{html.escape(ref_png)}"><figcaption>reference<br>'
                     f'{html.escape(toy.caption(factors.iloc[[i]])[0])}</figcaption></figure>']
            sub = df[df.reference == i].sort_values("feature_distance")
            for _, row in sub.iterrows():
                k = int(row["sample"])
                png = f"img/{tag}_{rid}_{k:02d}.png"
                save_png(res.images[i * n + k], out / png)
                verdict = f"{row.oracle_color} {row.oracle_shape}" if row.oracle_valid else "not a clean shape"
                cells.append(f'<figure><img src="{html.escape(png)}"><figcaption>d={row.feature_distance:.3f}'
                             f'<br>{html.escape(verdict)}</figcaption></figure>')
            blocks.append(f"<h3>{html.escape(rid)}</h3><div class='row'>{''.join(cells)}</div>")
            grid_rows.append(torch.cat([refs[i:i + 1], res.fiber(i)]))
        df["image"] = [f"img/{tag}_{ref_ids[r]}_{s:02d}.png" for r, s in zip(df.reference, df["sample"])]
        frames.append(df)
        summary = (f"feature match (cos &ge; 0.95): {(df.cosine >= 0.95).mean():.2f}, "
                   f"valid: {df.oracle_valid.mean():.2f}, "
                   f"{res.config['seconds_per_sample']:.2f} s/sample")
        sections.append(f"<h2>{html.escape(spec)}</h2><p>{summary}</p>{''.join(blocks)}")
    table = pd.concat(frames, ignore_index=True)
    tmp = out / "samples.parquet.tmp"
    table.to_parquet(tmp)
    tmp.replace(out / "samples.parquet")
    save_png(grid_image(grid_rows), out / "gallery.png", scale=1)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fiberbench demo</title>
<style>body{{font-family:sans-serif;margin:2em}} .row{{display:flex;flex-wrap:wrap;gap:6px}}
figure{{margin:0;text-align:center;font-size:11px;width:136px}} figure img{{width:128px;image-rendering:pixelated}}
figure.ref img{{outline:3px solid #c33}}</style></head><body>
<h1>fiberbench demo: what the toy classifiers are blind to</h1>
<p>Each row: a reference (red frame), then images the extractor cannot tell apart from it
(samples of its fiber, drawn with NDTM on <code>toy/prior-fm</code>, preset <code>toy</code>), sorted by
feature distance d. The shape classifier keeps the shape and lets colour, background and mirroring vary;
the colour classifier keeps the colour and lets the shape vary.</p>
{''.join(sections)}
<p>{len(table)} samples in {time.time() - t0:.0f} s. Table: <code>samples.parquet</code>.</p></body></html>"""
    (out / "index.html").write_text(page)
    return out / "index.html"
