"""What the speed path must not change: packed sequences stay apart, the saved adapter is the
trained one, and offloading checkpoints to CPU memory gives the same gradients.

One short packed run of the trainer's own recipe (the spec's default bf16 compute, packing on,
``training.profile: memory``) on the tiny model; the tests look at its real collator, its model
and the adapter it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, adapter_on_4bit_base, job_manifest

pytestmark = pytest.mark.trainer


@dataclass(frozen=True)
class PackedRun:
    recipe: Any
    output: Path
    probe: Any  # token ids, shape (1, n)
    trained_logits: Any  # what the trained model answered to ``probe``, in training precision


@pytest.fixture(scope="module")
def packed_run(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> PackedRun:
    import torch

    from kubetune.api.config import TrainerConfig
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    output = tmp_path_factory.mktemp("packed") / "adapter"
    training = {"maxSteps": 6, "batchSize": 4, "maxLength": 128, "packing": True,
                "gradientCheckpointing": None, "profile": "memory", "checkpointSteps": 100,
                "loggingSteps": 1}  # fmt: skip
    manifest = job_manifest(
        tiny.model, tiny.datasets["prompt-completion"], output, training=training
    )
    manifest["spec"]["quantization"].pop("computeDtype")  # the default: bfloat16
    manifest["spec"]["training"].pop("microBatchSize")  # the profile's choice: one row a pass
    recipe = QLoRASFTRecipe(TrainerConfig(spec=FineTuneJobSpec.model_validate(manifest["spec"])))
    recipe.setup()
    outcome = recipe.train()
    model = recipe._trainer.model
    model.eval()
    probe = recipe._tokenizer("reverse: a b c d e =>", return_tensors="pt")["input_ids"]
    with torch.no_grad(), recipe._trainer.accelerator.autocast():
        trained_logits = model(input_ids=probe).logits.float()
    recipe.save(outcome)
    return PackedRun(recipe, output, probe, trained_logits)


def _packed_row_with_two_sequences(recipe: Any) -> dict[str, Any]:
    for row in recipe._trainer.train_dataset:
        if len(row["seq_lengths"]) >= 2:
            return dict(row)
    raise AssertionError("packing put no two sequences in one row")


def test_the_run_packed_with_the_memory_profiles_plan(packed_run: PackedRun) -> None:
    report = packed_run.recipe.plan_report()
    assert report is not None
    assert (report.profile, report.gradient_checkpointing, report.micro_batch_size) == (
        "memory",
        "all layers",  # offloading is for a GPU; the CPU keeps its checkpoints
        1,
    )
    assert report.gradient_accumulation_steps == 4
    assert (packed_run.output / "adapter_model.safetensors").is_file()


def test_packed_sequences_never_attend_across_their_boundaries(packed_run: PackedRun) -> None:
    import torch

    recipe = packed_run.recipe
    row = _packed_row_with_two_sequences(recipe)
    batch = recipe._trainer.data_collator([row])
    assert "position_ids" in batch and batch.get("attention_mask") is None  # padding-free
    first = int(row["seq_lengths"][0])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts[:2] == [0, first]  # the collator restarts positions at each sequence

    perturbed = batch["input_ids"].clone()
    perturbed[0, 1:first] = (perturbed[0, 1:first] + 7) % recipe._tokenizer.vocab_size
    assert not torch.equal(perturbed, batch["input_ids"])
    model = recipe._trainer.model
    model.eval()

    def logits(input_ids: Any, positions: Any) -> Any:
        with torch.no_grad(), recipe._trainer.accelerator.autocast():
            return model(input_ids=input_ids, position_ids=positions).logits.float()

    original = logits(batch["input_ids"], batch["position_ids"])
    changed = logits(perturbed, batch["position_ids"])
    # The perturbed sequence's own logits move; every later sequence's stay exactly as they were.
    assert (original[0, :first] - changed[0, :first]).abs().max() > 0.1
    torch.testing.assert_close(changed[0, first:], original[0, first:], rtol=0, atol=1e-5)
    # The check can see a leak: read as one sequence, the same perturbation reaches the second.
    one = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    leaked = logits(perturbed, one) - logits(batch["input_ids"], one)
    assert leaked[0, first:].abs().max() > 0.1


def test_the_saved_adapter_in_plain_peft_reproduces_the_training_time_logits(
    packed_run: PackedRun, tiny: TinyAssets
) -> None:
    import torch

    model = adapter_on_4bit_base(tiny.model, packed_run.output, "bfloat16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loaded = model(input_ids=packed_run.probe).logits.float()
        with model.disable_adapter():
            untrained = model(input_ids=packed_run.probe).logits.float()
    trained = packed_run.trained_logits
    learned = (trained - untrained).abs().max()
    assert learned > 0.5  # the adapter changed the answers
    # What plain PEFT gives differs from training time by bf16 rounding only (the trainer keeps
    # the norms in fp32): far less than what the adapter changed, and the same top tokens.
    rounding = (loaded - trained).abs().max()
    assert rounding < 0.05 * learned
    # The same top token wherever training time's top token leads by more than that rounding
    # (a near tie may flip either way), and at most positions.
    top2 = trained.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * rounding
    assert int(decided.sum()) >= decided.numel() // 2
    assert torch.equal(loaded.argmax(-1)[decided], trained.argmax(-1)[decided])


def test_offloading_checkpoints_to_cpu_gives_the_same_gradients(tiny: TinyAssets) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.model.modeling import offload_checkpoints_to_cpu

    def gradients(offload: bool) -> tuple[dict[str, Any], int]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
        model.train()
        model.gradient_checkpointing_enable({"use_reentrant": False})
        if offload:
            offload_checkpoints_to_cpu(model, pin_memory=False)
        saved = 0

        def count(tensor: Any) -> Any:
            nonlocal saved
            saved += 1
            return tensor

        ids = torch.arange(3, 40).unsqueeze(0)
        # An outer hook sees what nothing inside claims: the offload hooks claim the checkpoints.
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved

    plain, seen_plain = gradients(offload=False)
    offloaded, seen_offloaded = gradients(offload=True)
    assert plain.keys() == offloaded.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=0, atol=0, msg=name)
    assert seen_offloaded < seen_plain
