"""``quantdeploy demo`` ends with the experiment page: its models as the cells of an experiment run
(fidelity from the demo's own comparison, the packaged multiple-choice task paired against the original,
size, speed, per-layer error), which ``quantdeploy report`` draws. On the tiny Llama with two methods."""

from __future__ import annotations

import json

import quantdeploy.demo as demo
from quantdeploy.bench.experiment_report import load_run, write_report
from quantdeploy.eval.fidelity import EvalProtocol
from quantdeploy.quant.methods.rtn import RTNConfig


def test_the_demo_writes_an_experiment_run_and_its_page(tiny_llama_dir, tmp_path, data, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_METHODS", [("int8", RTNConfig(bits=8, group_size=None)),
                                               ("int4-g32", RTNConfig(bits=4, group_size=32))])
    rows, _ = demo.run_demo(str(tiny_llama_dir), data / "text" / "wiki_en.test.txt",
                            EvalProtocol(max_tokens=1024, window=256), tmp_path)
    original, cells = load_run(tmp_path / "experiment")
    assert [c["cell"]["label"] for c in cells] == ["int8", "int4-g32"]
    by_name = {row["name"]: row for row in rows}
    task = str(demo.demo_task_path())
    for cell in cells:  # the comparison's numbers, not a second scoring of the text
        assert cell["fidelity"]["kld_mean"] == by_name[cell["cell"]["id"]]["kld_mean"]
        assert cell["tasks"][task]["raw"]["n"] == 40 and "diff" in cell["tasks"][task]["rows"][0]
        assert cell["speed"]["decode"]["1"]["tok_s"] > 0
        assert sum(r["tokens"] for r in cell["kld_buckets"]["position"]) == cell["fidelity"]["tokens_scored"]
        assert len(cell["layer_error"]) == 2
    assert "kld_buckets" not in json.dumps(rows)  # the rows of the demo's own report stay plain numbers
    page = write_report(tmp_path / "experiment")[1]
    assert "quantdeploy_demo_everyday_facts acc" in page.read_text()
