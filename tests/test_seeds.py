"""``--seeds``: one configuration over several seeds as one experiment (the summary's arithmetic,
the directory's guard, and a real two-seed run with its nested MLflow runs)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config import ConfigError, load_config
from stages.seeds import SEEDS_FILE, _open_directory, parse_seeds, summarise
from tests.helpers import run_pipeline


def _result(seed: int, last: float, final: list[float]) -> dict:
    return {"method": "l2p", "tasks": ["A", "B"], "run_dir": f"/r/seed-{seed}",
            "matrix": [[50.0], final], "metrics": {"last": last, "avg": last + 1, "B": 2.0 * seed, "fwt": float("nan")}}


def test_seeds_are_parsed_and_bad_lists_refused_by_name() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    for bad, why in (("0,x", "comma-separated integers"), ("1,1", "listed twice"), ("", "no seed")):
        with pytest.raises(ConfigError, match=why):
            parse_seeds(bad)


def test_the_summary_is_each_metrics_mean_spread_and_range_over_the_seeds() -> None:
    s = summarise({0: _result(0, 10.0, [20.0, 0.0]), 1: _result(1, 14.0, [30.0, 4.0]), 2: _result(2, 12.0, [25.0, 2.0])})
    last = s["metrics"]["last"]
    assert (last["mean"], last["std"], last["min"], last["max"]) == (12.0, 2.0, 10.0, 14.0)
    assert last["per_seed"] == {"0": 10.0, "1": 14.0, "2": 12.0}
    assert s["metrics"]["B"]["mean"] == 2.0 and s["metrics"]["avg"]["max"] == 15.0
    assert "fwt" not in s["metrics"]  # not finite for every seed: left out, not averaged
    assert s["final_per_task"]["A"] == {"mean": 25.0, "std": 5.0, "min": 20.0, "max": 30.0,
                                        "per_seed": {"0": 20.0, "1": 30.0, "2": 25.0}}
    bad = _result(3, 1.0, [1.0, 1.0])
    bad["tasks"] = ["B", "A"]
    with pytest.raises(ValueError, match="seed 3 ran tasks"):
        summarise({0: _result(0, 10.0, [20.0, 0.0]), 3: bad})


def test_a_directory_holds_one_seeds_experiment(tmp_path) -> None:
    cfg = load_config(None, ["tasks=[ScienceQA]"])
    _open_directory(tmp_path / "x", cfg, [0, 1])
    _open_directory(tmp_path / "x", cfg, [0, 1])  # the same experiment again: resumes
    with pytest.raises(ConfigError, match="holds another seeds experiment"):
        _open_directory(tmp_path / "x", cfg, [0, 2])
    with pytest.raises(ConfigError, match="holds another seeds experiment"):
        _open_directory(tmp_path / "x", load_config(None, ["tasks=[GQA]"]), [0, 1])
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "other").write_text("")
    with pytest.raises(ConfigError, match=f"holds no seeds experiment \\({SEEDS_FILE}\\)"):
        _open_directory(tmp_path / "y", cfg, [0])


@pytest.mark.slow
def test_two_seeds_run_as_one_experiment_with_nested_mlflow_runs(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    out, cache = tmp_path / "exp", tmp_path / "cache"
    # 4 logical CPUs hold two one-task runs (2 CPUs each): the isolation row runs them side by side
    args = ["--seeds", "0,1", "tasks=[ScienceQA,ImageNet]", "train.epochs=0.5", "eval.isolation=true",
            "resources.num_cpus=4"]
    proc = run_pipeline(out, cache, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "seeds_summary.json").read_text())
    per_seed = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert summary["seeds"] == [0, 1]
    for key in ("last", "avg", "B"):
        vals = [per_seed[s]["metrics"][key] for s in (0, 1)]
        assert summary["metrics"][key]["mean"] == pytest.approx(sum(vals) / 2)
        assert summary["metrics"][key]["min"] == min(vals) and summary["metrics"][key]["max"] == max(vals)
    assert per_seed[0]["matrix"] != per_seed[1]["matrix"] or per_seed[0]["metrics"] == per_seed[1]["metrics"]
    assert "Over seeds 0, 1 (modalprompt)" in proc.stdout and (out / "seeds_per_task.png").stat().st_size > 0
    # the isolation row: each task trained alone from the base, a one-task run of its own
    for s in (0, 1):
        res = per_seed[s]
        alone = [json.loads((out / f"seed-{s}" / "isolation" / t / "results.json").read_text()) for t in res["tasks"]]
        assert all(a["tasks"] == [t] and len(a["matrix"]) == 1 for a, t in zip(alone, res["tasks"]))
        assert res["isolation"] == [a["matrix"][0][0] for a in alone]
        la = sum(res["matrix"][i][i] for i in range(2)) / 2
        assert res["metrics"]["fwt"] == pytest.approx(la - sum(res["isolation"]) / 2)
    assert summary["metrics"]["fwt"]["mean"] == pytest.approx(sum(per_seed[s]["metrics"]["fwt"] for s in (0, 1)) / 2)
    # one store: the experiment's parent run, the seed runs nested under it, their stages under them
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    parent = summary["mlflow"]["run_id"]
    run = client.get_run(parent)
    assert run.data.tags["kind"] == "seeds" and run.info.status == "FINISHED"
    assert run.data.metrics["last_mean"] == pytest.approx(summary["metrics"]["last"]["mean"])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.info.run_id for c in children) == sorted(per_seed[s]["mlflow"]["run_id"] for s in (0, 1))
    alone_runs = client.search_runs([run.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{per_seed[0]['mlflow']['run_id']}' and tags.method = 'modalprompt'")
    assert len(alone_runs) == 2  # seed 0's isolation sub-runs, nested under seed 0's run
    assert client.get_run(per_seed[0]["mlflow"]["run_id"]).data.metrics["fwt"] == pytest.approx(per_seed[0]["metrics"]["fwt"])
    assert {c.data.params["seed"] for c in children} == {"0", "1"}
    # the same command again resumes: every stage of both seeds is verified and skipped
    again = run_pipeline(out, cache, *args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    assert json.loads((out / "seeds_summary.json").read_text())["metrics"] == summary["metrics"]
    stage_lines = [ln.split("] ", 1)[-1] if ln.startswith("  [alone") else ln for ln in again.stdout.splitlines()]
    stage_lines = [ln for ln in stage_lines if ln.startswith("[")]
    one_task = len(json.loads((out / "seed-0" / "isolation" / "ScienceQA" / "results.json").read_text())["stage_wall_s"])
    assert len(stage_lines) == 2 * (len(per_seed[0]["stage_wall_s"]) + 2 * one_task)
    assert all(ln.endswith("complete (outputs verified), skipped") for ln in stage_lines), stage_lines
    assert "isolation row: 2 one-task run(s) from the base, 2 at a time" in proc.stdout
    # a one-task run gives the same score side by side as alone in the driver (resources.* change no result)
    shutil.rmtree(out / "seed-0" / "isolation" / "ImageNet")
    one = run_pipeline(out, cache, *args, "resources.isolation_parallel=1")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-5000:]
    assert "1 at a time" in one.stdout and "[alone ImageNet] [3/5] 02-train-ImageNet: done" in one.stdout
    assert json.loads((out / "seed-0" / "results.json").read_text())["isolation"] == per_seed[0]["isolation"]
