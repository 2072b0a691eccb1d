"""The infilling evaluation (``python -m fastgfn.trainer.evaluation.infilling``): BLEU-4 and GLEU-4
against values worked out by hand, BERTScore from the packaged encoder, and the command end to
end on a tiny model: a GFlowNet run's checkpoint, an SFT baseline trained by ``python -m
fastgfn.trainer.baselines.sft`` and both prompting baselines in one table."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("nltk")

from fastgfn.trainer.evaluation.infilling import metrics  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "fastgfn" / "data" / "stories" / "fixture.csv"


def test_bleu_and_gleu_by_hand():
    ref = "a b c d e f"
    assert metrics.bleu4(ref, ref) == pytest.approx(1.0)
    assert metrics.gleu4(ref, ref) == pytest.approx(1.0)
    # every n-gram of "a b c d" is in the reference: precision 1, brevity penalty e^(1 - 6/4)
    assert metrics.bleu4(ref, "a b c d") == pytest.approx(math.exp(-0.5))
    # GLEU: min(matched / candidate n-grams, matched / reference n-grams), n = 1..4
    assert metrics.gleu4(ref, "a b c d") == pytest.approx(10 / 18)
    # "a b x y": n-gram matches 2 + 1 + 0 + 0 of 4 + 3 + 2 + 1 candidate n-grams
    assert metrics.gleu4(ref, "a b x y") == pytest.approx(min(3 / 10, 3 / 18))
    assert metrics.bleu4(ref, "") == metrics.gleu4(ref, "") == 0.0
    assert metrics.bleu4(ref, "x y z w") < 0.01


@pytest.fixture(scope="module")
def bertscore():
    pytest.importorskip("bert_score")
    try:
        return metrics.BertScore("all-MiniLM-L6-v2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_bertscore_from_the_packaged_encoder(bertscore):
    assert (bertscore.name, bertscore.layer) == ("all-MiniLM-L6-v2", 6)
    ref = "She called her neighbor who kept a spare key"
    f = bertscore(ref, [ref, "She phoned the man next door who had another key",
                        "The stock market fell sharply on Monday", ""])
    assert f[0] == pytest.approx(1.0, abs=1e-4)
    assert f[1] > f[2] and f[3] == 0.0
    with pytest.raises(ValueError, match=r"bertscore_layer: must be in \[1, 6\]"):
        metrics.BertScore("all-MiniLM-L6-v2", layer=7)


def test_command_end_to_end_on_a_tiny_model(tmp_path, bertscore):
    pytest.importorskip("trl")
    from fastgfn.trainer import Trainer, load_config
    from fastgfn.trainer.baselines.sft import main as sft_main
    from fastgfn.trainer.evaluation.infilling.cli import parse_args, run

    common = ["model=tiny", "tiny_hidden=32", "tiny_layers=1", "max_new_tokens=6",
              "min_new_tokens=1", "heldout_fraction=0.125"]  # 3 of the 24 stories held out
    gfn_dir = tmp_path / "gfn"
    cfg = load_config("configs/infilling.yaml", [
        *common, "steps=2", "batch_size=4", "progress=false", "sample_dtype=model",
        "save_every=2", "save_model=false", "training_curves=false", f"output_dir={gfn_dir}"])
    Trainer(cfg).run()
    sft_main(["--config", "configs/infilling.yaml", "--out", str(tmp_path / "sft"),
              "--epochs", "1", "--batch_size", "4", *common])
    sft = json.loads((tmp_path / "sft" / "sft.json").read_text())
    assert sft["examples"] == 21 and sft["steps"] == 6 and math.isfinite(sft["last_loss"])
    out = tmp_path / "eval"
    args = parse_args(["--config", "configs/infilling.yaml", "--model",
                       str(gfn_dir / "checkpoints"), "--sft", str(tmp_path / "sft" / "model"),
                       "--stories", "2", "--samples", "3", "--out", str(out), *common])
    assert args.methods == ["gfn", "sft", "prompt_xy", "prompt_x"]
    run(args, bertscore=bertscore)
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"gfn", "sft", "prompt_xy", "prompt_x"}
    assert res["meta"]["stories"] == 2 and res["meta"]["bertscore_model"] == "all-MiniLM-L6-v2"
    for row in res["summary"].values():
        assert row["samples"] == 6 and 0 <= row["bleu4"] <= 1 and 0 <= row["gleu4"] <= 1
        assert math.isfinite(row["log_reward"]) and row["log_reward"] < 0
    story = res["stories"][0]
    s = story["methods"]["gfn"]["samples"][0]
    assert s["bleu4"] == pytest.approx(metrics.bleu4(story["reference"], s["text"]))
    table = (out / "table.md").read_text()
    for label in ("GFlowNet policy", "SFT", "prompt with X and Y", "prompt with X only",
                  "BERTScore F1 (all-MiniLM-L6-v2, layer 6)"):
        assert label in table


def test_bad_arguments_are_named():
    from fastgfn.trainer.evaluation.infilling.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--methods", "gfn"])  # gfn needs --model
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--methods", "beam"])
    assert parse_args(["--out", "x"]).methods == ["prompt_xy", "prompt_x"]
