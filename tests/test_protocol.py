"""``python -m utilgen.experiment protocol``: the statistics over pipeline seeds, and one real (smoke) protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from utilgen import protocol


def _metrics(seed: int, plain: float, utilgen: float, *, judge: bool = True) -> dict:
    def row(mean, train_set="synthetic", pool=None):
        return {"mean": mean, "accuracies": [mean - 0.01, mean + 0.01], "train_set": train_set, "pool": pool}

    return {
        "accuracy": {  # sorted keys, as metrics.json holds them
            "plain joint": row(plain + 0.1, "joint", "plain"),
            "plain synthetic-only": row(plain, pool="plain"),
            "real-only": row(0.7, "real"),
            "utilgen joint": row(utilgen + 0.1, "joint", "utilgen"),
            "utilgen synthetic-only": row(utilgen, pool="utilgen"),
        },
        "judge": {
            "plain": {"fine": 0.5, "coarse": 0.9, "utility_auroc": 0.6},
            "utilgen": {"fine": 0.6 + seed / 100, "coarse": 0.95},
        }
        if judge
        else None,
        "mlco": [
            {
                "round": 1,
                "valuation_refresh": {
                    "mislabel_auroc_in_use": 0.9,
                    "mislabel_auroc_refreshed": 0.8,
                    "passed": False,
                    "adopted": False,
                },
            },
            {"round": 2},  # a round without a refresh (refresh_valuation off) has nothing to report
        ],
        "ilpo": {
            "instances": 40,
            "prompt_moved": 40,
            "utility_before": 0.4,
            "utility_after_prompt": 0.45,
            "utility_after": 0.5,
        },
        "valuation_first_fit": [  # seed 1's first fit inverted and the guard refit it
            *([{"seed": 1, "mislabel_auroc": 0.06, "kept": False}] if seed == 1 else []),
            {"seed": seed + 7, "mislabel_auroc": 0.93, "kept": True},
        ],
        "experiment": {"test_reads": 10, "test_split_sha256": f"hash{seed}", "test_images": 100, "data": "embedded"},
        "timings": {"a": 60.0, "b": 30.0},
        "machine": {"processor": "x86_64", "torch_threads": 2},
    }


def test_rows_pair_by_pipeline_seed_and_compare_with_plain_of_their_kind():
    runs = {s: _metrics(s, plain=0.50, utilgen=0.50 + d) for s, d in zip(range(3), (0.02, 0.04, 0.03), strict=True)}
    loss = {s: _metrics(s, plain=0.50, utilgen=0.49) for s in range(3)}
    result = protocol.summarise(runs, loss)
    names = [row["setting"] for row in result["rows"]]
    assert names == [
        "real-only",
        "plain synthetic-only",
        "utilgen synthetic-only",
        protocol.LOSS_UTILITY_ROW,
        "plain joint",
        "utilgen joint",
    ]
    rows = {row["setting"]: row for row in result["rows"]}
    versus = rows["utilgen synthetic-only"]["vs_plain"]
    assert versus["against"] == "plain synthetic-only"
    assert versus["per_seed_points"] == pytest.approx([2.0, 4.0, 3.0])
    assert versus["difference_points"] == pytest.approx(3.0)
    assert versus["ci95_points"] == pytest.approx([3.0 - 4.303 / 3**0.5, 3.0 + 4.303 / 3**0.5])
    assert versus["positive_seeds"] == 3
    assert versus["reading"] == "higher"
    assert rows["utilgen joint"]["vs_plain"]["against"] == "plain joint"
    assert rows[protocol.LOSS_UTILITY_ROW]["vs_plain"]["per_seed_points"] == pytest.approx([-1.0] * 3)
    assert rows["utilgen synthetic-only"]["judge"]["fine"] == pytest.approx(0.61)
    assert rows["real-only"]["judge"] is None
    assert rows["utilgen synthetic-only"]["per_classifier_seed"][0] == pytest.approx([0.51, 0.53])
    assert result["test"]["test_reads"] == 60  # both variants' reads count
    assert result["test"]["test_split_sha256"] == {0: "hash0", 1: "hash1", 2: "hash2"}
    assert result["valuation_auroc"]["plain"]["mean"] == pytest.approx(0.6)
    assert result["judged_pools"]["utilgen"]["per_pipeline_seed"] == pytest.approx([0.60, 0.61, 0.62])
    assert result["valuation_refresh"][2] == [
        {"round": 1, "mislabel_auroc_in_use": 0.9, "mislabel_auroc_refreshed": 0.8, "passed": False, "adopted": False}
    ]
    loss_vs_meta = [c for c in result["comparisons"] if c["a"] == protocol.LOSS_UTILITY_ROW]
    assert loss_vs_meta[0]["b"] == "utilgen synthetic-only"
    assert loss_vs_meta[0]["positive_seeds"] == 0
    text = protocol.markdown(result)
    assert "| utilgen synthetic-only | 53.0 | 52.0, 54.0, 53.0 | +3.0 |" in text
    assert "test reads: 60" in text
    assert "- utilgen: 61.0% (60.0, 61.0, 62.0)" in text
    assert "- seed 1, round 1: in use 0.9, refit 0.8: kept the one in use" in text
    assert result["valuation_first_fit"][0] == [{"seed": 7, "mislabel_auroc": 0.93, "kept": True}]
    assert "- seed 1: 0.06, 0.93 (kept)" in text
    assert "- seed 2: 0.400 before, 0.450 after the prompt step (40 of 40 prompts moved), 0.500 after" in text


def test_one_pipeline_seed_gives_values_but_no_interval():
    result = protocol.summarise({0: _metrics(0, 0.5, 0.52, judge=False)}, {})
    versus = {row["setting"]: row for row in result["rows"]}["utilgen synthetic-only"]["vs_plain"]
    assert versus["ci95_points"] is None
    assert versus["reading"] == "one seed: no interval"
    assert "no interval" in protocol.markdown(result)


def test_a_smoke_protocol_runs_resumes_and_reports_every_baseline(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "utilgen.experiment", "protocol", "--out", str(tmp_path), "--preset", "smoke"]
    command += ["--pipeline-seeds", "0", "--classifier-seeds", "0", "--no-ablation", "--loss-utility", "--quiet"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "protocol.json").read_text())
    assert protocol.LOSS_UTILITY_ROW in {row["setting"] for row in result["rows"]}
    # The loss-utility run started from the main run's stages before TODV and its scored classifiers.
    main_stages = json.loads((tmp_path / "runs/seed-0/manifest.json").read_text())["stages"]
    variant = tmp_path / "runs/seed-0-classifier-loss"
    variant_stages = json.loads((variant / "manifest.json").read_text())["stages"]
    for name in protocol.SHARED_STAGES:
        assert variant_stages[name]["adopted_from"] == str(tmp_path / "runs/seed-0")
        assert variant_stages[name]["key"] == main_stages[name]["key"]  # kept by the resume, not run again
        assert variant_stages[name]["finished"] == main_stages[name]["finished"]
    assert variant_stages["valuation"]["key"] != main_stages["valuation"]["key"]
    variant_reads = json.loads((variant / "test-reads.json").read_text())
    assert [(e["reads"], e["reused"]) for e in variant_reads] == [(2, 3)]  # UtilGen's two rows; real, plain x2
    main_reads = json.loads((tmp_path / "runs/seed-0/test-reads.json").read_text())
    assert result["test"]["test_reads"] == main_reads[0]["reads"] + 2
    rows = {row["setting"] for row in result["rows"]}
    assert {
        "real-only train+meta",
        "plain untrained-tokens synthetic-only",
        "plain + filter synthetic-only",
        "datadream-style synthetic-only",
    } <= rows
    baselines = json.loads((tmp_path / "runs/seed-0/baselines.json").read_text())
    assert baselines["filter"]["kept"] == baselines["filter"]["images"] // 2  # filter_oversample 2
    assert result["test"]["test_reads"] > 0
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)  # resumes: nothing left
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "protocol.json").read_text())["rows"] == result["rows"]

    other = subprocess.run([*command, "--set", "mlco.rounds=2"], env=env, capture_output=True, text=True, timeout=900)
    assert other.returncode == 2  # another method: refused
    assert "mlco.rounds" in other.stderr
    manifest = json.loads((tmp_path / "runs/seed-0/manifest.json").read_text())
    ablation = [part for part in command if part != "--no-ablation"]  # the ablation added to the finished run
    extended = subprocess.run(ablation, env=env, capture_output=True, text=True, timeout=900)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "extending" in extended.stdout
    after = json.loads((tmp_path / "runs/seed-0/manifest.json").read_text())
    for name in ("tokens", "pool0", "plain", "valuation", "ilpo", "baselines"):  # kept, not redone
        assert after["stages"][name] == manifest["stages"][name]
    extended_result = json.loads((tmp_path / "protocol.json").read_text())
    rows = {row["setting"] for row in extended_result["rows"]}
    assert {"+mlco synthetic-only", "+prompt synthetic-only", "plain high-guidance synthetic-only"} <= rows
    reads = json.loads((tmp_path / "runs/seed-0/test-reads.json").read_text())
    before = {row["setting"]: row["per_classifier_seed"] for row in result["rows"]}
    # The extension trained and scored at most the ablation's classifiers (an ablation pool equal to a pool
    # scored before is the same job) and reused every classifier of the first evaluation ...
    assert reads[1]["reads"] + reads[1]["reused"] == len(rows) - 1  # the loss-utility row is the other run's
    assert reads[1]["reused"] >= reads[0]["reads"]
    assert 0 < reads[1]["reads"] <= len(rows) - len(before)
    for row in extended_result["rows"]:  # ... and kept the earlier ones' accuracies
        if row["setting"] in before:
            assert row["per_classifier_seed"] == before[row["setting"]], row["setting"]
    assert extended_result["test"]["test_reads"] == reads[0]["reads"] + reads[1]["reads"] + 2


def test_a_bad_setting_stops_before_any_run(tmp_path):
    command = [sys.executable, "-m", "utilgen.experiment", "protocol", "--out", str(tmp_path / "p")]
    done = subprocess.run([*command, "--set", "mlco.rounds=-1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "mlco.rounds" in done.stderr
    assert not (tmp_path / "p").exists()
