#!/usr/bin/env python3
"""Checks deploy/kubernetes/ as a cluster would, without one.

1. Renders each kustomization (the part of kustomize the manifests use:
   `resources`, inline JSON 6902 `patches` with a `target`, `images` and
   `labels`), since no kustomize binary can be had here.
2. Validates every rendered object, and every YAML file on its own, with
   kubernetes-validate --strict against each supported Kubernetes version
   (the image-volume variant from 1.33, when image volumes appeared).
3. Checks what no schema checks: selectors match the pod labels, probes
   and the Service name ports the container has, the grace period covers
   preStop + shutdown-delay + drain-timeout + a margin, the restricted Pod
   Security Standard, the config, cache and memory limit wiring.
4. Proves the checks of step 3 fail on broken copies (a check that cannot
   fail is no check).

    kubernetes_check.py            all of the above
    kubernetes_check.py --render DIR   print DIR's rendered objects (YAML)
"""

import copy
import os
import re
import sys
import tomllib

import kubernetes_validate
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy", "kubernetes")
# Kubernetes versions the manifests support: the kubelet's preStop `sleep`
# action is on by default from 1.30.
VERSIONS = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"]
# Variants and the first version each needs.
VARIANTS = {"": "1.30.0", "image-volume": "1.33.0", "hpa-metric": "1.30.0"}
# Seconds beyond preStop + shutdown-delay + drain-timeout.
MARGIN = 5


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def render(directory):
    """The objects kustomize would build from `directory`."""
    kust = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    known = {"apiVersion", "kind", "resources", "patches", "images", "labels"}
    unknown = set(kust) - known
    if unknown:
        raise SystemExit(f"{directory}: kustomization fields this renderer does not know: {unknown}")
    objs = []
    for r in kust.get("resources", []):
        p = os.path.normpath(os.path.join(directory, r))
        objs += render(p) if os.path.isdir(p) else load_docs(p)
    for patch in kust.get("patches", []):
        if "target" not in patch or "patch" not in patch:
            raise SystemExit(f"{directory}: only inline patches with a target are rendered")
        ops = yaml.safe_load(patch["patch"])
        hits = [o for o in objs if matches(o, patch["target"])]
        if len(hits) != 1:
            raise SystemExit(f"{directory}: patch target {patch['target']} matches {len(hits)} objects")
        for op in ops:
            apply_op(hits[0], op)
    for img in kust.get("images", []):
        for o in objs:
            for c in containers(o):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    for lab in kust.get("labels", []):
        for o in objs:
            o.setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
    return objs


def matches(obj, target):
    return all(obj.get("kind") == v if k == "kind" else obj["metadata"].get(k) == v for k, v in target.items())


