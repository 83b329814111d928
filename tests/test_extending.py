"""The project extended without touching it: a method in one file outside the repository (through
the contract tests and a two-task pipeline), a user's own task (LLaVA-format files written here, a
registered scorer), a finished run extended by one more task, and the replay channel a method can
ask for. Local Ray, real Ray Train + DeepSpeed, a real MLflow store. The three pipeline runs are in
the slow tier (about 3 minutes on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ROOT, pipeline_env, run_pipeline, tiny_models, toy_rows

# A throw-away method: one learned bias on the input embeddings per task (the latest task's at test
# time). It asks for 2 stored samples of each earlier task and trains on one of them beside every
# batch; ``replayed`` counts the replay batches it got (kept in its state, so the test can read it).
THROWAWAY = textwrap.dedent('''
    from dataclasses import dataclass
    import torch
    from torch import nn
    from pipeline.methods.base import MethodBase
    from pipeline.methods.protocol import Generation
    from pipeline.methods.registry import register


    @dataclass
    class Options:
        scale: float = 1.0


    @register("throwaway")
    class Throwaway(MethodBase):
        options_class = Options
        sweep_space = {"scale": {"choice": [0.5, 1.0]}}
        replay_per_task = 2

        def __init__(self, options, lmm, guide):
            super().__init__(options, lmm, guide)
            self.bias = nn.ParameterList()
            self.register_buffer("replayed", torch.zeros(()))
            self.replay = None

        def _grow(self, n):
            while len(self.bias) < n:
                self.bias.append(nn.Parameter(torch.zeros(self.lmm.hidden_size), requires_grad=False))

        def begin_task(self, t, name=""):
            self._grow(t + 1)
            for i, p in enumerate(self.bias):
                p.requires_grad_(i == t)
            self.current = t

        def attach_replay(self, channel):
            self.replay = channel

        def _loss(self, batch, t):
            with torch.no_grad():
                embeds = self.lmm.embed(batch["input_ids"], batch["pixel_values"])
            return self.lmm.lm_loss(embeds + self.opts.scale * self.bias[t], batch["attention_mask"], batch["labels"])

        def training_loss(self, batch):
            loss = self._loss(batch, self.current)
            if self.replay is not None and self.replay.tasks:
                old = self.replay.batch(self.replay.tasks[0], 1)
                loss = loss + self._loss(old, self.current)
                self.replayed += 1
            return loss, {"loss": loss.item()}

        @torch.no_grad()
        def generate(self, batch, max_new_tokens):
            embeds = self.lmm.embed(batch["input_ids"], batch["pixel_values"]) + self.opts.scale * self.bias[-1]
            return Generation(texts=self.lmm.generate(embeds, batch["attention_mask"], max_new_tokens))

        def load_state_tensors(self, tensors):
            self._grow(len([k for k in tensors if k.startswith("bias.")]))
            self.load_state_dict(tensors)
            for p in self.bias:
                p.requires_grad_(False)

        def task_keys(self, t):
            return [f"bias.{t}"]
''')

# the user's task: "is the picture dark?" over light and dark images, answered yes / no (words the
# embedded default's tokenizer knows), scored by exact match
QUESTION = "Is the picture dark? Answer the question using a single word or phrase."


def write_user_task(root: Path, n_train: int = 24, n_test: int = 12) -> dict[str, str]:
    images = root / "images"
    images.mkdir(parents=True)
    train, test = [], []
    for i in range(n_train + n_test):
        dark = i % 2 == 0
        Image.new("RGB", (32, 32), (20, 20, 30) if dark else (230, 230, 210)).save(images / f"{i}.png")
        answer = "yes" if dark else "no"
        if i < n_train:
            train.append({"id": f"u{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]})
        else:
            test.append({"question_id": f"q{i}", "image": f"{i}.png", "text": f"<image>\n{QUESTION}", "answer": answer})
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    return {"train": str(root / "train.json"), "test": str(root / "test.json"), "image_root": str(images)}


def _task_args(files: dict[str, str]) -> list[str]:
    return [f"data.custom_tasks.Darkness.{k}={v}" for k, v in files.items()] + ["data.custom_tasks.Darkness.scorer=exact"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("outside") / "throwaway_method.py"
    path.write_text(THROWAWAY)
    return path


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory, plugin):
    """ScienceQA then the user's task, with the plugin method; a snapshot of what it left."""
    root = tmp_path_factory.mktemp("extend")
    files = write_user_task(root / "darkness")
    out, cache = root / "run", root / "cache"
    args = ["tasks=[ScienceQA,Darkness]", "--method", "throwaway", f"method.plugins=[{plugin}]", *_task_args(files)]
    proc = run_pipeline(out, cache, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    markers = {p.parent.name: p.read_text() for p in (out / "stages").glob("*/DONE.json")}
    return {"out": out, "cache": cache, "args": args, "proc": proc, "results": json.loads((out / "results.json").read_text()),
            "markers": markers}


def test_a_method_in_one_file_outside_the_repository_passes_the_contract_tests(plugin):
    env = dict(pipeline_env(), COIN_TEST_METHOD_PLUGINS=str(plugin))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_methods_contract.py",
                           "-k", "throwaway"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    # every contract test ran for it (none skipped: it learns task after task)
    n_tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                              "tests/test_methods_contract.py", "-k", "throwaway"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300).stdout.count("throwaway")
    assert n_tests >= 6 and f"{n_tests} passed" in proc.stdout


