"""ModalPrompt's inputs as the reference code computes them (no Ray): the guide's pooled text
feature (transformers' CLIPTextModel.pooler_output, no projection), QuickGELU for OpenAI CLIP
weights, LLaVA-1.5's pad-to-square images with the processor's mean colour, and per-task
training settings with transformers' warm-up schedules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.models import build_guide
from pipeline.models.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Text guidance
# ---------------------------------------------------------------------------------------------
def _hf_text_model(clip) -> "torch.nn.Module":
    """transformers' CLIPTextModel holding the weights of open_clip ``clip``'s text tower."""
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = clip.transformer.resblocks
    width = clip.ln_final.normalized_shape[0]
    config = CLIPTextConfig(
        vocab_size=clip.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=clip.positional_embedding.shape[0],
        hidden_act="gelu", layer_norm_eps=clip.ln_final.eps, eos_token_id=2,  # 2: pool at argmax(ids), as CLIP
    )
    hf = CLIPTextModel(config).eval()
    state = {"embeddings.token_embedding.weight": clip.token_embedding.weight,
             "embeddings.position_embedding.weight": clip.positional_embedding,
             "final_layer_norm.weight": clip.ln_final.weight,
             "final_layer_norm.bias": clip.ln_final.bias}
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[p + f"self_attn.{name}.weight"] = b.attn.in_proj_weight[j * width:(j + 1) * width]
            state[p + f"self_attn.{name}.bias"] = b.attn.in_proj_bias[j * width:(j + 1) * width]
        pairs = {"self_attn.out_proj": b.attn.out_proj, "layer_norm1": b.ln_1, "layer_norm2": b.ln_2,
                 "mlp.fc1": b.mlp.c_fc, "mlp.fc2": b.mlp.c_proj}
        for name, mod in pairs.items():
            state[p + name + ".weight"], state[p + name + ".bias"] = mod.weight, mod.bias
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    return hf


def _random_guide(text_feature: str):
    torch.manual_seed(0)
    guide = build_guide(ModelConfig(guide_text_feature=text_feature))
    for p in guide.model.parameters():  # non-trivial layer norms and biases too
        p.data.normal_(0.0, 0.2)
    return guide


def test_pooled_text_feature_is_clip_text_models_pooler_output():
    guide = _random_guide("pooled")
    ids = guide.tokenize(["What is the color of the bus?", "Answer with the option's letter.", "a"])
    ours = guide.encode_text(ids)
    with torch.no_grad():
        ref = _hf_text_model(guide.model)(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ours.shape == (3, guide.dim)


def test_projected_text_feature_is_the_pooled_one_times_the_text_projection():
    pooled, projected = _random_guide("pooled"), _random_guide("projected")
    ids = pooled.tokenize(["How many dogs are there?", "Which book is this?"])
    a, b = pooled.encode_text(ids), projected.encode_text(ids)
    torch.testing.assert_close(b, a @ projected.model.text_projection, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, b)


def test_pooled_text_needs_a_text_width_equal_to_the_image_embedding():
    with pytest.raises(ValueError, match="text tower's width 64 differs from the image embedding's 32"):
        build_guide(ModelConfig(tiny=_spec(guide_embed_dim=32)))
    build_guide(ModelConfig(tiny=_spec(guide_embed_dim=32), guide_text_feature="projected"))


def _spec(**kw):
    from pipeline.models.config import TinySpec

    return TinySpec(**kw)


def test_openai_clip_archs_get_quick_gelu_and_the_tiny_guide_does_not():
    from open_clip.transformer import QuickGELU

    big = ModelConfig(kind="llava_hf", arch="llava-1.5-7b", guide_arch="ViT-L-14-336", image_size=336)
    assert big.quick_gelu and not ModelConfig().quick_gelu
    assert not ModelConfig(kind="llava_hf", arch="llava-1.5-7b", guide_arch="ViT-L-14-336", image_size=336,
                           guide_quick_gelu=False).quick_gelu
    acts = {type(m) for m in build_guide(big, meta=True).model.modules()}
    assert QuickGELU in acts
    assert QuickGELU not in {type(m) for m in build_guide(ModelConfig()).model.modules()}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def _write_image(path, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


@pytest.mark.parametrize("w, h", [(40, 24), (23, 50), (30, 30)])
def test_pad_to_square_is_llava_image_processors(tmp_path, w, h):
    from transformers.models.llava.image_processing_llava import LlavaImageProcessor

    from pipeline.data.coin import expand_to_square
    from pipeline.models.guide import CLIP_MEAN

    arr = _write_image(tmp_path / "x.png", w, h)
    color = tuple(int(x * 255) for x in CLIP_MEAN)
    ours = np.asarray(expand_to_square(Image.fromarray(arr), color))
    ref = LlavaImageProcessor().pad_to_square(torch.from_numpy(arr).permute(2, 0, 1), background_color=color)
    np.testing.assert_array_equal(ours, ref.permute(1, 2, 0).numpy())
    assert ours.shape == (max(w, h), max(w, h), 3)


def test_decoded_images_are_padded_with_the_checkpoints_mean_colour(tmp_path):
    import fsspec

    from pipeline.data.coin import decode_image
    from pipeline.models.build import image_pad_color

    _write_image(tmp_path / "wide.png", 64, 16)
    fs = fsspec.filesystem("file")
    padded = decode_image(fs, str(tmp_path / "wide.png"), 32, (10, 20, 30))
    stretched = decode_image(fs, str(tmp_path / "wide.png"), 32)
    assert padded.shape == stretched.shape == (32, 32, 3)
    # 64x16 centred on 64x64: rows 0-23 and 40-63 are padding, rows 0-11 / 20-31 after resizing
    # (bicubic blends two rows either side of the image's edge)
    assert (padded[:10] == (10, 20, 30)).all() and (padded[22:] == (10, 20, 30)).all()
    assert not (padded[12:20] == (10, 20, 30)).all(axis=-1).any()
    assert not (stretched == (10, 20, 30)).all(axis=-1).any()

    folder = tmp_path / "llava"
    folder.mkdir()
    llava = ModelConfig(kind="llava_hf", path=str(folder), guide_arch="tiny")
    assert image_pad_color(llava) == (122, 116, 104)  # no preprocessor config: CLIP's mean
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.25, 1.0]}))
    assert image_pad_color(llava) == (127, 63, 255)
    assert image_pad_color(ModelConfig()) is None  # the tiny base was trained on stretched images
    assert image_pad_color(ModelConfig(image_aspect="pad")) == (122, 116, 104)
    assert image_pad_color(ModelConfig(kind="llava_hf", path=str(folder), image_aspect="stretch")) is None


# ---------------------------------------------------------------------------------------------
# Per-task training settings
# ---------------------------------------------------------------------------------------------
def test_per_task_settings_override_the_global_ones():
    cfg = load_config(None, ["train.per_task={GQA: {batch_size: 4, grad_accum: 2, epochs: 2, lr: 1e-3, "
                             "lr_schedule: cosine, warmup_ratio: 0.03}}", "train.weight_decay=0.1"])
    gqa, sqa = cfg.stage_train("GQA"), cfg.stage_train("ScienceQA")
    assert (gqa.batch_size, gqa.grad_accum, gqa.epochs, gqa.lr, gqa.lr_schedule, gqa.warmup_ratio) == (
        4, 2, 2.0, 1e-3, "cosine", 0.03)
    assert gqa.weight_decay == 0.1  # not set per task: the global value
    # not set per task: the global values, lr the method's own (ModalPrompt's 0.01 over train.lr)
    assert (sqa.batch_size, sqa.epochs, sqa.lr, sqa.lr_schedule) == (16, 3.0, 0.01, "constant")
    assert cfg.stage_train(None) == sqa  # a joint stage: the global settings


@pytest.mark.parametrize("override, message", [
    ("train.per_task={Nope: {lr: 1}}", r"train.per_task.Nope: 'Nope' is not one of the run's tasks"),
    ("train.per_task={GQA: {batchsize: 4}}", r"train.per_task.GQA.batchsize: unknown key"),
    ("train.per_task={GQA: {batch_size: 0}}", r"train.per_task.GQA.batch_size: must be >= 1"),
    ("train.per_task={GQA: {lr_schedule: step}}", r"train.per_task.GQA.lr_schedule: 'step' is not one of"),
    ("train.warmup_ratio=1.5", r"train.warmup_ratio: must be in \[0, 1\)"),
])
def test_bad_per_task_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _lrs(settings, total_steps: int, start: int = 0) -> list[float]:
    from stages.train import lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=settings.lr)
    build = lr_schedule(settings, total_steps, start)
    if build is None:
        return [settings.lr] * math.ceil((total_steps - start) / settings.grad_accum)
    sched = build(opt)
    out = []
    for _ in range(math.ceil(total_steps / settings.grad_accum) - start // settings.grad_accum):
        out.append(opt.param_groups[0]["lr"])  # the rate this optimizer step uses
        opt.step()
        sched.step()
    return out


def test_warm_up_then_cosine_over_the_stages_optimizer_steps():
    cfg = load_config(None, ["train.per_task={GQA: {grad_accum: 2, lr: 1.0, lr_schedule: cosine, warmup_ratio: 0.1}}"])
    s = cfg.stage_train("GQA")
    lrs = _lrs(s, total_steps=40)  # 40 micro-batches, accumulation 2: 20 optimizer steps, ceil(2.0) warm-up
    assert len(lrs) == 20 and s.warmup_for(20) == 2
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[3:] == pytest.approx([0.5 * (1 + math.cos(math.pi * (k - 2) / 18)) for k in range(3, 20)])
    # a stage resumed at micro-step 10 continues the schedule where it stopped
    assert _lrs(s, total_steps=40, start=10) == pytest.approx(lrs[5:])
    # no warm-up and a constant rate: no scheduler at all (DeepSpeed keeps the optimizer's rate)
    from stages.train import lr_schedule

    assert lr_schedule(cfg.stage_train("ScienceQA"), 40) is None


def test_log_warm_up_is_deepspeeds_warmup_lr():
    """The reference's DeepSpeed JSON scheduler: WarmupLR, log-rate warm-up, then constant. The rate
    of optimizer step n is lr * log(n - 1) / log(W) over W warm-up steps (DeepSpeed's own class
    through its own step order: the first two steps run at 0), then lr."""
    cfg = load_config(None, ["train.per_task={GQA: {lr: 1.0, warmup_steps: 5, warmup_type: log}}"])
    lrs = _lrs(cfg.stage_train("GQA"), total_steps=10)
    assert lrs == pytest.approx([0.0, 0.0] + [math.log(k) / math.log(5) for k in (2, 3, 4)] + [1.0] * 5)
    assert _lrs(cfg.stage_train("GQA"), total_steps=10, start=4) == pytest.approx(lrs[4:])
    with pytest.raises(ConfigError, match=r"train.per_task.GQA.warmup_type: 'log' .* not 'cosine'"):
        load_config(None, ["train.per_task={GQA: {warmup_type: log, lr_schedule: cosine}}"])


def test_the_7b_config_carries_the_reference_per_task_schedule():
    """scripts/ModalPrompt/Train/*.sh: 10 epochs, 2e-4, 3% warm-up (DeepSpeed's WarmupLR, which its
    JSON config imposes over --lr_scheduler_type), no weight decay, 4 GPUs x per-device
    32/32/64/24/64/16/24/48; the config's 8 workers keep those global batches."""
    from pipeline.config import CONFIG_DIR

    cfg = load_config(CONFIG_DIR / "coin_llava7b_modalprompt.yaml")
    reference = {"ScienceQA": 32, "TextVQA": 32, "ImageNet": 64, "GQA": 24, "VizWiz": 64, "Grounding": 16,
                 "VQAv2": 24, "OCRVQA": 48}
    assert set(cfg.train.per_task) == set(cfg.tasks) == set(reference)
    for task, per_device in reference.items():
        s = cfg.stage_train(task)
        assert s.batch_size * s.grad_accum * cfg.train.num_workers == 4 * per_device, task
        assert (s.epochs, s.lr, s.lr_schedule, s.warmup_ratio, s.warmup_type, s.weight_decay) == (
            10, 2e-4, "constant", 0.03, "log", 0.0)
    assert cfg.model.pads_images and cfg.model.quick_gelu and cfg.model.guide_text_feature == "pooled"
    assert cfg.method.options["prompt_init"] == "vocab"
