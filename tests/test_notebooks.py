"""Every notebook runs top to bottom (nbclient) on the embedded default with tiny settings; printed numbers
are parsed and checked. Parameters are injected papermill-style: a cell after the one tagged ``parameters``.

One kernel serves all notebooks of this module (importing torch, diffusers and open_clip costs more than
running a tiny notebook on a loaded machine); each notebook starts with ``%reset -f``, so its namespace is
empty and it runs top to bottom on its own. A fresh kernel per notebook is what the browser test does.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch

import fiberbench as fb

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["00_quickstart", "01_fiber_gallery", "02_invariance_per_class", "03_null_space_sing",
             "04_compare_models", "05_real_models", "06_paper_figures", "08_null_space_pictures"]


def inject(nb, params: dict, threads: int = 1):
    """Insert a cell with ``params`` right after the ``parameters`` cell (as papermill does), and a
    namespace reset before everything."""
    import nbformat

    reset = nbformat.v4.new_code_cell("%reset -f")
    reset.metadata["tags"] = ["injected-reset"]
    nb.cells.insert(0, reset)
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = f"import torch\ntorch.set_num_threads({threads})\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)
    return nb


@pytest.fixture(scope="module")
def kernel():
    """One python3 kernel (cwd = notebooks/) shared by the notebooks of this module."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(NB_DIR), env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    yield km
    km.shutdown_kernel(now=True)


def run_notebook(km, name: str, params: dict, timeout: int = 240, store_widget_state: bool = False):
    """Execute ``notebooks/<name>.ipynb`` with ``params`` in kernel ``km``; returns ``(notebook, text output)``."""
    import nbformat
    from nbclient import NotebookClient

    nb = inject(nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4), params)
    NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3", store_widget_state=store_widget_state,
                   resources={"metadata": {"path": str(NB_DIR)}}).execute()
    texts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                texts.append(o["text"])
            elif "data" in o and "text/plain" in o["data"]:
                texts.append(o["data"]["text/plain"])
    return nb, "\n".join(texts)


def mime_count(nb, mime: str) -> int:
    return sum(1 for c in nb.cells for o in c.get("outputs", []) if mime in o.get("data", {}))


def number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, f"pattern {pattern!r} not in the notebook output:\n{text[-3000:]}"
    return float(m.group(1))


FLOAT = r"(-?[0-9.]+(?:e[-+]?\d+)?)"


# --------------------------------------------------------------------------- tiny stand-ins

def _tiny_open_clip(d: Path, seed: int) -> str:
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    pre = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
           "interpolation": "bicubic", "resize_mode": "shortest"}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    d.mkdir(parents=True)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return f"open_clip/local-dir:{d}"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """Tiny random models of the hub classes of notebook 05, saved locally, as spec strings."""
    import timm
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("standins")
    torch.manual_seed(0)
    specs = {}
    args = dict(num_classes=5, layers=[1, 1, 1, 1], channels=[8, 16, 16, 16], stem_width=8)
    m = timm.create_model("resnet18", **args, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
    save_for_hf(m, str(root / "resnet"), model_args=args, safe_serialization=True)
    vargs = dict(img_size=28, patch_size=14, embed_dim=24, depth=1, num_heads=2, num_classes=0)
    v = timm.create_model("vit_small_patch14_dinov2", **vargs, pretrained_cfg_overlay=dict(input_size=(3, 28, 28)))
    save_for_hf(v, str(root / "dinov2"), model_args=vargs, safe_serialization=True)
    specs["EXTRACTORS"] = [f"timm/{root / 'resnet'}@pre_logits", f"timm/{root / 'dinov2'}@pre_logits"]
    specs["CLIPS"] = [_tiny_open_clip(root / "clip-a", 0), _tiny_open_clip(root / "clip-b", 1)]
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[8, 16],
                       down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                       up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                       norm_num_groups=8, attention_head_dim=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "ddpm")
    specs["PRIOR"] = f"diffusers/{root / 'ddpm'}"
    return specs


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    """The shipped toy CLIP, or a tiny random open_clip model while it is not shipped."""
    if "toy/clip" in fb.list_models(kind="clip"):
        return "toy/clip"
    return _tiny_open_clip(tmp_path_factory.mktemp("clip") / "tiny", 0)


