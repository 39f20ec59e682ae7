"""Kubernetes manifests (deploy/kubernetes): schema-valid offline, and wired together.

Schemas: kubernetes-validate's bundled copies (strict: unknown fields fail), so
no network. Beyond the schemas, the names that must agree across files
(selectors, Secrets and their keys, ports, console scripts), the memory sizing
rule, and a real worker started with the manifest's own arguments, environment
and key layout, answering the manifest's own probe commands.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the dev extra) is not installed"
)
yaml = pytest.importorskip("yaml")  # PyYAML, a dependency of kubernetes-validate

REPO = Path(__file__).resolve().parents[1]
KDIR = REPO / "deploy" / "kubernetes"
OVERLAYS = {
    "top": KDIR,
    "base": KDIR / "base",
    "autoscaling": KDIR / "autoscaling",
    "qwen2.5-0.5b": KDIR / "examples" / "qwen2.5-0.5b",
}
# The oldest Kubernetes still commonly run, and the newest whose schemas are bundled.
VERSIONS = ["1.27", kv.utils.latest_version()]
WORKLOADS = ("Deployment", "StatefulSet")
Doc = dict[str, Any]


# -- reading the kustomizations (the subset of kustomize these files use) ------------------------
def _kustomization(directory: Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def _merge_key(field: str) -> str | None:
    """The list merge keys of a strategic merge patch, for the fields our patches touch."""
    return {"containers": "name", "volumes": "name", "env": "name"}.get(field) or (
        "mountPath" if field == "volumeMounts" else None
    )


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge: maps merge, keyed lists merge by key, anything else is replaced."""
    key = _merge_key(field)
    if isinstance(base, list) and isinstance(patch, list) and key:
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = [i for i, old in enumerate(merged) if old.get(key) == item.get(key)]
            if match:
                merged[match[0]] = _merge(merged[match[0]], item)
            else:
                merged.append(item)
        return merged
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            out[name] = _merge(base[name], value, name) if name in base else value
        return out
    return patch


