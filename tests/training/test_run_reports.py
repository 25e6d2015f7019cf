"""What `lm-mini train` tells the user about where a run's weights and length come from: ``train.init_from`` names
what it loaded, from where, and what it did not; a resume that changes ``train.max_steps`` / ``max_epochs`` says so
(and the new end), instead of silently ending earlier or later; the finished marker records the length it ended
under (sweeps compare it with their own)."""
import json

import pytest
import torch

from training_helpers import TinyData, params_of, tiny_config
from lm_mini.training.module import InitReport, load_initial_weights
from lm_mini.training.run import train


def test_init_from_reports_what_it_loaded_from_where_and_what_not(tmp_path, capsys):
    first = train(tiny_config(tmp_path, "train.max_steps=2", "model.prefusion.depth=0", "run_name=stage1"), datamodule=TinyData(16))
    source = first.run.checkpoints / "step=00000002.ckpt"
    capsys.readouterr()
    # stage 2 with pre-fusion: the first run has no weights for it
    second = train(tiny_config(tmp_path, "train.max_steps=1", "model.prefusion.depth=1", "run_name=stage2", "train.init_from=stage1"),
                   datamodule=TinyData(16))
    out = capsys.readouterr().out
    report = second.trainer.lightning_module.init_report
    model = second.trainer.lightning_module.model
    parts = {k.split(".")[0] for k in model.state_dict()}
    n_prefusion = sum(k.startswith("prefusion.") for k in model.state_dict())
    assert report.source == str(source) and report.kind == "checkpoint" and report.step == 2
    assert report.total == {p: sum(k.split(".")[0] == p for k in model.state_dict()) for p in parts}
    assert report.loaded == {p: n for p, n in report.total.items() if p != "prefusion"}
    assert sorted(report.missing) == sorted(k for k in model.state_dict() if k.startswith("prefusion."))
    n_total = len(model.state_dict())
    assert (f"lm-mini: train.init_from=stage1: loaded {n_total - n_prefusion} of the model's {n_total} weight tensors "
            f"from checkpoint {source}, step 2\n") in out
    assert "  loaded: encoder (all " in out and "llm (all " in out
    assert f"  not in it, kept freshly initialised: prefusion ({n_prefusion}) ({n_prefusion} tensors, e.g. prefusion." in out


def test_init_report_of_a_part_loaded_in_part():
    report = InitReport("x.ckpt", "checkpoint", 7, loaded={"llm": 3, "projector": 2}, total={"llm": 5, "projector": 2},
                        missing=["llm.lm_head.weight", "llm.norm.weight"])
    assert report.lines("r") == [
        "train.init_from=r: loaded 5 of the model's 7 weight tensors from checkpoint x.ckpt, step 7",
        "  loaded: projector (all 2), llm (3 of 5)",
        "  not in it, kept freshly initialised: parts of the above (2 tensors, e.g. llm.lm_head.weight, llm.norm.weight)",
    ]


def test_weights_that_do_not_belong_to_the_model_are_an_error(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_steps=2", "model.prefusion.depth=1"), datamodule=TinyData(16))
    from lm_mini.models.llava_mini import LlavaMini

    no_prefusion = LlavaMini.from_config(tiny_config(tmp_path, "model.prefusion.depth=0").model)
    with pytest.raises(ValueError, match=r"step=00000002.ckpt: \d+ weights do not belong to this model, e.g. \['prefusion"):
        load_initial_weights(no_prefusion, str(first.run.checkpoints / "step=00000002.ckpt"))


def test_a_resume_that_changes_the_length_says_so_and_the_marker_records_it(tmp_path, capsys):
    short = train(tiny_config(tmp_path, "train.max_steps=2"), datamodule=TinyData(64))
    marker = json.loads(short.run.finished_file.read_text())
    assert (marker["global_step"], marker["max_steps"], marker["max_epochs"]) == (2, 2, 1)
    capsys.readouterr()
    longer = train(tiny_config(tmp_path, "train.max_steps=4"), resume="auto", datamodule=TinyData(64))
    out = capsys.readouterr().out
    assert (f"lm-mini: resuming {short.run.dir} with train.max_steps 2 -> 4 (it last ran with max_steps 2, max_epochs 1): "
            "it now ends at step 4 or after epoch 1; the learning-rate schedule follows the new length") in out
    assert longer.global_step == 4 and json.loads(longer.run.finished_file.read_text())["max_steps"] == 4
    # shorter than where the checkpoint is: said, and nothing more is trained
    before = params_of(longer.trainer.lightning_module.model)
    again = train(tiny_config(tmp_path, "train.max_steps=3"), resume="auto", datamodule=TinyData(64))
    out = capsys.readouterr().out
    assert "with train.max_steps 4 -> 3" in out and "its checkpoint is at step 4, so training stops at once" in out
    assert again.global_step == 4 and all(torch.equal(before[k], v) for k, v in params_of(again.trainer.lightning_module.model).items())
    # the same length: nothing to say
    train(tiny_config(tmp_path, "train.max_steps=3"), resume="auto", datamodule=TinyData(64))
    assert "resuming" not in capsys.readouterr().out.replace("(resuming", "")