def two_extractors():
    if "toy/color-vit" in fb.list_models(kind="extractor"):
        return ["toy/shape-resnet@logits", "toy/color-vit@logits"]
    return ["toy/shape-resnet@logits", "toy/shape-resnet@pre_logits"]


# --------------------------------------------------------------------------- the notebooks

def test_notebooks_hold_a_parameters_cell_and_no_outputs():
    import nbformat

    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is saved with outputs"


def test_00_quickstart(kernel, tmp_path, clip_spec):
    nb, text = run_notebook(kernel, "00_quickstart", dict(CLIP=clip_spec, REFERENCES=2, N=2, STEPS=3))
    guided = number(text, r"fiber samples " + FLOAT)
    unguided = number(text, r"unguided prior samples " + FLOAT)
    assert guided > unguided and guided > 0.9  # the fiber loss did its job (whatever the samples look like)
    angle = number(text, r"mean CLIP angle to the reference: " + FLOAT)
    assert 0 <= angle <= 180
    line = re.search(r"change rate per attribute: (\{.*\})", text).group(1)
    rates = {k: float(v) for k, v in re.findall(r"'(\w+)': (nan|[0-9.]+)", line)}
    assert set(rates) >= {"shape", "color"}
    assert all(0 <= v <= 1 for v in rates.values() if v == v) and rates["shape"] == rates["shape"]
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 2  # the grid and the change-rate plot
    assert "QUICKSTART_DONE 4" in text


def test_01_fiber_gallery(kernel, tmp_path, clip_spec):
    params = dict(CLIP=clip_spec, N=3, STEPS=3, STORE=str(tmp_path / "store"))
    nb, text = run_notebook(kernel, "01_fiber_gallery", params,
                            store_widget_state=True)
    assert number(text, FLOAT + r" samples; median feature distance") == 3
    assert number(text, r"median feature distance " + FLOAT) >= 0
    assert 0 <= number(text, r"median CLIP angle " + FLOAT) <= 180
    assert "from store: False" in text
    assert mime_count(nb, "application/vnd.jupyter.widget-view+json") == 1
    assert "application/vnd.jupyter.widget-state+json" in nb.metadata.get("widgets", {})
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 2
    assert "FIBER_GALLERY_DONE 4" in text
    assert number(text, r"first fiber: (\d+) samples in") == 3
    print(re.search(r"first fiber: .*", text).group(0))  # timed here, at tiny settings; the defaults' in the docs


def test_02_invariance_per_class(kernel, tmp_path, clip_spec):
    exts = two_extractors()
    if exts[1] != "toy/color-vit@logits":
        pytest.skip("toy/color-vit is not shipped yet: notebook 02 compares it with the shape classifier")
    nb, text = run_notebook(kernel, "02_invariance_per_class", dict(
        CLIP=clip_spec, EXTRACTORS=exts, PER_CLASS=1, N=2, STEPS=3, STORE=str(tmp_path / "store"),
        N_GROUND_TRUTH=200))
    assert "INVARIANCE_DONE 16" in text  # 2 extractors x 4 classes x 1 reference x 2 samples
    print(re.search(r"notebook executed in .*", text).group(0))
    for g in ("shape", "color", "background", "mirror"):
        assert 0 <= number(text, rf"'{g}_changed': " + FLOAT) <= 1
    # the ground truth (interventions on the shipped classifiers; no sampling involved)
    assert re.search(r"shape-resnet@logits blind to \['color', 'mirror'\], sees shape: ground truth True", text), text
    assert re.search(r"color-vit@logits blind to \['shape'\], sees color: ground truth True", text), text


def test_03_null_space_sing(kernel, tmp_path, clip_spec):
    nb, text = run_notebook(kernel, "03_null_space_sing", dict(CLIP=clip_spec, N_FIT=300, N_SCORE=12, STEER_STEPS=60,
                                                       CONCEPTS=["red", "circle"], STEER_TO="blue"))
    check_sing_notebook(nb, text, n_scores=24, n_models=len(two_extractors()))


