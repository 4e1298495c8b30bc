"""The shipped toy models reach their bars on fresh seeds, their cards tell the truth, and the registry works."""
import subprocess
import sys

import pytest
import torch

import fiberbench as fb
from fiberbench.errors import ConfigError
from fiberbench.toy import cards as M
from fiberbench.toy.evaluate import NOISY_LEVEL, eval_classifier, eval_oracle, residual_noise
from fiberbench.training.evaluate import eval_clip, eval_prior, measure

FRESH = 777  # evaluation seed of these tests: neither the training seeds (>= 10**6) nor the cards' (12345)


def _needs(name):
    if name not in M.available():
        pytest.fail(f"toy model {name} is not shipped in data/models")


FOUNDATION = ["prior-fm", "prior-ddpm", "shape-resnet", "color-vit", "oracle", "clip"]


def test_every_toy_model_is_shipped_with_card_and_safetensors():
    for name in FOUNDATION:
        _needs(name)
        card = M.read_card(name)
        for key in ("name", "spec", "kind", "architecture", "training", "metrics", "parameters"):
            assert key in card, (name, key)
        assert card["training"]["seconds"] > 0 and "seed" in card["training"]
        from safetensors import safe_open

        with safe_open(str(M.weights_path(name)), framework="pt") as fh:  # a safetensors file, no pickle
            assert len(list(fh.keys())) > 0
    total = sum(M.weights_path(n).stat().st_size + M.card_path(n).stat().st_size for n in M.available())
    assert total <= 40 * 2 ** 20, f"data/models is {total / 2 ** 20:.1f} MB"


def test_priors_are_about_a_million_parameters():
    for name in ("prior-fm", "prior-ddpm"):
        assert 0.8e6 < M.read_card(name)["parameters"] < 1.5e6


def test_oracle_bar(oracle):
    m = eval_oracle(oracle, n=600, seed=FRESH, n_junk=400)
    for f in ("shape", "color", "background", "mirror"):
        assert m[f"acc_{f}"] >= 0.98, m
    for f in ("size", "x", "y"):
        assert m[f"r2_{f}"] >= 0.95, m
    assert m["valid_junk"] <= 0.05 and m["valid_clean"] >= 0.98


def test_shape_resnet_bar_and_built_in_invariances(shape_resnet):
    m = eval_classifier(shape_resnet, "shape", n=600, seed=FRESH)
    assert m["acc_shape"] >= 0.98
    # logits barely move when only colour / mirror / background change, and move when the shape changes
    # (1.0 = as much as an independent render)
    assert m["logit_change_color"] < 0.1 and m["logit_change_mirror"] < 0.1 and m["logit_change_background"] < 0.15
    assert m["logit_change_shape"] > 0.8


def test_color_vit_bar_and_built_in_invariances(color_vit):
    m = eval_classifier(color_vit, "color", n=600, seed=FRESH)
    assert m["acc_color"] >= 0.98
    assert m["logit_change_shape"] < 0.15 and m["logit_change_mirror"] < 0.1 and m["logit_change_x"] < 0.15
    assert m["logit_change_color"] > 0.8


def test_clip_zero_shot_bar():
    m = eval_clip(fb.load_clip("toy/clip"), n=600, seed=FRESH)
    for g in ("shape", "color", "background"):
        assert m[f"zeroshot_{g}"] >= 0.90, m


# prior-fm reached its bar on 2026-11-30 (12.5k steps, sampled with shift 3: valid 0.938 and tv_max 0.095 on
# 2048 samples). prior-ddpm reached it the same day (2000 steps from prior-fm's weights, epsilon MSE weighted by
# clip(1/SNR, 1, 50), sampled with its card's sampler: valid 0.930, tv_max 0.093 = size). The earlier network (7.5k
# steps of plain epsilon MSE) stayed at size TV 0.116 however long it trained (docs/performance.md).
PRIORS = ["prior-fm", "prior-ddpm"]


