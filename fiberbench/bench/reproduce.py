"""``fiberbench reproduce``: the fiber paper's evaluation tables for any extractors, prior and references.

For each extractor, ``draws`` independent sets of fibers (run seeds ``seed, seed+1, …``) of the same references
are drawn with the chosen preset, and the prior's own samples beside them (``method=unguided``, the floor of
feature match). Written to ``out/`` as ``fiber_table.csv`` / ``.md`` / ``.tex`` (one row per extractor and
method) in the paper's layout:

- Table 5: ``fiber_sq_l2`` (the squared L2 norm summed over feature dimensions) ± its std across draws, and the
  nearest-neighbour baseline ``nearest_neighbour_fiber_sq_l2`` (the closest real bank image to each reference in
  the extractor's own feature space, the reference itself excluded);
- Table 7 and colorMNIST: ``fiber_l2``, ``fiber_l1``, ``fiber_ce`` (logits: against the reference's argmax),
  ``fiber_ce_soft`` (against its softmax, the paper's evaluation code), ``fiber_rms``, ``fiber_cos``;
- Table 2: ``fd_<space>`` / ``kid_<space>`` of each draw's samples against the bank in a stated feature space
  (``oracle``, ``clip``, ``inception``), beside ``real_fd_<space>`` (bank images at the same n: the small-n
  floor of FD) and ``nearest_neighbour_fd_<space>``;
- ``diversity`` (pixel spread inside a fiber relative to independent images) and, on the toy world, the
  oracle's ``valid``.

A provenance line (command, UTC date, versions, seeds) heads every file. Also written: ``samples.csv`` (one row
per sample and draw), ``realism.csv`` (one row per draw and space, with n and the small-n caveat) and
``provenance.json``.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torchmetrics

from .. import toy
from ..analysis.metrics import (
    FIBER_LOSS_COLUMNS,
    SMALL_N_CAVEAT,
    FeatureSpace,
    Neighbours,
    PresetStepsWarning,
    check_preset_steps,
    colour_shift,
    data_scale,
    embed,
    feature_space,
    histogram,
    load_image_folder,
    loss_frame,
    nearest_neighbours,
    realism_from_features,
    sample_diversity,
    spread,
)
from ..analysis.semantics import clip_labels, make_vocab, score_fiber
from ..analysis.toy_scores import score_fiber_oracle
from ..errors import ConfigError
from ..models import load_clip, load_extractor, load_prior
from ..plots import bars, image_grid
from ..sampling import FiberResult, resolve_settings, run_versions, sample_fiber
from ..sampling.result import is_logits
from ..seeds import REPRODUCE_BANK_SEED, REPRODUCE_REFERENCE_SEED
from ..toy import load_oracle

REFERENCE_SEED = REPRODUCE_REFERENCE_SEED
BANK_SEED = REPRODUCE_BANK_SEED
QUICK_EXTRACTORS = ("toy/shape-resnet@logits", "toy/color-vit@logits")
QUICK = dict(n=2, n_references=2, draws=2, bank_size=96, kid_subsets=10)  # `make test`: tens of seconds on a CPU
TOY_SPACES = ("oracle", "clip:toy/clip")
REAL_SPACES = ("inception",)
ID_COLUMNS = ["extractor", "method", "prior", "preset", "steps", "references", "n", "draws"]


@dataclass
class Reproduction:
    """What :func:`reproduce` computed and wrote.

    ``table``: one row per (extractor, method), the columns of the module docstring; ``samples``: one row per
    sample and draw; ``neighbours``: one row per (extractor, reference); ``realism``: one row per (extractor,
    method, draw, space); ``files``: name -> path; ``provenance``: command, date, versions, seeds, settings.
    """

    table: pd.DataFrame
    samples: pd.DataFrame
    neighbours: pd.DataFrame
    realism: pd.DataFrame
    provenance: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs

def load_references(references: str, count: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``"toy"``: ``count`` fresh renders; else an image folder's first ``count`` files (squashed to ``size``).
    Returns ``(images [count,3,size,size] in [0,1], ids)``."""
    if references == "toy":
        images, _ = toy.references(count, seed=REFERENCE_SEED + seed)
        return images, [f"toy-{REFERENCE_SEED + seed}-{i}" for i in range(count)]
    images, names = load_image_folder(references, size=size, limit=count)
    return images, names


