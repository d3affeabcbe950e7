"""Disk-streamed pruning: one layer at a time from safetensors shards, written as it goes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimgpt_core.export import describe_calibration, export_pruned
from slimgpt_core.pruner import Probe, PruneConfig, PruningCancelled, prune_model
from slimgpt_core.shards import ShardedCheckpoint
from slimgpt_core.streaming import (
    logits_from_hidden,
    open_streamed,
    perplexity_from_hidden,
    should_stream,
)
from tests.core.tiny import tiny_llama, windows

CFG = {"target_ratio": 0.4, "batch_size": 4, "min_group": 8}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama(layers=3)


@pytest.fixture(scope="module")
def folder(base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dense")
    base.save_pretrained(path, max_shard_size="50KB")  # many shards, layers split across them
    return path


@pytest.fixture(scope="module")
def in_memory(base: torch.nn.Module):
    return prune_model(copy.deepcopy(base), windows(), PruneConfig(**CFG))


def _stream(folder: Path, ckpt: Path, **kw):
    streamed = open_streamed(folder)
    return streamed, prune_model(streamed.model, windows(), PruneConfig(**CFG, checkpoint_dir=ckpt),
                                 source=streamed.source, **kw)


def test_streamed_pruning_equals_in_memory_pruning(folder: Path, in_memory, tmp_path: Path) -> None:
    _, result = _stream(folder, tmp_path)
    assert result.placement == "stream"
    assert [(r.heads_kept, r.channels_kept) for r in result.layers] == \
        [(r.heads_kept, r.channels_kept) for r in in_memory.layers]
    reference = in_memory.model.state_dict()
    for path in result.layer_files:
        for key, tensor in load_file(path).items():
            assert torch.equal(tensor, reference[key]), key


def test_streamed_skeleton_keeps_no_layer_in_memory(folder: Path, tmp_path: Path) -> None:
    _, result = _stream(folder, tmp_path)
    layer_params = [p for layer in result.model.model.layers for p in layer.parameters()]
    assert layer_params and all(p.is_meta for p in layer_params)
    # ...but knows the pruned widths, which is all the export's config needs.
    q = result.model.model.layers[0].self_attn.q_proj
    assert q.out_features == 16 * len(result.layers[0].heads_kept)


def test_streamed_resume_after_cancel_equals_uninterrupted_run(folder: Path, in_memory,
                                                               tmp_path: Path) -> None:
    calls = iter([False, True])
    with pytest.raises(PruningCancelled):
        _stream(folder, tmp_path, should_cancel=lambda: next(calls))
    assert (tmp_path / "layer_0000.json").exists() and not (tmp_path / "layer_0001.json").exists()
    _, resumed = _stream(folder, tmp_path)
    assert resumed.resumed_from == 1
    reference = in_memory.model.state_dict()
    for path in resumed.layer_files:
        for key, tensor in load_file(path).items():
            assert torch.equal(tensor, reference[key]), key


def test_probes_give_the_pruned_models_logits_and_perplexities(folder: Path, in_memory,
                                                               base, tmp_path: Path) -> None:
    ids = windows(2, 16, seed=5)
    streamed, result = _stream(folder, tmp_path, probes={"after": Probe(ids),
                                                         "before": Probe(ids, dense=True)})
    logits = logits_from_hidden(streamed.model, result.probe_outputs["after"])
    with torch.no_grad():
        torch.testing.assert_close(logits, in_memory.model(ids).logits, rtol=1e-5, atol=1e-5)
    from slimgpt_core.evaluate import perplexity

    before = perplexity_from_hidden(streamed.model, result.probe_outputs["before"], ids)
    assert before == pytest.approx(perplexity(base, ids), rel=1e-5)


def test_streamed_export_is_verified_in_a_fresh_process_and_equals_the_in_memory_export(
        folder: Path, in_memory, tmp_path: Path) -> None:
    ids = windows(2, 16, seed=5)
    streamed, result = _stream(folder, tmp_path / "ckpt", probes={"verify": Probe(ids)})
    common = {"tokenizer": None, "base_model_id": "tiny", "verify_ids": ids,
              "calibration_info": describe_calibration(windows(), source="test")}
    report = export_pruned(result, tmp_path / "streamed", **common,
                           verify_logits=logits_from_hidden(streamed.model,
                                                            result.probe_outputs["verify"]))
    assert report.verification["passed"] and report.verification["streamed"]
    export_pruned(in_memory, tmp_path / "memory", **common)
    a, b = ShardedCheckpoint(tmp_path / "streamed"), ShardedCheckpoint(tmp_path / "memory")
    assert set(a.keys()) == set(b.keys())
    for key in a.tensors:
        assert torch.equal(a.read(key), b.read(key)), key


def test_streamed_export_needs_reference_logits_to_verify(folder: Path, tmp_path: Path) -> None:
    from slimgpt_core.export import ExportError

    _, result = _stream(folder, tmp_path / "ckpt")
    with pytest.raises(ExportError, match="verify_logits"):
        export_pruned(result, tmp_path / "out", tokenizer=None, base_model_id="tiny",
                      calibration_info={})


def test_streaming_needs_somewhere_to_write_layers(folder: Path) -> None:
    streamed = open_streamed(folder)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        prune_model(streamed.model, windows(), PruneConfig(**CFG), source=streamed.source)


def test_models_larger_than_the_host_share_are_streamed(folder: Path) -> None:
    size = ShardedCheckpoint(folder).nbytes
    assert should_stream(folder, host_bytes=size)  # would take all of it
    assert not should_stream(folder, host_bytes=10 * size)


def test_a_folder_without_safetensors_is_never_streamed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not should_stream(tmp_path, host_bytes=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_placement_gives_the_same_model_on_a_gpu(base, tmp_path: Path) -> None:
    # The transfers overlap compute on side streams: a missing wait would show up here as a
    # different weight somewhere. The in-memory models are loaded the way users load them
    # (from_pretrained in bf16), which is what the streamed skeleton reproduces.
    from transformers import AutoModelForCausalLM

    copy.deepcopy(base).to(torch.bfloat16).save_pretrained(tmp_path / "bf16",
                                                           max_shard_size="50KB")
    results = {}
    for placement in ("resident", "host"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
        results[placement] = prune_model(
            model, windows(), PruneConfig(**CFG, device="cuda", resident=placement == "resident"))
    streamed = open_streamed(tmp_path / "bf16")
    results["stream"] = prune_model(streamed.model, windows(),
                                    PruneConfig(**CFG, device="cuda", checkpoint_dir=tmp_path / "c"),
                                    source=streamed.source)
    assert [r.placement for r in results.values()] == ["resident", "host", "stream"]
    kept = {k: [(r.heads_kept, r.channels_kept) for r in v.layers] for k, v in results.items()}
    assert kept["resident"] == kept["host"] == kept["stream"]
    reference = {k: v.cpu() for k, v in results["resident"].model.state_dict().items()}
    host = results["host"].model.state_dict()
    for key, tensor in reference.items():
        assert torch.equal(host[key].cpu(), tensor), key
    for path in results["stream"].layer_files:
        for key, tensor in load_file(path).items():
            assert torch.equal(tensor, reference[key]), key


def test_in_memory_bf16_model_and_streamed_skeleton_agree_on_cpu(tmp_path: Path, base) -> None:
    # The CPU twin of the GPU test above (the streamed skeleton keeps the rotary frequencies
    # in fp32, as from_pretrained does).
    from transformers import AutoModelForCausalLM

    copy.deepcopy(base).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    a = prune_model(model, windows(), PruneConfig(**CFG, device="cpu"))
    streamed = open_streamed(tmp_path / "bf16")
    b = prune_model(streamed.model, windows(), PruneConfig(**CFG, device="cpu",
                                                           checkpoint_dir=tmp_path / "c"),
                    source=streamed.source)
    assert [(r.heads_kept, r.channels_kept) for r in a.layers] == \
        [(r.heads_kept, r.channels_kept) for r in b.layers]


@pytest.mark.parametrize("setting", [{"selection": "fisher"}, {"allocation": "sensitivity"}])
def test_whole_model_settings_are_refused_when_streaming(folder: Path, tmp_path: Path,
                                                         setting: dict[str, str]) -> None:
    streamed = open_streamed(folder)
    with pytest.raises(ValueError, match="whole model on one device"):
        prune_model(streamed.model, windows(), PruneConfig(**CFG, **setting,
                                                           checkpoint_dir=tmp_path),
                    source=streamed.source)
