import json

import pytest
import torch
from peft import PeftModel

from aletheia_lora.config import LoraSettings
from aletheia_lora.data import DataConfig, build_datasets
from aletheia_lora.models import ModelConfig, load_model_and_tokenizer
from aletheia_lora.pipeline import RunConfig, run_pipeline, summary_table
from aletheia_lora.probe import ProbeConfig
from aletheia_lora.select import SelectConfig
from aletheia_lora.train import TrainConfig, evaluate_loss


def small_run(model: str, data: DataConfig, steps: int, **select) -> RunConfig:
    return RunConfig(
        model=ModelConfig(model=model),
        data=data,
        probe=ProbeConfig(probe_batches=2),
        select=SelectConfig(**select),
        lora=LoraSettings(r=4, lora_alpha=8),
        train=TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-3, save_steps=0, progress=False),
    )


def test_given_layers_skip_the_probe(tiny_checkpoint, tiny_corpus, tmp_path):
    data = DataConfig(data=str(tiny_corpus / "target.txt"), general_data=None, max_length=16)
    report = run_pipeline(small_run(str(tiny_checkpoint), data, 2), tmp_path / "o", layers=[3, 1])
    assert report["selection"] == {"strategy": "given", "selected_layers": [1, 3], "probe_seconds": 0.0}
    assert report["train"]["lowest_layer_reached"] == 1
    assert not (tmp_path / "o" / "scores.json").exists()
    assert "eval_before" in report and "general" not in report["eval_before"]
    assert "selected        2 layers (given): [1, 3]" in summary_table(report)


def test_scores_file_must_match_the_model(tiny_checkpoint, tiny_corpus, tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"scores": {"0": 1.0, "1": 2.0}}))
    data = DataConfig(data=str(tiny_corpus / "target.txt"), general_data=None, max_length=16)
    with pytest.raises(ValueError, match="has 2 layers, the model 4"):
        run_pipeline(small_run(str(tiny_checkpoint), data, 2), tmp_path / "o", scores_file=scores)


def test_contiguous_selection_runs_a_short_backward(tiny_checkpoint, tiny_corpus, tmp_path):
    data = DataConfig(data=str(tiny_corpus / "target.txt"), general_data=None, max_length=16)
    report = run_pipeline(small_run(str(tiny_checkpoint), data, 2, strategy="contiguous"), tmp_path / "o")
    assert report["selection"]["selected_layers"] == [2, 3]
    assert report["train"]["lowest_layer_reached"] == 2
    assert report["selection"]["predicted_speedup"] > report["selection"]["alternatives"]["score"]["predicted_speedup"]


@pytest.mark.slow
def test_bundled_model_learns_the_target_domain(tmp_path):
    """The README's main job, shortened: the bundled SmolLM2 adapts to Python source and the adapter reloads."""
    data = DataConfig(max_train_chars=30_000, max_eval_chars=8_000, max_length=128)
    config = small_run("smollm2-135m", data, 16, top_pct=50)
    config.train.learning_rate = 1e-3
    config.train.lr_scheduler_type = "constant"
    config.train.batch_size = 4
    report = run_pipeline(config, tmp_path / "run")
    before, after = report["eval_before"]["target"]["loss"], report["eval_after"]["target"]["loss"]
    assert after < before - 0.03, (before, after)
    assert report["num_layers"] == 30 and len(report["selection"]["selected_layers"]) == 15
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    eval_rows = build_datasets(data, tokenizer)[1]
    reloaded = PeftModel.from_pretrained(model, tmp_path / "run" / "adapter")
    with torch.no_grad():
        loss = evaluate_loss(reloaded, eval_rows, batch_size=4, pad_token_id=tokenizer.pad_token_id)["loss"]
    assert loss == pytest.approx(after, rel=1e-4)