def load_bank(bank: str | None, references: str, size: int, bank_size: int, seed: int) -> torch.Tensor:
    """The search set and realism reference ``[M,3,size,size]``: ``"toy"`` renders ``bank_size`` scenes; a folder
    is read whole; ``None`` takes the references' source (the toy world, or the whole references folder)."""
    source = bank if bank is not None else references
    if source == "toy":
        return toy.render(toy.sample_factors(bank_size, seed=BANK_SEED + seed))
    return load_image_folder(source, size=size)[0]


def resolve_spaces(spaces: Sequence[str | FeatureSpace] | None, references: str, device) -> list[FeatureSpace]:
    """The realism feature spaces, loaded before any sampling (a missing Inception fails here, not after)."""
    chosen = spaces if spaces is not None else (TOY_SPACES if references == "toy" else REAL_SPACES)
    out = [feature_space(s, device) for s in chosen]
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"two feature spaces share a name {names}; name them: 'name=<spec>'")
    return out


# --------------------------------------------------------------------------- sampling

def draw_fibers(prior, extractors: Mapping[str, Any], refs: torch.Tensor, ids: list[str], *, method: str,
                preset: str | None, steps: int | None, n: int, seeds: Sequence[int], baseline: bool,
                batch_size: int, progress: bool) -> dict[tuple[str, str, int], FiberResult]:
    """``{(extractor, method, seed): FiberResult}``: the guided fibers of every extractor for every seed, and
    (``baseline``) the prior's own samples once per seed (unguided images do not depend on the extractor)."""
    out = {}
    with warnings.catch_warnings():  # reproduce() has warned about a short step count once already
        warnings.simplefilter("ignore", PresetStepsWarning)
        for s in seeds:
            for spec, ex in extractors.items():
                out[(spec, method, s)] = sample_fiber(prior, ex, refs, n=n, method=method, preset=preset,
                                                      steps=steps, seed=s, batch_size=batch_size,
                                                      progress=progress, reference_ids=ids)
            if baseline:
                first = next(iter(extractors.values()))
                res = sample_fiber(prior, first, refs, n=n, method="unguided", seed=s, batch_size=batch_size,
                                   progress=progress, reference_ids=ids)
                for spec in extractors:
                    out[(spec, "unguided", s)] = res
    return out


def sample_rows(results: Mapping[tuple[str, str, int], FiberResult], extractors: Mapping[str, Any],
                scale: float, oracle=None) -> pd.DataFrame:
    """One row per sample and draw: ``extractor, method, seed, reference, sample``, the
    :data:`FIBER_LOSS_COLUMNS` in the extractor's feature space, ``diversity`` and (toy) ``valid``."""
    frames = []
    for (spec, method, s), res in results.items():
        ex = extractors[spec]
        feats = res.features if res.config["extractor"] == ex.spec else embed(ex, res.images)
        ref_f = res.reference_features if res.config["extractor"] == ex.spec else embed(ex, res.reference)
        df = loss_frame(feats, ref_f, res.n, is_logits(ex.spec))
        df.insert(0, "seed", s)
        df.insert(0, "method", method)
        df.insert(0, "extractor", spec)
        df["steps"] = res.config["steps"]
        df["preset"] = res.config.get("preset")
        df["diversity"] = sample_diversity(res.images, res.n, scale).numpy()
        if oracle is not None:
            df["valid"] = oracle.valid(res.images).astype(float)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- realism and neighbours

def realism_rows(results: Mapping[tuple[str, str, int], FiberResult], spaces: Sequence[FeatureSpace],
                 bank_feats: Mapping[str, torch.Tensor], kid_subsets: int) -> pd.DataFrame:
    """One row per (extractor, method, seed, space): FD and KID of that draw's samples against the bank."""
    rows, cache = [], {}
    for (spec, method, s), res in results.items():
        for sp in spaces:
            key = (id(res), sp.name)
            if key not in cache:
                cache[key] = realism_from_features(embed(sp.embed, res.images), bank_feats[sp.name], sp.name, seed=s,
                                                   kid_subsets=kid_subsets)
            rows.append({"extractor": spec, "method": method, "seed": s, **cache[key]})
    return pd.DataFrame(rows)


