"""The base the project ships (pipeline/assets/coin-synth-base): its files, how the default loads
it, and whether it is stale against the current generator and recipe."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config, merge
from pipeline.data.synth import GENERATOR_VERSION, SynthSpec, benchmark_texts, generate_benchmark
from pipeline.models.pretrain import PRETRAIN_VERSION
from pipeline.models.shipped import (GUIDE_DIR, LLAVA_DIR, RECIPE_CONFIG, SHIPPED_BASE, SIZE_LIMIT_MB,
                                     corpus_spec, probe_digest, read_metadata, verify_files)
from tests import helpers

META = read_metadata(SHIPPED_BASE)
STALE = ("The shipped base is stale: rebuild it with `python pipeline/main.py pretrain` "
         "(about 40 minutes on 2 cores) and commit pipeline/assets/coin-synth-base")


def recipe_config():
    return load_config(None, yaml.safe_load(RECIPE_CONFIG.read_text()))


def test_shipped_files_are_the_ones_the_metadata_lists_and_fit_the_size_limit():
    assert verify_files(SHIPPED_BASE) == []
    size = sum((SHIPPED_BASE / f).stat().st_size for f in META["files"]) / 2**20
    assert size <= SIZE_LIMIT_MB, size
    for key in ("command", "recipe_version", "corpus", "seed", "lmm", "guide", "pretrain_wall_s", "zero_shot"):
        assert key in META, key
    assert META["lmm"]["final_loss"] < META["lmm"]["first_loss"] / 4  # it did learn
    assert set(META["zero_shot"]["scores"]) == set(load_config().tasks)


def test_the_shipped_base_matches_the_current_recipe_and_generator(tmp_path):
    cfg = recipe_config()
    assert META["recipe_version"] == PRETRAIN_VERSION, STALE
    assert META["generator_version"] == GENERATOR_VERSION, STALE
    recipe = {k: v for k, v in dataclasses.asdict(cfg.model.pretrain).items() if k not in ("log_every", "stop_after")}
    shipped = {k: v for k, v in META["recipe"].items() if k not in ("log_every", "stop_after")}
    assert shipped == recipe, STALE
    assert META["model"]["tiny"] == dataclasses.asdict(cfg.model.tiny), STALE
    assert META["model"]["image_size"] == cfg.model.image_size, STALE
    spec = corpus_spec(cfg)
    assert META["corpus"]["spec"] == json.loads(json.dumps(dataclasses.asdict(spec))), STALE
    # the generator: the first records of every corpus stream, generated now
    assert probe_digest(spec, tmp_path) == META["corpus"]["probe_sha256"], STALE


def test_the_default_loads_the_shipped_base_as_a_llava_hf_checkpoint():
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from pipeline.models import build_guide, build_lmm

    cfg = load_config()
    assert cfg.model.kind == "llava_hf" and cfg.model.image_size == META["model"]["image_size"]
    lmm, guide = build_lmm(cfg.model), build_guide(cfg.model)
    # transformers' own Auto classes read the folder as they read llava-hf/llava-1.5-7b-hf
    folder = SHIPPED_BASE / LLAVA_DIR
    hf = LlavaForConditionalGeneration.from_pretrained(str(folder))
    assert AutoTokenizer.from_pretrained(str(folder)).get_vocab() == lmm.tokenizer.get_vocab()
    assert AutoImageProcessor.from_pretrained(str(folder)).crop_size["height"] == cfg.model.image_size
    for (name, a), (_, b) in zip(hf.state_dict().items(), lmm.model.state_dict().items()):
        assert torch.equal(a, b), name
    # open_clip's own loader reads the guide folder, and gives the guide's embeddings
    import open_clip

    clip = open_clip.create_model(f"local-dir:{SHIPPED_BASE / GUIDE_DIR}").eval()
    images = np.random.default_rng(0).integers(0, 256, (2, cfg.model.image_size, cfg.model.image_size, 3), np.uint8)
    pixels = guide.pixels(images)
    with torch.no_grad():
        assert torch.allclose(clip.encode_image(pixels), guide.encode_image(pixels), atol=1e-5)


def test_the_shipped_tokenizer_covers_every_text_of_the_benchmark(tmp_path):
    from pipeline.models import build_lmm

    cfg = load_config()
    tok = build_lmm(cfg.model).tokenizer
    root = tmp_path / "bench"
    generate_benchmark(root, SynthSpec(image_size=cfg.model.image_size, seed=7, train_per_task=40, test_per_task=40,
                                       pretrain_records=0, pretrain_skill_per_task=0))
    unk = tok.unk_token_id
    missing = {t for t in benchmark_texts(root) if unk in tok(t)["input_ids"]}
    assert not missing, sorted(missing)[:5]
    assert all(tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t for t in list(benchmark_texts(root))[:500])


@pytest.mark.slow
def test_the_shortened_recipe_runs_end_to_end_and_replays_the_shipped_first_steps(tmp_path):
    """`pretrain` with every phase stopped after 5 steps (the schedule unchanged): the exported
    folders load, the zero-shot run is recorded, and the first losses are the shipped base's,
    so the recipe code has not changed since the base was built."""
    out = tmp_path / "base"
    cmd = [sys.executable, "pipeline/main.py", "pretrain", "--output", str(out), f"cache_dir={tmp_path / 'cache'}",
           "model.pretrain.stop_after=5"]
    proc = subprocess.run(cmd, cwd=helpers.ROOT, env=helpers.pipeline_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = read_metadata(out)
    assert verify_files(out) == []
    assert meta["corpus"]["sha256"] == META["corpus"]["sha256"], STALE
    for phase in ("lmm", "guide"):
        assert meta[phase]["steps_run"] == 5
        np.testing.assert_allclose(meta[phase]["first_losses"], META[phase]["first_losses"], rtol=1e-3,
                                   err_msg=f"{phase}: {STALE}")
    assert set(meta["zero_shot"]["scores"]) == set(META["zero_shot"]["scores"])
    # the new folder is a base the pipeline can load the way the default loads the shipped one
    from pipeline.models import build_lmm
    from pipeline.models.config import ModelConfig
    from pipeline.models.shipped import shipped_model_overrides

    cfg = ModelConfig.from_dict(merge(load_config().model.to_dict(), shipped_model_overrides(out)))
    assert build_lmm(cfg).model.config.vision_config.image_size == meta["model"]["image_size"]
    assert "base written to" in proc.stdout and "zero-shot:" in proc.stdout
