"""GPU check: the GPU path end to end in under 10 minutes on one CUDA machine.

A LLaVA-1.5-architecture model with real widths and fewer layers (CLIP ViT-L/14-336 vision tower
of width 1024, 576 image tokens, the 2-layer GELU projector, a Llama language model of width
4096), a ViT-L/14-336-shaped open_clip guide, random weights stored in bf16 in the llava-hf and
open_clip folder layouts, loaded by the pipeline exactly as LLaVA-1.5-7B is. Then, through
``python pipeline/main.py`` (Ray Train + DeepSpeed, bf16, Ray Data, the inference actors): a few
steps of ModalPrompt and LoRA under ZeRO-2 and ZeRO-3 on two CoIN-synth tasks at 336 px, batched
evaluation; and the evaluation-throughput benchmark on the same model. Prints peak GPU memory,
step time and evaluation throughput; exits non-zero on any error.

    python benchmarks/gpu_check.py [--out DIR] [--lm-layers 2] [--vision-layers 4]
    python benchmarks/gpu_check.py --smoke    # the same path on a CPU with small widths (the test)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SHIPPED = _common.ROOT / "pipeline" / "assets" / "coin-synth-base" / "llava"
RUNS = [("modalprompt", "zero2"), ("modalprompt", "zero3"), ("lora", "zero2"), ("lora", "zero3")]


def widths(args) -> dict:
    if args.smoke:  # small, for a CPU: the code path, not the numbers
        return dict(image=64, patch=8, v_hidden=64, v_inter=256, v_heads=4, v_layers=2, lm_hidden=128,
                    lm_inter=256, lm_heads=4, lm_layers=2, g_embed=64, g_vwidth=64, g_vlayers=2, g_vhead=16,
                    g_patch=8, g_twidth=64, g_theads=4, g_tlayers=2)
    return dict(image=336, patch=14, v_hidden=1024, v_inter=4096, v_heads=16, v_layers=args.vision_layers,
                lm_hidden=4096, lm_inter=11008, lm_heads=32, lm_layers=args.lm_layers, g_embed=768, g_vwidth=1024,
                g_vlayers=args.vision_layers, g_vhead=64, g_patch=14, g_twidth=768, g_theads=12,
                g_tlayers=args.vision_layers)


def build_base(out: Path, w: dict, dtype) -> tuple[Path, Path]:
    """Random-weight llava-hf and open_clip folders of the given widths (the shipped base's
    word-level tokenizer, which covers CoIN-synth)."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    llava = out / "llava"
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=w["v_hidden"], intermediate_size=w["v_inter"],
                                       num_hidden_layers=w["v_layers"], num_attention_heads=w["v_heads"],
                                       image_size=w["image"], patch_size=w["patch"], projection_dim=768,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=w["lm_hidden"], intermediate_size=w["lm_inter"],
                                num_hidden_layers=w["lm_layers"], num_attention_heads=w["lm_heads"],
                                num_key_value_heads=w["lm_heads"], max_position_embeddings=4096,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_seq_length=(w["image"] // w["patch"]) ** 2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.save_pretrained(str(llava))
    tok.save_pretrained(str(llava))
    CLIPImageProcessor(size={"shortest_edge": w["image"]}, crop_size={"height": w["image"], "width": w["image"]}
                       ).save_pretrained(str(llava))
    guide = out / "guide"
    guide.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": w["g_embed"], "quick_gelu": True,
                 "vision_cfg": {"image_size": w["image"], "layers": w["g_vlayers"], "width": w["g_vwidth"],
                                "head_width": w["g_vhead"], "patch_size": w["g_patch"]},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": w["g_twidth"],
                              "heads": w["g_theads"], "layers": w["g_tlayers"]}}
    clip = CLIP(**model_cfg)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in clip.state_dict().items()},
              str(guide / "open_clip_model.safetensors"))
    (guide / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                    "std": [0.26862954, 0.26130258, 0.27577711],
                                                    "interpolation": "bicubic", "resize_mode": "shortest"}}))
    n = sum(p.numel() for p in model.parameters())
    print(f"base: {n / 1e6:.0f}M parameters (LLM width {w['lm_hidden']} x {w['lm_layers']} layers, vision width "
          f"{w['v_hidden']} x {w['v_layers']} layers, {config.image_seq_length} image tokens), guide "
          f"{sum(p.numel() for p in clip.parameters()) / 1e6:.0f}M, stored in {dtype}", flush=True)
    return llava, guide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"/tmp/coin-gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--lm-layers", type=int, default=2)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="small widths on a CPU (no GPU needed)")
    ap.add_argument("--runs", default=",".join(f"{m}:{z}" for m, z in RUNS))
    args = ap.parse_args()
    _common.quiet()
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        sys.exit("gpu_check: no CUDA device (use --smoke to run the same path on a CPU with small widths)")
    print(f"# gpu check: {_common.machine()}", flush=True)
    t_start = time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    w = widths(args)
    dtype = torch.bfloat16 if gpu else torch.float32
    llava, guide = build_base(out / "base", w, dtype)
    common = [f"cache_dir={out / 'cache'}", "tasks=[ScienceQA,TextVQA]", "data.synth.train_per_task=32",
              "data.synth.test_per_task=32", "model.kind=llava_hf", f"model.path={llava}",
              f"model.guide_arch=local-dir:{guide}", f"model.image_size={w['image']}", "model.template=tiny",
              f"model.max_length={(w['image'] // w['patch']) ** 2 + 128}", "model.max_new_tokens=8",
              f"model.dtype={'bfloat16' if gpu else 'float32'}", f"train.max_steps={args.steps}", "train.batch_size=4",
              "train.log_every=1", "eval.batch_size=16"]
    if gpu:  # one GPU shared by the Train worker and the inference actor (resident side by side)
        common += ["train.gpus_per_worker=0.5", "eval.gpus_per_actor=0.5"]
    body, failed = [], []
    for spec in args.runs.split(","):
        method, zero = spec.split(":")
        run_dir = out / "runs" / f"{method}-{zero}"
        cmd = [sys.executable, str(_common.ROOT / "pipeline" / "main.py"), "--output", str(run_dir), "--method",
               method, *common, f"train.deepspeed=cluster/deepspeed/{zero}.json"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=_common.ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            failed.append(spec)
            print(f"FAILED {spec} ({proc.returncode}) after {wall:.0f} s:\n{proc.stderr[-4000:]}", flush=True)
            continue
        body.append([f"{method} {zero}", *numbers(run_dir), wall])
        print(f"  {method} {zero}: done in {wall:.0f} s", flush=True)
    print(_common.table(["run", "peak train mem GB", "step s", "peak eval mem GB", "eval samples/s", "run wall s"],
                        body))
    bench = subprocess.run([sys.executable, str(_common.ROOT / "benchmarks" / "eval_throughput.py"), "--per-task", "16",
                            "--rounds", "1", *common], cwd=_common.ROOT, capture_output=True, text=True)
    print(bench.stdout[-2500:] if bench.returncode == 0 else f"FAILED eval_throughput:\n{bench.stderr[-3000:]}")
    if bench.returncode != 0:
        failed.append("eval_throughput")
    print(f"gpu check: {'FAILED ' + ', '.join(failed) if failed else 'passed'} in {time.time() - t_start:.0f} s")
    sys.exit(1 if failed else 0)


def numbers(run_dir: Path) -> list[float]:
    """Peak memory, step time, evaluation throughput from the run's own stage records."""
    train = [json.loads(p.read_text())["result"] for p in sorted((run_dir / "stages").glob("*-train-*/DONE.json"))]
    evals = [json.loads(p.read_text())["result"] for p in sorted((run_dir / "stages").glob("*-eval-*/DONE.json"))]
    step = _common.median([t["train_loop_s"] / max(1, t["steps"]) for t in train])
    sps = sum(e["predictions"] for e in evals) / max(1e-9, sum(e["infer_loop_s"] for e in evals))
    return [max(t.get("peak_mem_gb", float("nan")) for t in train), step,
            max(e.get("peak_mem_gb", float("nan")) for e in evals), sps]


if __name__ == "__main__":
    main()