def check_sing_notebook(nb, text: str, n_scores: int, n_models: int) -> None:
    """Notebook 03's printed numbers: exact logit equality, translator fit, steering, leakage and Table 1."""
    assert number(text, r"removing the null component: " + FLOAT) <= 1e-5
    assert -1 <= number(text, r"held-out cosine to CLIP: " + FLOAT) <= 1
    before, after = number(text, r"cos " + FLOAT + " ->"), number(text, r"-> " + FLOAT + ";")
    assert after >= before
    assert number(text, r"max logit change " + FLOAT) <= 1e-5
    assert number(text, r"null space " + FLOAT + " dims") >= 1
    assert 0 <= number(text, r"in " + FLOAT + r"% of images") <= 100
    assert number(text, r"Table 1 toward \S+: max logit change " + FLOAT) <= 1e-5
    assert len(re.findall(r"abs_as_mean", text)) >= 1 and text.count("@logits") >= n_models
    assert mime_count(nb, "application/vnd.jupyter.widget-view+json") == 1
    assert f"SING_DONE {n_scores}" in text


@pytest.fixture(scope="module")
def sing_standins(tmp_path_factory):
    """Tiny random models of SING's classes saved as timm folders (ResNet, BiT with its 1x1-conv head, a
    headless DINO-style ViT with a random linear probe), a tiny open_clip and a folder of 20 images."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp("sing-standins")
    args = {"resnet": ("resnet18", dict(num_classes=5, layers=[1, 1, 1, 1], channels=[8, 16, 16, 16], stem_width=8)),
            "bit": ("resnetv2_50x1_bit", dict(num_classes=5, channels=[128, 128, 128, 128], stem_chs=32)),
            "dino": ("vit_tiny_patch16_224", dict(num_classes=0, img_size=32, patch_size=8, embed_dim=24, depth=1,
                                                  num_heads=2))}
    torch.manual_seed(0)
    for kind, (arch, kw) in args.items():
        m = timm.create_model(arch, **kw, pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
        save_for_hf(m, str(root / kind), model_args=kw, safe_serialization=True)
    save_file({"weight": torch.randn(4, 24), "bias": torch.randn(4)}, str(root / "probe.safetensors"),
              metadata={"classes": json.dumps(["circle", "square", "triangle", "arrow"])})
    folder = root / "images"
    folder.mkdir()
    for i, im in enumerate(fb.toy.render(fb.toy.sample_factors(20, seed=12))):
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"im{i:02d}.png")
    exts = [f"timm/{root / k}@logits" for k in args]
    return dict(EXTRACTORS=exts, LINEAR_PROBES={exts[2]: str(root / "probe.safetensors")},
                CLIP=_tiny_open_clip(root / "clip", 0), IMAGES=str(folder), IMAGE_SIZE=32)


def test_03_null_space_sing_on_tiny_standins(kernel, sing_standins):
    params = dict(**sing_standins, N_FIT=14, N_SCORE=6, STEER_STEPS=40, CONCEPTS=["a dog", "red"], STEER_TO="a cat",
                  TABLE1_CONCEPT="jellyfish")
    nb, text = run_notebook(kernel, "03_null_space_sing", params)
    check_sing_notebook(nb, text, n_scores=12, n_models=3)
    for spec in sing_standins["EXTRACTORS"]:  # every model has its Table 1 row: |AS| after steering
        assert 0 < number(text, re.escape(spec) + r": \|AS\| " + FLOAT) < 180


@pytest.mark.timeout(900)
def test_08_null_space_pictures(kernel):
    """At its defaults (the teaching run, ~2 min on one thread): the pictures and the checked finding."""
    nb, text = run_notebook(kernel, "08_null_space_pictures", {}, timeout=600)
    assert "NULL_PICTURES_DONE 72" in text  # 3 targets x 2 images x 4 samples; 2 layers x 8 references x 3 factors
    at_h = number(text, r"logit change: samples at h " + FLOAT)
    assert at_h < 0.1  # the h samples' logits are those of h, within the fiber's own precision
    kept_h, kept_hp = number(text, r"background kept: at h " + FLOAT + "%"), number(text, r"at h' " + FLOAT + "%")
    assert kept_h > kept_hp  # removing the null component removed the background from the pictures
    pre = number(text, r"background kept in @pre_logits fibers " + FLOAT + "%")
    logit = number(text, r"in @logits fibers " + FLOAT + "%")
    assert pre > logit
    assert number(text, r"image_score_features: " + FLOAT + " degrees") > 0
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 3  # the pictures, the IS bars, head vs backbone


def test_04_compare_models(kernel, tmp_path, clip_spec):
    nb, text = run_notebook(kernel, "04_compare_models", dict(CLIP=clip_spec, EXTRACTORS=two_extractors(), REFERENCES=2,
                                                      N=2, STEPS=3, STORE=str(tmp_path / "store")))
    assert "COMPARE_DONE 8" in text
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 2 + 2  # two grids, distances, change rates
    for ext in two_extractors():
        assert re.search(re.escape(ext) + r"\s+" + FLOAT + r"\s+" + FLOAT + r"\s+" + FLOAT, text), ext


def test_05_real_models_on_tiny_standins(kernel, standins):
    nb, text = run_notebook(kernel, "05_real_models", dict(**standins, N=2, STEPS=3, SEED=1))
    assert "REAL_MODELS_DONE 8" in text  # 2 CLIP models x 2 extractors x 2 samples
    for spec in standins["EXTRACTORS"]:
        cos = number(text, re.escape(spec) + r": feature cosine " + FLOAT)
        assert -1 <= cos <= 1
    assert mime_count(nb, "application/vnd.plotly.v1+json") == 2


PAPER_FIGURES = ("fiber_gallery", "agreement", "change_rates", "colour_shift", "loss")


def check_paper_figures(nb, text: str, out, extractors) -> None:
    """Notebook 06's output: every figure in every format, the sizes, the losses and the agreement matrix."""
    assert f"PAPER_FIGURES_DONE {3 * len(PAPER_FIGURES)}" in text
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{n}.{f}" for n in PAPER_FIGURES for f in ("png", "svg", "pdf"))
    assert "PNG size (pixels): (625, 375) expected (625, 375)" in text
    assert (out / "agreement.pdf").read_bytes()[:5] == b"%PDF-"
    assert "guided updates" in text  # STEPS=3 is below the preset's: warned with the numbers
    for spec in extractors:
        loss = number(text, re.escape(spec) + r": fiber_sq_l2 " + FLOAT)
        nn = number(text, re.escape(spec) + r": fiber_sq_l2 \S+ \(nearest real image " + FLOAT)
        assert loss >= 0 and nn >= 0
    assert "cross-model agreement (rows: whose fibers, columns: judged by):" in text