@pytest.mark.slow
def test_the_plugin_method_trains_a_two_task_pipeline_and_replays_stored_samples(two_task_run):
    res = two_task_run["results"]
    assert res["method"] == "throwaway" and res["tasks"] == ["ScienceQA", "Darkness"]
    assert [len(r) for r in res["matrix"]] == [1, 2]
    from safetensors.torch import load_file

    out = two_task_run["out"]
    first = load_file(out / "stages" / "03-freeze-ScienceQA" / "method_state.safetensors")
    second = load_file(out / "stages" / "06-freeze-Darkness" / "method_state.safetensors")
    assert float(first["replayed"]) == 0  # task 1: nothing earlier to replay
    steps = json.loads((out / "stages" / "05-train-Darkness" / "DONE.json").read_text())["result"]["steps"]
    assert float(second["replayed"]) == steps  # one replay batch beside every batch of task 2
    assert (first["bias.0"] == second["bias.0"]).all()  # the frozen task stayed frozen
    # which samples were stored, and of which task, is recorded beside the stage and in MLflow
    store = json.loads((out / "stages" / "05-train-Darkness" / "replay_store.json").read_text())
    assert store == {"ScienceQA": ["scienceqa_train_00000", "scienceqa_train_00001"]}  # its first two records
    assert not (out / "stages" / "02-train-ScienceQA" / "replay_store.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res["mlflow"]["tracking_uri"])
    stage_run = client.search_runs([client.get_run(res["mlflow"]["run_id"]).info.experiment_id],
                                   "tags.stage = '05-train-Darkness'")[0]
    assert "replay_store.json" in [a.path for a in client.list_artifacts(stage_run.info.run_id)]


@pytest.mark.slow
def test_a_user_task_is_read_trained_and_scored_by_its_scorer(two_task_run):
    out = two_task_run["out"]
    report = json.loads((out / "stages" / "00-data" / "data_report.json").read_text())
    assert report["counts"]["Darkness"] == {"train": {"records": 24, "valid": 24, "bad": 0},
                                            "test": {"records": 12, "valid": 12, "bad": 0}}
    preds = [json.loads(x) for x in (out / "stages" / "07-eval-Darkness" / "predictions" / "Darkness.jsonl")
             .read_text().splitlines()]
    assert len(preds) == 12
    answers = {f"q{i}": ("yes" if i % 2 == 0 else "no") for i in range(24, 36)}
    want = 100.0 * sum(p["text"].strip().lower() == answers[p["question_id"]] for p in preds) / 12
    assert two_task_run["results"]["matrix"][1][1] == pytest.approx(want)


@pytest.mark.slow
def test_a_finished_run_extends_to_a_third_task_and_only_the_new_stages_run(two_task_run):
    before = two_task_run
    proc = run_pipeline(before["out"], before["cache"], *[a.replace("tasks=[ScienceQA,Darkness]",
                                                                    "tasks=[ScienceQA,Darkness,TextVQA]")
                                                         for a in before["args"]])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = before["out"]
    res = json.loads((out / "results.json").read_text())
    assert res["matrix"][:2] == before["results"]["matrix"]  # the first two rows are unchanged
    assert [len(r) for r in res["matrix"]] == [1, 2, 3]
    assert "extending a finished run of 2 task(s) with TextVQA" in proc.stdout
    ran = {line.split(": running")[0].split("] ")[1] for line in proc.stdout.splitlines() if ": running" in line}
    assert ran == {"00-data", "08-train-TextVQA", "09-freeze-TextVQA", "10-eval-TextVQA"}
    for stage, marker in before["markers"].items():  # every finished stage kept as it was
        if stage != "00-data":
            assert (out / "stages" / stage / "DONE.json").read_text() == marker
    assert (out / "stages" / "00-data.before-extension-1" / "DONE.json").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["extensions"][0]["from_tasks"] == ["ScienceQA", "Darkness"]


def test_an_unknown_task_or_scorer_is_refused_when_the_config_loads(tmp_path):
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"tasks: unknown task\(s\) \['Mine'\].*data.custom_tasks"):
        load_config(None, ["tasks=[ScienceQA,Mine]"])
    files = write_user_task(tmp_path / "t", 2, 2)
    with pytest.raises(ConfigError, match=r"data.custom_tasks.Mine.scorer: unknown scorer 'bleu'"):
        load_config(None, ["tasks=[Mine]", *[f"data.custom_tasks.Mine.{k}={v}" for k, v in files.items()],
                           "data.custom_tasks.Mine.scorer=bleu"])
    with pytest.raises(ConfigError, match="is a CoIN task"):
        load_config(None, [f"data.custom_tasks.GQA.{k}={v}" for k, v in files.items()])


def test_the_replay_channel_serves_stored_rows_in_a_fixed_cycle(one_thread):
    from pipeline.methods.protocol import ReplayChannel
    from pipeline.models.lmm import rows_to_batch

    lmm, _ = tiny_models(0)
    rows = toy_rows("task_a", 3)
    channel = ReplayChannel({"task_a": rows, "empty": []}, lambda r: lmm.collate(rows_to_batch(r), train=True))
    assert channel.tasks == ["task_a"] and len(channel) == 3
    ids = [channel.batch("task_a", 2)["ids"] for _ in range(3)]
    assert [list(map(str, i)) for i in ids] == [["task_a-0", "task_a-1"], ["task_a-2", "task_a-0"],
                                                ["task_a-1", "task_a-2"]]
    with pytest.raises(KeyError, match="no stored samples of task 'task_b'"):
        channel.batch("task_b", 1)
