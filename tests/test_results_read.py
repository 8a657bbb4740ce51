"""What aggregation reads from a run folder besides the evaluation results: the last epoch's score
statistics of the pretraining (the row runs in MLflow show their mean over seeds)."""

import json
import math

from ftcl import pipeline
from ftcl.results.read import collect


def test_collect_reads_the_last_epochs_scores_from_pretrain_json(tmp_path):
    pipe = pipeline.load({"experiment": "e", "results_dir": str(tmp_path), "seeds": [0, 1],
                          "stages": ["pretrain", "knn"],
                          "ablations": [{"name": "a", "baseline": True}, {"name": "floor", "role": "floor"}]},
                         resolve_runs=False)
    for row, seed, scores in (("a", 0, {"scores/pos_mean": 0.8, "scores/neg_mean": 0.1}), ("a", 1, {}),
                              ("floor", 0, {}), ("floor", 1, {})):  # 0 epochs or scores off: none
        for stage, result in (("pretrain", {"epochs": 2, **scores}), ("knn", {"top1": 50.0})):
            folder = tmp_path / "e" / row / f"seed{seed}" / stage
            folder.mkdir(parents=True)
            (folder / f"{stage}.json").write_text(json.dumps(result))
    frame = collect(pipe).set_index(["row", "seed"])
    assert (frame.loc[("a", 0), "scores_pos"], frame.loc[("a", 0), "scores_neg"]) == (0.8, 0.1)
    assert math.isnan(frame.loc[("a", 1), "scores_pos"]) and math.isnan(frame.loc[("floor", 0), "scores_neg"])
    assert frame.loc[("a", 1), "knn_top1"] == 50.0