def real_floor(spaces: Sequence[FeatureSpace], bank_feats: Mapping[str, torch.Tensor], n: int,
               seeds: Sequence[int], kid_subsets: int) -> dict[str, float]:
    """FD and KID of ``n`` random bank images against the rest of the bank, mean and std over ``seeds``:
    what perfectly realistic samples would score at this n (``real_fd_<space>``, ``real_kid_<space>``…)."""
    out: dict[str, float] = {}
    for sp in spaces:
        feats = bank_feats[sp.name]
        if feats.shape[0] < n + 2:
            raise ConfigError(f"the bank holds {feats.shape[0]} images; the real-image floor at n={n} needs {n + 2}")
        fds, kids = [], []
        for s in seeds:
            perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(BANK_SEED + s))
            rec = realism_from_features(feats[perm[:n]], feats[perm[n:]], sp.name, seed=s, kid_subsets=kid_subsets)
            fds.append(rec["fd"])
            kids.append(rec["kid"])
        for name, v in (("fd", fds), ("kid", kids)):
            out[f"real_{name}_{sp.name}"] = float(np.mean(v))
            out[f"real_{name}_{sp.name}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
    return out


def neighbour_rows(refs: torch.Tensor, bank: torch.Tensor, extractors: Mapping[str, Any],
                   spaces: Sequence[FeatureSpace], bank_feats: Mapping[str, torch.Tensor],
                   kid_subsets: int) -> tuple[pd.DataFrame, dict[str, Neighbours], dict[str, dict[str, float]]]:
    """Per extractor: its nearest neighbours (frame rows, :class:`Neighbours`) and their realism: FD / KID of
    the neighbours against the bank without them (``nearest_neighbour_fd_<space>``, …; n = references)."""
    frames, found, real = [], {}, {}
    for spec, ex in extractors.items():
        nb = nearest_neighbours(refs, bank, ex)
        found[spec] = nb
        frames.append(nb.frame().assign(extractor=spec))
        keep = torch.ones(bank.shape[0], dtype=torch.bool)
        keep[nb.index] = False
        real[spec] = {}
        for sp in spaces:
            chosen = bank_feats[sp.name][nb.index]
            if chosen.shape[0] < 2:
                continue
            rec = realism_from_features(chosen, bank_feats[sp.name][keep], sp.name, kid_subsets=kid_subsets)
            real[spec][f"nearest_neighbour_fd_{sp.name}"] = rec["fd"]
            real[spec][f"nearest_neighbour_kid_{sp.name}"] = rec["kid"]
    return pd.concat(frames, ignore_index=True), found, real


# --------------------------------------------------------------------------- the table

def assemble_table(samples: pd.DataFrame, realism: pd.DataFrame, neighbours: pd.DataFrame,
                   nn_real: Mapping[str, Mapping[str, float]], floor: Mapping[str, float],
                   meta: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (extractor, method): means over draws with ``_std`` across draws, the nearest-neighbour
    columns, realism per space and the settings (``prior, preset, steps, references, n, draws, n_bank``)."""
    stats = [c for c in (*FIBER_LOSS_COLUMNS, "diversity", "valid") if c in samples.columns]
    table = spread(samples, stats, by=("extractor", "method"), draw="seed")
    wide = realism.pivot_table(index=["extractor", "method", "seed"], columns="space", values=["fd", "kid"])
    wide.columns = [f"{m}_{s}" for m, s in wide.columns]
    real = spread(wide.reset_index(), list(wide.columns), by=("extractor", "method"), draw="seed").drop(columns="draws")
    table = table.merge(real, on=["extractor", "method"], how="left")
    nn = neighbours.groupby("extractor")[list(FIBER_LOSS_COLUMNS)].mean().add_prefix("nearest_neighbour_")
    table = table.merge(nn.reset_index(), on="extractor", how="left")
    table = table.merge(pd.DataFrame.from_dict(nn_real, orient="index").rename_axis("extractor").reset_index(),
                        on="extractor", how="left") if any(nn_real.values()) else table
    for k, v in floor.items():
        table[k] = v
    steps = samples.groupby(["extractor", "method"])["steps"].first().rename("steps")
    table = table.merge(steps.reset_index(), on=["extractor", "method"], how="left")
    table["preset"] = np.where(table["method"] == "unguided", "(prior's own)", meta["preset"] or "(prior's)")
    table["prior"], table["references"], table["n"] = meta["prior"], meta["references"], meta["n"]
    table["n_bank"] = meta["n_bank"]
    front = [c for c in ID_COLUMNS if c in table.columns]
    return table[front + [c for c in table.columns if c not in front]]


def cell(mean: float, std: float | None = None, tex: bool = False) -> str:
    """``273 ± 12`` (3 significant digits; ``—`` for NaN; no ``±`` without a finite std)."""
    if mean is None or not np.isfinite(mean):
        return "—"
    text = f"{mean:.3g}"
    if std is not None and np.isfinite(std):
        return f"${text} \\pm {std:.2g}$" if tex else f"{text} ± {std:.2g}"
    return f"${text}$" if tex else text


def sections(table: pd.DataFrame, spaces: Sequence[FeatureSpace]) -> list[tuple[str, list[str]]]:
    """The paper's tables as ``(title, columns)``: Table 5, Table 7 / colorMNIST, Table 2 per space, diversity."""
    out = [("Fiber loss (Table 5): squared L2 summed over feature dimensions; ± = std across draws",
            ["fiber_sq_l2", "nearest_neighbour_fiber_sq_l2"]),
           ("Fiber loss conventions (Table 7, colorMNIST RMS); ± = std across draws",
            ["fiber_l2", "fiber_l1", "fiber_ce", "fiber_ce_soft", "fiber_rms", "fiber_cos"])]
    for sp in spaces:
        cols = [f"fd_{sp.name}", f"kid_{sp.name}", f"real_fd_{sp.name}", f"real_kid_{sp.name}",
                f"nearest_neighbour_fd_{sp.name}", f"nearest_neighbour_kid_{sp.name}"]
        out.append((f"Realism (Table 2) in {sp.name}: {sp.description}", [c for c in cols if c in table.columns]))
    out.append(("Diversity and validity", [c for c in ("diversity", "valid") if c in table.columns]))
    return out


def render_markdown(table: pd.DataFrame, spaces: Sequence[FeatureSpace], provenance: str, notes: str) -> str:
    """The tables as Markdown sections (``mean ± std`` cells), the provenance line first."""
    lines = [f"<!-- {provenance} -->", f"Provenance: {provenance}", ""]
    for title, cols in sections(table, spaces):
        lines += [f"### {title}", "", "| extractor | method | " + " | ".join(cols) + " |",
                  "|---|---|" + "---:|" * len(cols)]
        for _, r in table.iterrows():
            vals = [cell(r[c], r.get(f"{c}_std")) for c in cols]
            lines.append(f"| {r['extractor']} | {r['method']} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines + [notes, ""])


def render_latex(table: pd.DataFrame, spaces: Sequence[FeatureSpace], provenance: str) -> str:
    """The tables as booktabs ``tabular`` environments, the provenance as a comment."""
    def esc(s: str) -> str:
        return str(s).replace("\\", "/").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")

    lines = [f"% {provenance}"]
    for title, cols in sections(table, spaces):
        lines += [f"% {title}", r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule",
                  "extractor & method & " + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
        for _, r in table.iterrows():
            vals = [cell(r[c], r.get(f"{c}_std"), tex=True) for c in cols]
            lines.append(f"{esc(r['extractor'])} & {esc(r['method'])} & " + " & ".join(vals) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def provenance_record(command: str | None, seeds: Sequence[int], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Command, UTC date, versions and seeds of a reproduction, plus its ``settings``; ``line`` is one line."""
    versions = {**run_versions(), "torchmetrics": torchmetrics.__version__, "python": platform.python_version()}
    cmd = command or shlex.join(["fiberbench", *sys.argv[1:]] if sys.argv[0].endswith("fiberbench")
                                else [sys.executable, *sys.argv])
    date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = (f"{cmd} | {date} | " + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f" | seeds {', '.join(map(str, seeds))} | reference seed {settings.get('reference_seed')}")
    return {"command": cmd, "date": date, "versions": versions, "seeds": list(seeds), **settings, "line": line}


def write_outputs(rep: Reproduction, spaces: Sequence[FeatureSpace], out: str | Path) -> dict[str, Path]:
    """Write the table (CSV with a ``#`` provenance line: read it with ``pd.read_csv(path, comment="#")``,
    Markdown, LaTeX) and the per-sample, neighbour and realism frames and the provenance JSON into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    line = rep.provenance["line"]
    notes = (f"Realism: {SMALL_N_CAVEAT}. Samples per FD: {rep.provenance['samples_per_draw']} per draw; "
             f"bank: {rep.provenance['n_bank']} images.")
    files = {"csv": out / "fiber_table.csv", "md": out / "fiber_table.md", "tex": out / "fiber_table.tex",
             "samples": out / "samples.csv", "neighbours": out / "neighbours.csv", "realism": out / "realism.csv",
             "provenance": out / "provenance.json"}
    files["csv"].write_text(f"# {line}\n" + rep.table.to_csv(index=False))
    files["md"].write_text(render_markdown(rep.table, spaces, line, notes))
    files["tex"].write_text(render_latex(rep.table, spaces, line))
    rep.samples.to_csv(files["samples"], index=False)
    rep.neighbours.to_csv(files["neighbours"], index=False)
    rep.realism.to_csv(files["realism"], index=False)
    files["provenance"].write_text(json.dumps(rep.provenance, indent=2, default=str))
    return files


# --------------------------------------------------------------------------- the entry point

def reproduce(extractors: Sequence[str], prior: str = "toy/prior-fm", references: str = "toy", *,
              bank: str | None = None, preset: str | None = None, method: str = "ndtm", n: int = 4,
              n_references: int = 8, draws: int = 3, seed: int = 0, steps: int | None = None,
              spaces: Sequence[str | FeatureSpace] | None = None, baseline: bool = True, bank_size: int = 512,
              kid_subsets: int = 50, out: str | Path | None = None, batch_size: int = 64, device: str = "cpu",
              command: str | None = None, progress: bool = False) -> Reproduction:
    """The fiber paper's evaluation of ``extractors`` (spec strings) under ``prior`` (see the module docstring).

    ``references``: ``"toy"`` (fresh renders) or an image folder (its first ``n_references`` files);
    ``bank``: the nearest-neighbour search set and realism reference (default: the references' source, i.e.
    ``bank_size`` toy renders or the whole references folder); ``preset``: default the prior's recommendation;
    ``steps`` below the preset's warns (:class:`~fiberbench.analysis.metrics.PresetStepsWarning`); ``spaces``:
    realism feature spaces (default ``oracle`` and ``clip:toy/clip`` on the toy world, ``inception`` on
    folders). Writes the files into ``out`` when given. On the toy world with the defaults: minutes on a CPU.
    """
    t0 = time.perf_counter()
    if draws < 1 or n < 2 or n_references < 1 or not extractors:
        raise ConfigError("reproduce needs >= 1 extractor, draws >= 1, n >= 2 (diversity) and n_references >= 1")
    p = load_prior(prior, device=device)
    _, _, prov = resolve_settings(method, preset, {}, p)
    budget = check_preset_steps(prov["preset"], steps, p)
    spaces_ = resolve_spaces(spaces, references, device)
    exs = {spec: load_extractor(spec, device=device) for spec in extractors}
    refs, ids = load_references(references, n_references, p.image_size, seed)
    bank_images = load_bank(bank, references, p.image_size, bank_size, seed)
    seeds = [seed + d for d in range(draws)]
    results = draw_fibers(p, exs, refs, ids, method=method, preset=preset, steps=steps, n=n, seeds=seeds,
                          baseline=baseline, batch_size=batch_size, progress=progress)
    oracle = load_oracle() if references == "toy" else None
    samples = sample_rows(results, exs, data_scale(bank_images[:256]), oracle)
    bank_feats = {sp.name: embed(sp.embed, bank_images) for sp in spaces_}
    realism = realism_rows(results, spaces_, bank_feats, kid_subsets)
    floor = real_floor(spaces_, bank_feats, refs.shape[0] * n, seeds, kid_subsets)
    nb_frame, _, nn_real = neighbour_rows(refs, bank_images, exs, spaces_, bank_feats, kid_subsets)
    settings = {"prior": prior, "references": references if references == "toy" else str(references),
                "reference_seed": REFERENCE_SEED + seed if references == "toy" else None, "bank": bank or references,
                "n_bank": int(bank_images.shape[0]), "n": n, "n_references": int(refs.shape[0]), "draws": draws,
                "method": method, "preset": prov["preset"], "preset_from": prov["preset_from"], "steps": steps,
                "guidance_budget": budget, "spaces": {s.name: s.description for s in spaces_},
                "samples_per_draw": int(refs.shape[0] * n), "reference_ids": ids}
    prov_rec = provenance_record(command, seeds, settings)
    table = assemble_table(samples, realism, nb_frame, nn_real, floor, {**settings, "references": refs.shape[0]})
    prov_rec["seconds"] = time.perf_counter() - t0
    rep = Reproduction(table=table, samples=samples, neighbours=nb_frame, realism=realism, provenance=prov_rec)
    if out is not None:
        rep.files = write_outputs(rep, spaces_, out)
    return rep


def reproduce_quick(out: str | Path | None = None, seed: int = 0, command: str | None = None) -> Reproduction:
    """The reduced toy reproduction ``make test`` runs: the shape and colour classifiers, 2 references x 2
    samples x 2 draws, the toy preset at its own 20 steps, a 96-image bank."""
    return reproduce(list(QUICK_EXTRACTORS), "toy/prior-fm", "toy", preset="toy", seed=seed, out=out,
                     command=command, **QUICK)


# --------------------------------------------------------------------------- figures of notebook 06

def judge_scores(results: Mapping[str, FiberResult], judge: str = "oracle",
                 concepts: Mapping[str, Sequence[str]] | Sequence[str] | None = None) -> pd.DataFrame:
    """What changed inside each fiber, per sample, by the judge: ``"oracle"`` (toy; class = the reference's
    shape) or a CLIP spec with a vocabulary from ``concepts`` (class = CLIP's label of the reference in the
    vocabulary's first group). Columns of :func:`~fiberbench.analysis.semantics.score_fiber`."""
    frames = []
    if judge == "oracle":
        oracle = load_oracle()
        for res in results.values():
            classes = list(oracle.predict(res.reference)["shape"])
            frames.append(score_fiber_oracle(res, oracle, classes=classes))
        return pd.concat(frames, ignore_index=True)
    if concepts is None:
        raise ConfigError("a CLIP judge needs concepts: a list of words or {group: [words]}")
    clip = load_clip(judge)
    vocab = make_vocab(dict(concepts) if isinstance(concepts, Mapping) else list(concepts))
    first = next(iter(vocab))
    for res in results.values():
        classes = list(clip_labels(clip, res.reference, vocab)[f"{first}_label"])
        frames.append(score_fiber(res, clip, vocab, classes=classes))
    return pd.concat(frames, ignore_index=True)


def gallery_figure(results: Mapping[str, FiberResult], neighbours: Mapping[str, Neighbours], *, reference: int = 0,
                   max_samples: int = 6, tile: int = 72):
    """One row per extractor: the reference (red frame), its samples by fiber loss (captions: squared L2 in the
    extractor's space) and the nearest real image (blue frame, its loss): the paper's fiber grids."""
    images, captions, outline = [], [], []
    for spec, res in results.items():
        n = res.n
        f = res.to_frame()
        sub = f[f["reference"] == reference].sort_values("fiber_sq_l2").head(max_samples)
        nb = neighbours[spec]
        nn_loss = nb.frame()["fiber_sq_l2"].iloc[reference]
        images += [res.reference[reference]] + [res.images[reference * n + int(s)] for s in sub["sample"]]
        images.append(nb.images[reference])
        captions += [spec.split("/")[-1]] + [f"d²={v:.3g}" for v in sub["fiber_sq_l2"]] + [f"NN d²={nn_loss:.3g}"]
        outline += ["#d62728"] + [None] * len(sub) + ["#1f77b4"]
    ncols = len(captions) // len(results)
    return image_grid(torch.stack([torch.as_tensor(i).float() for i in images]), captions, ncols=ncols, tile=tile,
                      outline=outline)


def colour_shift_figure(results: Mapping[str, FiberResult], bins: int = 21):
    """The colorMNIST-style histogram: per channel, the distribution of the foreground colour's shift from the
    reference inside the fibers, one colour per extractor (a colour-blind model spreads, a colour model not)."""
    shifts = pd.concat([colour_shift(r).assign(extractor=name) for name, r in results.items()], ignore_index=True)
    hist = histogram(shifts, "shift", by=["extractor", "channel"], bins=bins)
    hist["bin"] = hist["bin"].round(2)
    return bars(hist, "bin", "density", color="extractor", facet="channel", y_title="fraction of samples",
                title="colour shift from the reference (foreground)")