def apply_op(obj, op):
    """One JSON 6902 operation (add, replace, remove)."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = obj
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if op["op"] == "add" and isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), op["value"])
    elif op["op"] in ("add", "replace"):
        if op["op"] == "replace" and last not in parent:
            raise SystemExit(f"replace of a missing {op['path']}")
        parent[int(last) if isinstance(parent, list) else last] = op["value"]
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise SystemExit(f"unsupported patch op {op['op']}")


def containers(obj):
    spec = pod_spec(obj)
    return spec.get("containers", []) if spec else []


def pod_spec(obj):
    if obj.get("kind") == "Deployment":
        return obj["spec"]["template"]["spec"]
    return None


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"duration {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": 60 * n}[unit]


def size_bytes(text):
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(text))
    return int(m.group(1)) * {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}[m.group(2)]


def semantic_errors(objs):
    """What no schema checks; returns a list of problems."""
    errs = []
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        return [f"expected one Deployment, found {len(deps)}"]
    dep = deps[0]
    tpl_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    sel = dep["spec"]["selector"].get("matchLabels", {})
    if not sel or any(tpl_labels.get(k) != v for k, v in sel.items()):
        errs.append("Deployment selector does not match its pod template's labels")
    spec = pod_spec(dep)
    c = spec["containers"][0]
    port_names = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    port_numbers = set(port_names.values())

    # The config the pod mounts.
    cms = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    cfg = None
    for name, v in vols.items():
        if "configMap" in v:
            cm = cms.get(v["configMap"]["name"])
            if cm is None:
                errs.append(f"volume {name} names ConfigMap {v['configMap']['name']}, which is not in the manifests")
            elif name not in mounts or mounts[name]["mountPath"] != "/etc/wasmpool":
                errs.append(f"ConfigMap volume {name} is not mounted at /etc/wasmpool")
            elif "wasmpool.toml" not in cm["data"]:
                errs.append("the ConfigMap has no wasmpool.toml")
            else:
                cfg = tomllib.loads(cm["data"]["wasmpool.toml"])
    if cfg is None:
        return errs + ["no wasmpool.toml mounted at /etc/wasmpool"]

    # Probes on the admin port, which the config listens on.
    admin_port = int(cfg.get("metrics-listen", ":0").rsplit(":", 1)[1])
    http_port = int(cfg["listen"][0].rsplit(":", 1)[1])
    if admin_port not in port_numbers:
        errs.append(f"metrics-listen port {admin_port} is not a container port")
    if http_port not in port_numbers:
        errs.append(f"listen port {http_port} is not a container port")
    for probe, path in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        p = c.get(probe)
        if p is None:
            errs.append(f"no {probe}")
            continue
        port = p["httpGet"]["port"]
        number = port_names.get(port) if isinstance(port, str) else port
        if number is None:
            errs.append(f"{probe} names port {port!r}, which the container does not have")
        elif number != admin_port:
            errs.append(f"{probe} is on port {number}, not the admin port {admin_port}")
        if p["httpGet"]["path"] != path:
            errs.append(f"{probe} asks {p['httpGet']['path']}, not {path}")

    # Shutdown: the grace period covers all of it.
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    delay = duration_s(cfg.get("shutdown-delay", "5s"))
    drain = duration_s(cfg.get("drain-timeout", "30s"))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < pre + delay + drain + MARGIN:
        errs.append(
            f"terminationGracePeriodSeconds {grace} < preStop {pre} + shutdown-delay {delay} + drain-timeout {drain} + {MARGIN}"
        )
    ru = dep["spec"].get("strategy", {}).get("rollingUpdate", {})
    if ru.get("maxUnavailable") != 0:
        errs.append("rolling updates must keep maxUnavailable: 0")

    # The restricted Pod Security Standard.
    psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        errs.append("runAsNonRoot is not set")
    if (csc.get("runAsUser", psc.get("runAsUser", 65532))) == 0:
        errs.append("runs as root")
    if csc.get("allowPrivilegeEscalation") is not False:
        errs.append("allowPrivilegeEscalation is not false")
    if csc.get("capabilities", {}).get("drop") != ["ALL"] or csc.get("capabilities", {}).get("add"):
        errs.append("capabilities are not exactly drop: [ALL]")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        errs.append("seccompProfile is not RuntimeDefault")
    if csc.get("readOnlyRootFilesystem") is not True:
        errs.append("the root filesystem is not read-only")
    if any(p.get("hostPort") for p in c.get("ports", [])) or spec.get("hostNetwork"):
        errs.append("host ports or host network")

    # The cache on an emptyDir at cache-dir; the memory limit set.
    cache_dir = cfg.get("cache-dir")
    cache_mount = [m for m in c.get("volumeMounts", []) if m["mountPath"] == cache_dir]
    if not cache_mount or "emptyDir" not in vols.get(cache_mount[0]["name"], {}):
        errs.append(f"cache-dir {cache_dir} is not an emptyDir")
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if limit is None:
        errs.append("no memory limit (the memory budget follows it)")
    elif cfg.get("memory-budget", "auto") != "auto":
        errs.append("memory-budget is set: with a memory limit, `auto` follows it")
    elif size_bytes(limit) < 128 << 20:
        errs.append(f"memory limit {limit} leaves nothing for guests")

    # Services, budgets and autoscalers point at the pods.
    for kind in ("Service", "PodDisruptionBudget"):
        for o in by_kind.get(kind, []):
            s = o["spec"]["selector"]
            s = s.get("matchLabels", s) if kind == "PodDisruptionBudget" else s
            if not s or any(tpl_labels.get(k) != v for k, v in s.items()):
                errs.append(f"{kind} {o['metadata']['name']} selects no pod of the Deployment")
            for p in o["spec"].get("ports", []):
                t = p.get("targetPort", p["port"])
                if (isinstance(t, str) and t not in port_names) or (isinstance(t, int) and t not in port_numbers):
                    errs.append(f"Service port {p.get('name')} targets {t!r}, which the container does not have")
    for o in by_kind.get("HorizontalPodAutoscaler", []):
        ref = o["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] != dep["metadata"]["name"]:
            errs.append("the HPA does not scale the Deployment")
        if o["spec"].get("minReplicas", 1) < 2:
            errs.append("the HPA may scale to one pod: a rollout or a drain would leave none")
        if any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in o["spec"]["metrics"]):
            if "cpu" not in c.get("resources", {}).get("requests", {}):
                errs.append("the HPA scales on CPU but the container requests none")
    for kind in ("Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        if kind not in by_kind:
            errs.append(f"no {kind}")
    return errs


def validate(objs, versions, label):
    failures = 0
    for v in versions:
        for o in objs:
            try:
                kubernetes_validate.validate(o, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures += 1
                print(f"FAIL {label}: {o['kind']}/{o['metadata']['name']} against {v}: {e.message} at {list(e.path)}")
    return failures


def mutations():
    """Broken copies of the base that the semantic checks must refuse."""

    def dep(objs):
        return next(o for o in objs if o["kind"] == "Deployment")

    def cm(objs):
        return next(o for o in objs if o["kind"] == "ConfigMap")

    def set_grace(objs):
        dep(objs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20

    def long_delay(objs):
        cm(objs)["data"]["wasmpool.toml"] = re.sub(
            r'shutdown-delay = "[^"]*"', 'shutdown-delay = "30s"', cm(objs)["data"]["wasmpool.toml"]
        )

    def bad_probe_port(objs):
        dep(objs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = "metrics"

    def probe_on_http(objs):
        dep(objs)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = "http"

    def selector(objs):
        dep(objs)["spec"]["selector"]["matchLabels"] = {"app.kubernetes.io/name": "other"}

    def service_selector(objs):
        next(o for o in objs if o["kind"] == "Service")["spec"]["selector"] = {"app": "nope"}

    def root(objs):
        dep(objs)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False

    def unavailable(objs):
        dep(objs)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] = 1

    def no_limit(objs):
        del dep(objs)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    def cache(objs):
        spec = dep(objs)["spec"]["template"]["spec"]
        spec["volumes"] = [v for v in spec["volumes"] if "emptyDir" not in v]

    return [set_grace, long_delay, bad_probe_port, probe_on_http, selector, service_selector, root, unavailable, no_limit, cache]


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(yaml.safe_dump_all(render(sys.argv[2]), sort_keys=False), end="")
        return 0
    failures = 0
    # Every YAML file on its own (patches are inline, so each file that is
    # not a kustomization is a whole object).
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith((".yaml", ".yml")) and f != "kustomization.yaml":
                p = os.path.join(dirpath, f)
                n = validate(load_docs(p), VERSIONS, os.path.relpath(p, ROOT))
                failures += n
                print(f"{'FAIL' if n else 'ok  '} {os.path.relpath(p, ROOT)}: {len(VERSIONS)} versions")
    for variant, first in VARIANTS.items():
        d = os.path.join(ROOT, variant)
        objs = render(d)
        versions = [v for v in VERSIONS if tuple(map(int, v.split("."))) >= tuple(map(int, first.split(".")))]
        n = validate(objs, versions, f"kustomize {variant or 'base'}")
        errs = semantic_errors(objs)
        for e in errs:
            print(f"FAIL kustomize {variant or 'base'}: {e}")
        failures += n + len(errs)
        print(
            f"{'FAIL' if n or errs else 'ok  '} kustomize {variant or 'base'}: {len(objs)} objects, "
            f"{versions[0]}..{versions[-1]} strict, {len(errs)} semantic problems"
        )
    base = render(ROOT)
    for m in mutations():
        broken = copy.deepcopy(base)
        m(broken)
        errs = semantic_errors(broken)
        if errs:
            print(f"ok   refused a broken copy ({m.__name__}): {errs[0]}")
        else:
            failures += 1
            print(f"FAIL the checks accept a broken copy ({m.__name__})")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
