"""An oci:// output through the trainer's own command, against a real registry (distribution's,
built from its Go module, asking for a login), read back by an independent client (the oras CLI):
the files come back byte for byte, and the digests are the ones the result reports."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, assert_hidden, checkpoint_steps, job_manifest

from kubetune_devtools.oci import LoginRegistry, docker_config, running_test_registry

pytestmark = pytest.mark.trainer

REPOSITORY = "team/tiny-reverse"
TAG = "v1"
MODELPACK = "application/vnd.cncf.model."


@dataclass(frozen=True)
class Run:
    exit_code: int
    work: Path
    logs: str
    termination: dict[str, Any]


def _train(
    tiny: TinyAssets,
    work: Path,
    output: str,
    auth_file: Path,
    *,
    max_steps: int,
    layout: str = "modelpack",
) -> Run:
    """The pod's command (`kubetune-trainer --config`) on a config with an oci:// output."""
    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob
    from kubetune.trainer.cli import main as trainer

    manifest = job_manifest(
        tiny.model,
        tiny.datasets["prompt-completion"],
        output,
        training={"maxSteps": max_steps, "checkpointSteps": max_steps // 2, "loggingSteps": 2},
    )
    manifest["spec"]["output"].update(
        checkpointUri=str(work / "checkpoints-home"),
        registry={"plainHttp": True, "layout": layout},
    )
    config = work / "config.yaml"
    config.write_text(TrainerConfig(spec=load_finetunejob(manifest).spec).to_yaml())
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBETUNE_TERMINATION_LOG", str(work / "termination-log"))
        env.setenv("REGISTRY_AUTH_FILE", str(auth_file))
        logging.getLogger().addHandler(handler)
        try:
            code = trainer(["--config", str(config)])
        finally:
            logging.getLogger().removeHandler(handler)
    termination = json.loads((work / "termination-log").read_text())
    return Run(code, work / "checkpoints-home", logs.getvalue(), termination)


@pytest.fixture(scope="module")
def registry(
    registry_tools: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoginRegistry]:
    with running_test_registry(tmp_path_factory.mktemp("oci"), registry_tools) as started:
        yield started


@pytest.fixture(scope="module")
def pushed(
    tiny: TinyAssets, registry: LoginRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    work = tmp_path_factory.mktemp("pushed")
    output = f"oci://{registry.host}/{REPOSITORY}:{TAG}"
    return _train(tiny, work, output, registry.auth_file, max_steps=8)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_status_pins_the_pushed_artifact_by_the_digest_the_registry_holds(
    pushed: Run, registry: LoginRegistry
) -> None:
    assert pushed.exit_code == 0, pushed.logs[-3000:]
    digest = registry.oras("resolve", f"{registry.host}/{REPOSITORY}:{TAG}").stdout.strip()
    adapter = pushed.termination["adapter"]
    assert adapter["uri"] == f"oci://{registry.host}/{REPOSITORY}@{digest}"
    # sha256 stays the adapter file's: the file on the checkpoint location's copy.
    assert adapter["sha256"] == _sha256(pushed.work / "adapter_model.safetensors")
    written = json.loads((pushed.work / "result.json").read_text())
    assert written["adapter"]["uri"] == adapter["uri"]


def test_oras_pulls_back_the_adapter_files_byte_for_byte(
    pushed: Run, registry: LoginRegistry, tmp_path: Path
) -> None:
    pinned = pushed.termination["adapter"]["uri"].removeprefix("oci://")
    registry.oras("pull", pinned, "--output", str(tmp_path))
    pulled = {p.name for p in tmp_path.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "result.json",
    } <= pulled
    assert any(name.startswith("tokenizer") for name in pulled), pulled
    for name in pulled - {"result.json"}:
        assert (tmp_path / name).read_bytes() == (pushed.work / name).read_bytes(), name
    assert (
        _sha256(tmp_path / "adapter_model.safetensors") == pushed.termination["adapter"]["sha256"]
    )
    # The artifact's result.json names the tag (its own digest can't be inside it); otherwise
    # it is the result status shows.
    inside = json.loads((tmp_path / "result.json").read_text())
    assert inside["adapter"]["uri"] == f"oci://{registry.host}/{REPOSITORY}:{TAG}"
    assert inside["adapter"]["sha256"] == pushed.termination["adapter"]["sha256"]
    assert inside["outcome"] == "Succeeded"


def test_a_kaito_layout_is_the_image_kaitos_puller_unpacks_into_the_adapter_files(
    tiny: TinyAssets, registry: LoginRegistry, tmp_path: Path
) -> None:
    """output.registry.layout: kaito, taken apart with KAITO's own puller steps
    (pkg/utils/image/puller.sh): skopeo copies it into a dir: layout with the layers
    decompressed, each layer listed by `skopeo inspect` is untarred into one root, and that
    root's data/ is the adapter's folder."""
    output = f"oci://{registry.host}/{REPOSITORY}-kaito:{TAG}"
    (tmp_path / "work").mkdir()
    run = _train(tiny, tmp_path / "work", output, registry.auth_file, max_steps=4, layout="kaito")
    assert run.exit_code == 0, run.logs[-3000:]
    pinned = run.termination["adapter"]["uri"].removeprefix("oci://")
    assert pinned.startswith(f"{registry.host}/{REPOSITORY}-kaito@sha256:")
    assert run.termination["adapter"]["sha256"] == _sha256(run.work / "adapter_model.safetensors")

    layout, root = tmp_path / "layout", tmp_path / "rootfs"
    skopeo = ("skopeo", "--insecure-policy")
    copy = [*skopeo, "copy", "--dest-decompress", "--src-tls-verify=false",
            "--src-authfile", str(registry.auth_file), f"docker://{pinned}", f"dir:{layout}"]  # fmt: skip
    subprocess.run(copy, check=True, capture_output=True, timeout=120)
    listed = subprocess.run(
        [*skopeo, "inspect", "--format", "{{ range .Layers }}{{ slice . 7 }} {{ end }}",
         f"dir:{layout}"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert len(listed) == 1, listed
    root.mkdir()
    subprocess.run(["tar", "x", "-f", str(layout / listed[0]), "-C", str(root)], check=True)
    data = root / "data"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in data.iterdir()}
    for path in data.iterdir():
        assert (
            path.read_bytes() == (run.work / path.name).read_bytes() or path.name == "result.json"
        )


def test_the_manifest_is_a_modelpack_artifact_with_one_raw_layer_a_file(
    pushed: Run, registry: LoginRegistry
) -> None:
    manifest = registry.manifest(pushed.termination["adapter"]["uri"].removeprefix("oci://"))
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    layers = {
        layer["annotations"]["org.opencontainers.image.title"]: layer
        for layer in manifest["layers"]
    }
    weights = layers["adapter_model.safetensors"]
    assert weights["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert weights["digest"] == "sha256:" + pushed.termination["adapter"]["sha256"]
    assert layers["adapter_config.json"]["mediaType"] == f"{MODELPACK}weight.config.v1.raw"
    assert layers["README.md"]["mediaType"] == f"{MODELPACK}doc.v1.raw"
    assert all(x["annotations"]["org.cncf.model.filepath"] == t for t, x in layers.items())
    # Checkpoints stay where they can be resumed from, never in the artifact.
    assert not any("checkpoint" in title for title in layers)
    config = json.loads(
        registry.oras("blob", "fetch", "--output", "-",
                      f"{registry.host}/{REPOSITORY}@{manifest['config']['digest']}").stdout
    )  # fmt: skip
    assert config["modelfs"] == {
        "type": "layers",
        "diffIds": [layer["digest"] for layer in manifest["layers"]],
    }
    assert config["config"]["format"] == "safetensors"


def test_checkpoints_of_an_oci_output_are_kept_at_its_checkpoint_uri(pushed: Run) -> None:
    assert checkpoint_steps(pushed.work / "checkpoints") == [4, 8]


def test_the_registry_login_shows_nowhere(pushed: Run, registry: LoginRegistry) -> None:
    auth = json.loads(registry.auth_file.read_text())["auths"][registry.host]["auth"]
    assert_hidden(
        [registry.password, auth],
        logs=pushed.logs,
        termination=json.dumps(pushed.termination),
        result=(pushed.work / "result.json").read_text(),
        model_card=(pushed.work / "README.md").read_text(),
    )


def test_a_push_the_registry_refuses_fails_the_run_naming_it_and_keeps_the_adapter(
    tiny: TinyAssets, registry: LoginRegistry, tmp_path: Path
) -> None:
    wrong = docker_config(tmp_path / "wrong.json", registry.host, registry.username, "not-it-1234")
    output = f"oci://{registry.host}/team/refused:{TAG}"
    run = _train(tiny, tmp_path, output, wrong, max_steps=2)

    assert run.exit_code == 1, run.logs[-3000:]
    message = run.termination["message"]
    assert f"push to {output} failed" in message
    assert "the registry refused the login" in message
    assert "output.registry.credentialsSecretRef" in message
    assert "the adapter is saved" in message
    assert (run.work / "adapter_model.safetensors").is_file()
    listed = registry.oras("repo", "tags", f"{registry.host}/team/refused", check=False)
    assert TAG not in listed.stdout


# --- continuing an adapter (spec.model.adapter) ---------------------------------------------------


def _continue(
    tiny: TinyAssets, work: Path, adapter: str, auth_file: Path, *, model: Path | None = None,
    lora: dict[str, Any] | None = None, **training: Any,
) -> tuple[int, str, dict[str, Any]]:  # fmt: skip
    """`kubetune train` of the tiny job into ``work/out``, starting from ``adapter``."""
    from kubetune.trainer.run.local_run import main as kubetune
    from kubetune_devtools.tiny import demo_manifest

    manifest = demo_manifest(model or tiny.model, tiny.datasets["prompt-completion"])
    manifest["spec"].pop("evaluation")
    manifest["spec"]["lora"].update(lora or {})
    manifest["spec"]["training"].update(
        {"maxSteps": 2, "checkpointSteps": 2, "loggingSteps": 1, **training}
    )
    manifest["spec"]["output"]["uri"] = str(work / "out")
    manifest["spec"]["model"]["adapter"] = {"uri": adapter, "registry": {"plainHttp": True}}
    path = work / "job.yaml"
    path.write_text(json.dumps(manifest))
    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KUBETUNE_TERMINATION_LOG", str(work / "termination-log"))
        env.setenv("REGISTRY_AUTH_FILE", str(auth_file))
        logging.getLogger().addHandler(handler)
        try:
            code = kubetune(["train", str(path), "--no-progress"])
        finally:
            logging.getLogger().removeHandler(handler)
    termination = json.loads((work / "termination-log").read_text())
    return code, logs.getvalue(), termination


def test_a_run_continues_the_adapter_it_pulls_by_digest_and_says_so(
    tiny: TinyAssets, pushed: Run, registry: LoginRegistry, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    pinned = pushed.termination["adapter"]["uri"]
    code, logs, termination = _continue(
        tiny, tmp_path, pinned, registry.auth_file, learningRate=1.0e-7
    )

    assert code == 0, logs[-3000:]
    assert termination["baseModel"]["adapter"] == pinned
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- continued from the adapter `{pinned}`" in card
    assert_hidden([registry.password], logs=logs, model_card=card)
    # Two steps at a learning rate of 1e-7 barely move the weights: the run's adapter is the
    # pulled one (a fresh adapter's B matrices would start at zero).
    started = load_file(pushed.work / "adapter_model.safetensors")
    continued = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert started.keys() == continued.keys()
    lora_b = [k for k in started if "lora_B" in k]
    assert lora_b and all(started[k].abs().max() > 1e-3 for k in lora_b)
    for key, tensor in started.items():
        torch.testing.assert_close(continued[key].float(), tensor.float(), rtol=0, atol=1e-4)


def test_an_adapter_of_another_lora_shape_is_refused_before_the_model_loads(
    tiny: TinyAssets, pushed: Run, registry: LoginRegistry, tmp_path: Path
) -> None:
    pinned = pushed.termination["adapter"]["uri"]
    code, _, refused = _continue(
        tiny, tmp_path, pinned, registry.auth_file, lora={"r": 8, "alpha": 16}
    )
    assert code == 2
    assert refused["reason"] == "InvalidConfig"
    assert refused["message"] == (
        f"model.adapter: {pinned} has r=16 and lora_alpha=32; continuing it needs lora.r: 16 and "
        "lora.alpha: 32 (the spec has 8 and 16)"
    )


def test_an_adapter_trained_on_another_base_model_is_refused_naming_the_module(
    tiny: TinyAssets, pushed: Run, registry: LoginRegistry, tmp_path: Path
) -> None:
    from kubetune_devtools.tiny import write_tiny_model

    wider = write_tiny_model(tmp_path / "wider", hidden_size=128)
    pinned = pushed.termination["adapter"]["uri"]
    code, _, termination = _continue(tiny, tmp_path, pinned, registry.auth_file, model=wider)
    assert code == 4
    assert termination["reason"] == "ModelError"
    assert termination["message"].startswith(f"model.adapter: {pinned} doesn't fit the base model")
    # The first module in order whose sizes differ: the MLP's, twice as wide in the wider model.
    assert termination["message"].endswith(
        "model.layers.0.mlp.down_proj maps 128→64 in the adapter, 256→128 in the base"
    )


def test_the_preflight_fails_a_registry_login_that_cant_push_before_any_training(
    tiny: TinyAssets, registry: LoginRegistry, tmp_path: Path
) -> None:
    from kubetune.api.config import TrainerConfig
    from kubetune.api.manifest import load_finetunejob
    from kubetune.trainer.cli import main as trainer

    output = f"oci://{registry.host}/team/preflighted:v1"
    manifest = job_manifest(tiny.model, tiny.datasets["prompt-completion"], output)
    manifest["spec"]["output"].update(
        checkpointUri=str(tmp_path / "work"), registry={"plainHttp": True}
    )
    config = tmp_path / "config.yaml"
    config.write_text(TrainerConfig(spec=load_finetunejob(manifest).spec).to_yaml())
    wrong = docker_config(tmp_path / "wrong.json", registry.host, registry.username, "not-it-1234")

    def preflight(auth_file: Path) -> tuple[int, dict[str, Any]]:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
            env.setenv("REGISTRY_AUTH_FILE", str(auth_file))
            code = trainer(["preflight", "--config", str(config)])
        return code, json.loads((tmp_path / "termination-log").read_text())

    code, refused = preflight(wrong)
    assert code == 2
    assert refused["reason"] == "InvalidConfig"
    assert refused["message"] == (
        f"output.uri: {output} can't be pushed to: {registry.host}/team/preflighted: the registry "
        "refused the login to start an upload (HTTP 401); check the Secret "
        "output.registry.credentialsSecretRef names"
    )
    assert preflight(registry.auth_file)[0] == 0
    # The check wrote nothing: the repository has no tag.
    listed = registry.oras("repo", "tags", f"{registry.host}/team/preflighted", check=False)
    assert listed.stdout.strip() == ""