def test_06_paper_figures(kernel, tmp_path):
    out = tmp_path / "figs"
    exts = two_extractors()
    nb, text = run_notebook(kernel, "06_paper_figures", dict(EXTRACTORS=exts, N_REFERENCES=2, N=2, STEPS=3,
                                                     BANK_SIZE=48, STORE=str(tmp_path / "store"), OUT=str(out),
                                                     DPI=120, WIDTH=500, HEIGHT=300))
    check_paper_figures(nb, text, out, exts)
    assert "judged by oracle" in text and "'shape_changed'" in text


def test_06_paper_figures_on_tiny_standins(kernel, standins, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"  # a user's folder of images: references and nearest-neighbour bank
    folder.mkdir()
    for i, im in enumerate(fb.toy.render(fb.toy.sample_factors(6, seed=11))):
        arr = (im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).resize((48, 40)).save(folder / f"photo{i}.png")
    out = tmp_path / "figs"
    params = dict(PRIOR=standins["PRIOR"], EXTRACTORS=standins["EXTRACTORS"], REFERENCES=str(folder),
                  JUDGE=standins["CLIPS"][0], CONCEPTS={"object": ["dog", "car"], "colour": ["red", "blue"]},
                  PRESET="fiber-imagenet", N_REFERENCES=2, N=2, STEPS=3, STORE=None, OUT=str(out), DPI=120,
                  WIDTH=500, HEIGHT=300)
    nb, text = run_notebook(kernel, "06_paper_figures", params)
    check_paper_figures(nb, text, out, standins["EXTRACTORS"])
    assert "bank of 6 images" in text and "'object_changed'" in text