def test_residual_noise_tells_grain_from_clean_renders():
    """Clean renders (flat colours, anti-aliased edges) stay far below NOISY_LEVEL; grain a sampler left is above."""
    x = fb.toy.render(fb.toy.sample_factors(256, FRESH))
    clean = residual_noise(x)
    assert clean.shape == (256,) and float(clean.max()) < NOISY_LEVEL / 4  # measured max 0.0032 on 512 renders
    grainy = residual_noise((x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    assert float(grainy.min()) > NOISY_LEVEL


@pytest.mark.parametrize("name", ["prior-fm", "prior-ddpm"])
def test_prior_validity_quick(name, oracle):
    # prior-ddpm: 1024 samples, as its TVs (card: background 0.057, size 0.093 on 2048) are checked against the
    # bar's 0.10, and at 384 samples the TV noise floor is 0.086 (at 1024: 0.049). Measured here (seed 777, 1024):
    # valid 0.932, noisy 0.045, background 0.076, size 0.086, tv_max 0.086.
    m = eval_prior(fb.load_prior(f"toy/{name}"), oracle, n=1024 if name == "prior-ddpm" else 192, steps=20,
                   seed=FRESH)
    assert m["valid"] >= 0.90, m
    assert m["noisy"] <= 0.05, m  # prior-ddpm with x0 limited to [-3, 3] instead of [-2, 2]: 0.07 grainy (seed 777)
    # the full marginal bar; the card's sampler keeps the background (0.25 with the trailing grid)
    if name == "prior-ddpm":
        assert m["tv_max"] <= 0.10, m


def test_prior_eval_samples_with_the_cards_sampler(oracle, monkeypatch):
    """eval_prior draws with the card's sampling section (the DDPM card's sampler), plain eta 0 without one."""
    import fiberbench.sampling as S
    import fiberbench.training.evaluate as E

    seen, real = [], S.sample_fiber

    def spy(*args, **kw):
        seen.append({k: kw[k] for k in S.UNGUIDED_DEFAULTS if k in kw})
        return real(*args, **kw)

    monkeypatch.setattr(E, "sample_fiber", spy)
    prior = fb.load_prior("toy/prior-ddpm")
    card_sampling = M.read_card("prior-ddpm")["sampling"]
    assert card_sampling == {"eta": 1.0, "deterministic_above_tau": 925.0, "grid_shift": 3.0,
                             "unclamped_tau": [250.0, 995.0], "unclamped_limit": 2.0}
    a = eval_prior(prior, oracle, n=8, steps=3, seed=FRESH)
    prior.card = {k: v for k, v in prior.card.items() if k != "sampling"}
    b = eval_prior(prior, oracle, n=8, steps=3, seed=FRESH)
    assert seen == [card_sampling, {}]
    assert a["eval"]["sampler"].startswith("unguided, eta=1.0, deterministic_above_tau=925.0")
    assert b["eval"]["sampler"] == "unguided, eta=0 (DDIM / Euler)"


@pytest.mark.slow
@pytest.mark.parametrize("name", PRIORS)
def test_prior_full_bar(name, oracle):
    m = eval_prior(fb.load_prior(f"toy/{name}"), oracle, steps=20, seed=FRESH)  # 2048 samples
    assert m["valid"] >= 0.90 and m["tv_max"] <= 0.10, m


@pytest.mark.parametrize("name", ["oracle", "shape-resnet", "color-vit", "clip",
                                  pytest.param("prior-fm", marks=pytest.mark.slow),
                                  pytest.param("prior-ddpm", marks=pytest.mark.slow)])
def test_card_metrics_match_a_remeasurement(name):
    """Re-measure with the card's settings (priors: 2048 samples, ~7 min each on 2 cores, hence slow)."""
    card = M.read_card(name)
    again = measure(name)
    for key, value in card["metrics"].items():
        if isinstance(value, float) and not key.startswith("seconds"):
            assert abs(again[key] - value) <= 0.01, (name, key, value, again[key])


def test_loading_api_and_layers():
    f = fb.load_extractor("toy/shape-resnet")
    assert f.layer == "logits" and f.classes == ["circle", "square", "triangle", "arrow"]
    x = fb.toy.render(fb.toy.sample_factors(4, 1))
    assert fb.load_extractor("toy/shape-resnet@logits")(x).shape == (4, 4)
    pre = fb.load_extractor("toy/shape-resnet@pre_logits")(x)
    head = f.classifier()
    assert torch.allclose(head(pre), f(x), atol=1e-5)
    assert fb.load_extractor("toy/color-vit@logits")(x).shape == (4, 6)
    block = fb.load_extractor("toy/shape-resnet@layer2")(x)
    assert block.ndim == 2 and block.shape[0] == 4
    pred = fb.toy.load_oracle().predict(x)
    for col in ("shape", "shape_conf", "color", "color_conf", "background", "mirror", "size", "x", "y", "valid"):
        assert col in pred.columns


def test_unknown_specs_list_what_exists():
    with pytest.raises(ConfigError, match="toy/shape-resnet"):
        fb.load_extractor("toy/shape-resnt")
    with pytest.raises(ConfigError, match="prior-fm"):
        fb.load_prior("toy/prior-fn")
    with pytest.raises(ConfigError, match="layer 'layer9' not found.*valid"):
        fb.load_extractor("toy/shape-resnet@layer9")
    with pytest.raises(ConfigError, match="unknown model source"):
        fb.load_extractor("timmm/resnet50")


def test_list_models_cli():
    out = subprocess.run([sys.executable, "-m", "fiberbench.cli", "list-models"], capture_output=True, text=True,
                         check=True).stdout.split()
    for spec in ("toy/prior-fm", "toy/prior-ddpm", "toy/shape-resnet@logits", "toy/shape-resnet@pre_logits",
                 "toy/color-vit", "toy/clip", "toy/oracle"):
        assert spec in out
    assert out.index("toy/prior-fm") < len(out)
    assert fb.list_models("toy/*", kind="prior") == ["toy/prior-fm", "toy/prior-ddpm"]


def test_ddpm_loss_low_frequency_term():
    """lowfreq_weight adds the 8x8-pooled error weighted as an x0 loss (1/SNR, capped): a constant error
    counts in full, an error that averages to zero in every 8x8 block not at all; the plain loss is MSE."""
    from fiberbench.training.priors import LOWFREQ_SNR_CAP, ddpm_loss

    eps = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    abar = torch.tensor([0.5, 1e-4])  # 1/SNR = 1 and 9999 (capped)
    const = eps + 0.1
    checker = eps + 0.1 * (torch.arange(32).view(1, 32) + torch.arange(32).view(32, 1)).remainder(2).mul(2).sub(1)
    w = torch.tensor([1.0, LOWFREQ_SNR_CAP])
    assert torch.isclose(ddpm_loss(const, eps, abar), torch.tensor(0.01))
    assert torch.isclose(ddpm_loss(const, eps, abar, lowfreq_weight=0.05), 0.01 + 0.05 * (w * 0.01).mean())
    assert torch.isclose(ddpm_loss(checker, eps, abar, lowfreq_weight=0.05), torch.tensor(0.01))
    # snr weighting: clip(1/SNR, 1, max) per sample
    assert torch.isclose(ddpm_loss(const, eps, abar, snr_weight_max=10.0), torch.tensor((0.01 + 0.1) / 2))


def test_train_prior_resume_gets_its_own_time_budget(tmp_path):
    """minutes is the budget of this run: a resumed run whose card already records more seconds still trains."""
    from fiberbench.training import train_prior

    train_prior("fm", max_steps=1, batch=4, root=tmp_path, bf16=False, log=lambda s: None)
    card = M.read_card("prior-fm", tmp_path)
    card["training"]["seconds"] = 1e5
    M.write_card("prior-fm", card, tmp_path)
    again = train_prior("fm", minutes=0.02, batch=4, root=tmp_path, resume=True, bf16=False, log=lambda s: None)
    assert again["training"]["steps"] > 1 and again["training"]["seconds"] > 1e5


def test_train_prior_high_noise_emphasis(tmp_path, monkeypatch):
    """DDPM high-noise emphasis: the first high_noise * batch timesteps come from t >= 0.9 T; every run's
    settings are in the card; the flow prior and a fraction outside [0, 1] are refused."""
    from diffusers import UNet2DModel

    from fiberbench.training import train_prior

    seen = []
    forward = UNet2DModel.forward

    def spy(self, sample, timestep, *a, **k):
        seen.append(torch.as_tensor(timestep).clone())
        return forward(self, sample, timestep, *a, **k)

    monkeypatch.setattr(UNet2DModel, "forward", spy)
    card = train_prior("ddpm", max_steps=2, batch=16, root=tmp_path, high_noise=0.5, snr_weight_max=10.0,
                       lowfreq_weight=0.05, bf16=False, log=lambda s: None)
    assert len(seen) == 2
    for t in seen:
        assert bool((t[:8] >= 900).all()) and t.shape == (16,)
    # the uniform half reaches below 900 somewhere in 2 x 8 draws (probability 1 - 0.1^16)
    assert bool((torch.cat([t[8:] for t in seen]) < 900).any())
    assert card["training"]["objective"].startswith("DDPM epsilon MSE, weighted by clip(1/SNR, 1, snr_weight_max)")
    assert card["training"]["runs"] == [{"lr": 2e-3, "warmup": 200, "bf16": False, "high_noise": 0.5,
                                         "snr_weight_max": 10.0, "lowfreq_weight": 0.05}]
    resumed = train_prior("ddpm", max_steps=3, batch=16, root=tmp_path, resume=True, lr=3e-4, warmup=10,
                          bf16=False, log=lambda s: None)
    assert resumed["training"]["runs"][1] == {"lr": 3e-4, "warmup": 10, "bf16": False, "high_noise": 0.0,
                                              "snr_weight_max": None, "start_step": 2}
    with pytest.raises(ConfigError, match="DDPM prior only"):
        train_prior("fm", max_steps=1, root=tmp_path, high_noise=0.5)
    with pytest.raises(ConfigError, match="DDPM prior only"):
        train_prior("fm", max_steps=1, root=tmp_path, lowfreq_weight=0.05)
    with pytest.raises(ConfigError, match=r"high_noise must be a fraction in \[0, 1\], got 1.5"):
        train_prior("ddpm", max_steps=1, root=tmp_path, high_noise=1.5)
    with pytest.raises(ConfigError, match=r"lowfreq_weight must be >= 0, got -0.1"):
        train_prior("ddpm", max_steps=1, root=tmp_path, lowfreq_weight=-0.1)


@pytest.mark.parametrize("name", ["prior-fm", "prior-ddpm"])
def test_prior_recipe_replays_the_runs_in_the_shipped_card(name):
    """train-toy replays each prior's recorded runs: run ends = the card's resume points and final step,
    learning rates = its lr_by_run, and the DDPM prior starts from the model its card names."""
    from fiberbench.training import PRIOR_RECIPES

    card = M.read_card(name)
    t = card["training"]
    runs = PRIOR_RECIPES[name]
    assert [r["until"] for r in runs] == list(t["resumed_at_steps"]) + [t["steps"]]
    assert [r["lr"] for r in runs] == t["lr_by_run"]
    assert runs[0].get("init_from") == (card.get("initialised_from") or {}).get("model")
    assert all("init_from" not in r for r in runs[1:])
    assert ("weighted by clip(1/SNR" in t["objective"]) == any(r.get("snr_weight_max") for r in runs)
    for recorded, run in zip(t.get("runs", []), runs):  # prior-ddpm's card keeps each run's settings
        assert recorded["warmup"] == run["warmup"] and recorded["snr_weight_max"] == run.get("snr_weight_max")


def test_train_prior_recipe_quick_runs_the_sequence(tmp_path):
    """A quick replay (2 steps per run) resumes at each run's end, and the DDPM prior starts from the flow
    prior in the same folder; without it, the error names what to train first."""
    from fiberbench.training import PRIOR_RECIPES, train_prior_recipe

    with pytest.raises(ConfigError, match="prior-ddpm starts from prior-fm, which is not in .*: train prior-fm first"):
        train_prior_recipe("prior-ddpm", root=tmp_path, quick=True, log=lambda s: None)
    fm = train_prior_recipe("prior-fm", root=tmp_path, quick=True, log=lambda s: None)
    n = len(PRIOR_RECIPES["prior-fm"])
    assert fm["training"]["steps"] == 2 * n
    assert fm["training"]["resumed_at_steps"] == [2 * i for i in range(1, n)]
    assert fm["training"]["lr_by_run"] == [r["lr"] for r in PRIOR_RECIPES["prior-fm"]]
    assert [r["warmup"] for r in fm["training"]["runs"]] == [r["warmup"] for r in PRIOR_RECIPES["prior-fm"]]
    ddpm = train_prior_recipe("prior-ddpm", root=tmp_path, quick=True, log=lambda s: None)
    assert ddpm["initialised_from"] == {"model": "prior-fm", "steps": 2 * n, "seconds": fm["training"]["seconds"]}
    assert ddpm["training"]["steps"] == 2 * len(PRIOR_RECIPES["prior-ddpm"])


def test_train_loop_stops_at_the_stop_file_and_saves_the_ema(tmp_path):
    """The one training loop: ``<root>/<name>.stop`` ends a run at the next multiple of 25 steps (and is removed);
    weights and card are saved every ``save_every`` steps and at the end, the EMA's weights when there is one."""
    from safetensors.torch import load_file

    from fiberbench.training.loop import TrainLoop

    net = torch.nn.Linear(2, 1)
    saved = []
    loop = TrainLoop("tiny", net, lr=1e-2, schedule="warmup", warmup=10, ema_decay=0.9, minutes=5.0, save_every=20,
                     root=tmp_path, log=lambda s: None)

    def step_fn(step):
        if step == 30:
            (tmp_path / "tiny.stop").touch()
        return net(torch.ones(4, 2)).pow(2).mean(), {"step": float(step)}

    def training(lp, final):
        saved.append((lp.step, final))
        return {"steps": lp.step, "finished": final, "last_step": lp.recent("step", 1)}

    card = loop.run(step_fn, {"name": "tiny"}, training)
    assert saved == [(20, False), (40, False), (50, True)]
    assert card["training"] == {"steps": 50, "finished": True, "last_step": 49.0} and card["parameters"] == 3
    assert M.read_card("tiny", tmp_path) == card and not (tmp_path / "tiny.stop").exists()
    weights = load_file(str(M.weights_path("tiny", tmp_path)))
    assert torch.equal(weights["weight"], loop.ema.shadow.weight) and not torch.equal(weights["weight"], net.weight)