def rendered(directory: Path) -> list[Doc]:
    """The resources `kubectl apply -k directory` would send (generated Secrets aside)."""
    docs: list[Doc] = []
    kust = _kustomization(directory)
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            docs += rendered(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kust.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [d for d in docs if (d["kind"], _name(d)) == (change["kind"], _name(change))]
        assert len(targets) == 1, f"{patch['path']} patches no resource (or several)"
        docs[docs.index(targets[0])] = _merge(targets[0], change)
    return docs


def generated_secrets(directory: Path) -> dict[str, dict[str, Path]]:
    """secretGenerator name -> {key in the Secret: the local file it is read from}."""
    kust = _kustomization(directory)
    secrets: dict[str, dict[str, Path]] = {}
    for entry in kust.get("resources", []):
        if (directory / entry).is_dir():
            secrets.update(generated_secrets((directory / entry).resolve()))
    for gen in kust.get("secretGenerator", []):
        files = {}
        for spec in gen.get("files", []):
            key, _, source = spec.rpartition("=")
            files[key or Path(source).name] = directory / source
        secrets[gen["name"]] = files
    return secrets


def _name(doc: Doc) -> str:
    name: str = doc["metadata"]["name"]
    return name


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and _name(d) == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def _container(docs: list[Doc], kind: str, name: str) -> Doc:
    containers = _pod_spec(_one(docs, kind, name))["containers"]
    assert len(containers) == 1
    container: Doc = containers[0]
    return container


def _subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def _memory(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


# -- schemas ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates_against_the_kubernetes_schema(overlay: str, version: str) -> None:
    docs = rendered(OVERLAYS[overlay])
    assert docs
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{_name(doc)} on {version}: {exc.message}")


def test_the_validator_rejects_what_the_api_server_would() -> None:
    """The check above can fail: a misspelt field, or a probe command given as a string."""
    worker = _one(rendered(KDIR), "StatefulSet", "ffai-worker")
    typo = copy.deepcopy(worker)
    _pod_spec(typo)["containers"][0]["readinesProbe"] = {"periodSeconds": 10}
    string_command = copy.deepcopy(worker)
    _pod_spec(string_command)["containers"][0]["livenessProbe"]["exec"]["command"] = "ffai ping"
    for broken in (typo, string_command):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, VERSIONS[-1], strict=True)


# -- the kustomizations ----------------------------------------------------------------------------
def test_the_base_kustomization_lists_every_manifest_and_keys_stay_out_of_git() -> None:
    base = KDIR / "base"
    listed = set(_kustomization(base)["resources"])
    on_disk = {p.name for p in base.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for overlay in OVERLAYS.values():
        kust = _kustomization(overlay)
        for entry in kust["resources"]:
            assert (overlay / entry).exists(), f"{overlay}: {entry} is missing"
            # Without it, a resource an overlay adds would land in the default namespace.
            if (overlay / entry).is_file():
                assert kust.get("namespace") == "ffai", f"{overlay} sets no namespace"
    sources = {p for files in generated_secrets(KDIR).values() for p in files.values()}
    assert sources and all(p.parent == base / "keys" for p in sources)
    for path in sources:  # no real key can be committed by mistake
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_selectors_find_their_pods(overlay: str) -> None:
    docs = rendered(OVERLAYS[overlay])
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    for w in workloads:
        assert _subset(
            w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]
        )
    for svc in [d for d in docs if d["kind"] == "Service"]:
        pods = [w for w in workloads if _subset(svc["spec"]["selector"], _template_labels(w))]
        assert len(pods) == 1, f"Service {_name(svc)} selects {len(pods)} workloads"
        ports = {p["name"] for c in _pod_spec(pods[0])["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for sts in [d for d in docs if d["kind"] == "StatefulSet"]:
        governing = _one(docs, "Service", sts["spec"]["serviceName"])
        assert governing["spec"]["clusterIP"] == "None"  # headless: one DNS record per pod
        assert _subset(governing["spec"]["selector"], _template_labels(sts))
    for pdb in [d for d in docs if d["kind"] == "PodDisruptionBudget"]:
        matched = [
            w
            for w in workloads
            if _subset(pdb["spec"]["selector"]["matchLabels"], _template_labels(w))
        ]
        assert len(matched) == 1
    for hpa in [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]:
        _one(docs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        for metric in hpa["spec"]["metrics"]:
            described = metric["object"]["describedObject"]
            _one(docs, described["kind"], described["name"])


def _template_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _secret_mounts(pod: Doc, container: Doc) -> dict[str, str]:
    """mountPath -> Secret name, for the container's secret volumes."""
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container["volumeMounts"]
        if m["name"] in secrets
    }


def _paths_used(container: Doc) -> list[str]:
    values = [e["value"] for e in container.get("env", []) if "value" in e]
    return [v for v in [*container.get("args", []), *values] if v.startswith("/")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_use_only_generated_secrets_and_keys_they_hold(overlay: str) -> None:
    docs = rendered(OVERLAYS[overlay])
    secrets = generated_secrets(OVERLAYS[overlay])
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        pod = _pod_spec(workload)
        for container in pod["containers"]:
            mounts = _secret_mounts(pod, container)
            assert set(mounts.values()) <= set(secrets), (
                f"{_name(workload)} mounts an unknown Secret"
            )
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]
            for path in _paths_used(container):
                for mount, secret in mounts.items():
                    if path.startswith(mount + "/"):
                        assert path[len(mount) + 1 :] in secrets[secret], f"{path} not in {secret}"
    # Every client key a pod speaks with (the probe's, the gateway's) is on the allow-list.
    allowed = set(secrets["ffai-curve-clients"])
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        for container in _pod_spec(workload)["containers"]:
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            if "FFAI_CURVE_KEY" in env:
                assert Path(env["FFAI_CURVE_KEY"]).name.replace(".key_secret", ".key") in allowed


# -- commands and sizing ---------------------------------------------------------------------------
def _scripts() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts: dict[str, str] = project["scripts"]
    return scripts


def _argv(command: list[str]) -> list[str]:
    """A console script run as this Python runs it (CI's PATH may not hold the venv's bin)."""
    module, _, func = _scripts()[command[0]].partition(":")
    code = f"import sys; sys.argv[0] = {command[0]!r}; from {module} import {func}; {func}()"
    return [sys.executable, "-c", code, *command[1:]]


def test_the_gateway_command_line_parses() -> None:
    gateway = pytest.importorskip(
        "ffai_client.gateway.cli",
        reason="ffai-gateway is not in this tree yet (issue 17's gateway)",
    )
    container = _container(rendered(KDIR), "Deployment", "ffai-gateway")
    assert container["command"] == ["ffai-gateway"] and "ffai-gateway" in _scripts()
    ctx = gateway.main.make_context("ffai-gateway", list(container["args"]))
    assert ctx.params["listen"] == "0.0.0.0:8080"
    assert {p["containerPort"] for p in container["ports"]} == {8080}


def _kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def _arg(args: list[str], flag: str, default: int) -> int:
    return int(args[args.index(flag) + 1]) if flag in args else default


def _sizing_rule(weights: int, per_token: int, args: list[str], context: int, overhead: int) -> int:
    """weights + KV (slots x positions, twice while it grows) + the process."""
    positions = context
    if "--max-prompt-tokens" in args and "--max-tokens-limit" in args:
        positions = min(
            context, _arg(args, "--max-prompt-tokens", 0) + _arg(args, "--max-tokens-limit", 0)
        )
    positions = -(-positions // 256) * 256  # the cache grows in 256-position steps
    return weights + 2 * _arg(args, "--max-batch", 16) * positions * per_token + overhead


def test_worker_memory_covers_the_sizing_rule() -> None:
    """deploy/README.md's rule, for the built-in model and the Qwen2.5-0.5B example."""
    import json

    model = REPO / "ffai_worker" / "default_model"
    cfg = json.loads((model / "config.json").read_text())
    per_token = _kv_bytes(cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"], 4)
    base = _container(rendered(KDIR), "StatefulSet", "ffai-worker")
    need = _sizing_rule(
        (model / "model.safetensors").stat().st_size,
        per_token,
        base["args"],
        cfg["max_position_embeddings"],
        100 * 2**20,
    )
    assert need <= _memory(base["resources"]["requests"]["memory"])
    # Qwen2.5-0.5B (config.json of the hub model): 494,032,768 parameters, 24 layers,
    # 2 KV heads of 64, context 32768; float32.
    qwen = _container(rendered(OVERLAYS["qwen2.5-0.5b"]), "StatefulSet", "ffai-worker")
    assert qwen["args"][qwen["args"].index("--dtype") + 1] == "float32"
    need = _sizing_rule(494_032_768 * 4, _kv_bytes(24, 2, 64, 4), qwen["args"], 32768, 512 * 2**20)
    assert need <= _memory(qwen["resources"]["requests"]["memory"])
    for c in (base, qwen):
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]


# -- the worker, run as the StatefulSet runs it -----------------------------------------------
class Pod:
    """A container's files laid out under `root` as its volumes would mount them."""

    def __init__(
        self, root: Path, pod: Doc, container: Doc, secrets: dict[str, dict[str, Path]], port: int
    ) -> None:
        self.root, self.container, self.port = root, container, port
        volumes = {v["name"]: v for v in pod["volumes"]}
        self.mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for mount in container["volumeMounts"]:
            target = root / mount["mountPath"].lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            secret = volumes[mount["name"]].get("secret")
            for key, source in secrets[secret["secretName"]].items() if secret else ():
                shutil.copyfile(source, target / key)

    def rewrite(self, value: str) -> str:
        """Container paths into `root`; the worker's port 5555 onto a free loopback port."""
        if any(value == m or value.startswith(m + "/") for m in self.mounts):
            return str(self.root / value.lstrip("/"))
        if value.startswith("tcp://"):
            return value.replace("0.0.0.0", "127.0.0.1").replace(":5555", f":{self.port}")
        return value

    def env(self) -> dict[str, str]:
        env = dict(os.environ, FFAI_SMALL_GEMM="0", HF_HUB_OFFLINE="1")  # no compile, no hub
        env.update(
            {e["name"]: self.rewrite(e["value"]) for e in self.container["env"] if "value" in e}
        )
        return env

    def run(self, command: list[str], **env: str) -> int:
        argv = _argv([self.rewrite(a) for a in command])
        done = subprocess.run(argv, env={**self.env(), **env}, capture_output=True, timeout=60)
        return done.returncode


@pytest.fixture(scope="module")
def keys_made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/kubernetes whose keys/ make-keys.sh filled with the real keygen."""
    work = tmp_path_factory.mktemp("kubernetes") / "kubernetes"
    shutil.copytree(KDIR, work, ignore=shutil.ignore_patterns("keys"))
    keygen = work.parent / "ffai-worker"
    keygen.write_text(f'#!/bin/sh\nexec {sys.executable} -m ffai_worker.cli "$@"\n')
    keygen.chmod(0o755)
    env = dict(os.environ, KEYGEN=f"{keygen} keygen")
    subprocess.run(["sh", str(work / "make-keys.sh")], env=env, check=True, capture_output=True)
    return work


@pytest.fixture(scope="module")
def worker_pod(keys_made: Path) -> Iterator[tuple[Pod, Pod, subprocess.Popen[bytes], Path]]:
    docs, secrets = rendered(KDIR), generated_secrets(keys_made)
    root, port = keys_made.parent / "root", free_port()
    sts, gw = _one(docs, "StatefulSet", "ffai-worker"), _one(docs, "Deployment", "ffai-gateway")
    worker = Pod(root, _pod_spec(sts), _pod_spec(sts)["containers"][0], secrets, port)
    gateway = Pod(root, _pod_spec(gw), _pod_spec(gw)["containers"][0], secrets, port)
    argv = _argv([worker.container["command"][0], *map(worker.rewrite, worker.container["args"])])
    log = root / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=worker.env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield worker, gateway, proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_make_keys_writes_every_file_the_secret_generator_reads(keys_made: Path) -> None:
    import zmq.auth

    for files in generated_secrets(keys_made).values():
        for source in files.values():
            assert source.is_file() and source.stat().st_size > 0, source
            if source.suffix in (".key", ".key_secret"):
                public, secret = zmq.auth.load_certificate(str(source))
                assert len(public) == 40 and (secret is not None) == (
                    source.suffix == ".key_secret"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_what_these_tests_check(overlay: str, keys_made: Path) -> None:
    """The real kustomize (where installed) agrees with `rendered`, and namespaces everything."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize cross-check needs it")
    directory = keys_made / OVERLAYS[overlay].relative_to(KDIR)
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()
    real = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "ffai" for d in real if d["kind"] != "Namespace")
    for doc in real:
        kv.validate(doc, VERSIONS[-1], strict=True)
    generated = generated_secrets(directory)
    secrets = {_name(d): d for d in real if d["kind"] == "Secret"}
    assert {n: set(d["data"]) for n, d in secrets.items()} == {
        n: set(files) for n, files in generated.items()
    }

    def key(doc: Doc) -> tuple[str, str]:
        return doc["kind"], _name(doc)

    def plain(doc: Doc) -> Doc:
        meta = {k: v for k, v in doc["metadata"].items() if k != "namespace"}
        return {**doc, "metadata": meta}

    ours = [_canonical(d) for d in sorted(rendered(directory), key=key)]
    assert [_canonical(plain(d)) for d in sorted(real, key=key) if d["kind"] != "Secret"] == ours


def _canonical(value: Any) -> Any:
    """Named list items in name order: a patch may move the ones it touches first."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: str(v["name"]))
        return items
    return value


def test_worker_serves_with_the_manifest_layout_and_its_probes_pass(
    worker_pod: tuple[Pod, Pod, subprocess.Popen[bytes], Path], keys_made: Path
) -> None:
    worker, gateway, proc, log = worker_pod
    kinds = ("startupProbe", "readinessProbe", "livenessProbe")
    probes = [worker.container[kind]["exec"]["command"] for kind in kinds]
    deadline = time.monotonic() + 90  # the startup probe allows 10 min; this model needs seconds
    while worker.run(probes[0]) != 0:
        assert proc.poll() is None, f"worker exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"worker never answered its probe:\n{log.read_text()}"
        time.sleep(0.5)
    assert [worker.run(p) for p in probes] == [0, 0, 0]
    # The gateway's keys (its own mounts, its own env) are on the workers' allow-list.
    assert gateway.run(["ffai", "ping", "--endpoint", f"tcp://127.0.0.1:{worker.port}"]) == 0
    assert worker.run(["ffai", "generate", "--max-tokens", "64", "Once upon a time"]) == 0
    # A client key not on the list is refused: the probe's success above means something.
    keygen = [str(keys_made.parent / "ffai-worker"), "keygen", "--dir", str(keys_made.parent)]
    subprocess.run([*keygen, "--name", "stranger"], check=True, capture_output=True)
    stranger = str(keys_made.parent / "stranger.key_secret")
    assert worker.run(probes[1], FFAI_CURVE_KEY=stranger) == 3
    assert "refused a CurveZMQ client" in log.read_text()
    # The memory limit holds the built-in model with room to spare (Linux: /proc).
    status_file = Path(f"/proc/{proc.pid}/status")
    if not status_file.exists():
        return
    status = status_file.read_text()
    peak_kib = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    )
    assert peak_kib * 1024 < _memory(worker.container["resources"]["limits"]["memory"])
